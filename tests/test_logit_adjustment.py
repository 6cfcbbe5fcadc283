"""benchmarks/logit_adjustment.py: the validation choice of (prior weight, tau) and its refusals."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "logit_adjustment.py"


def _module():
    return load_benchmark("logit_adjustment")


def _top1(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(labels == predictions))


LOG_FREQ = np.log(np.array([0.9, 0.1]))  # class 0 frequent, class 1 rare


def test_tau_is_chosen_when_it_moves_rare_class_decisions_the_right_way() -> None:
    # Rare-class images score slightly below the frequent class: subtracting tau * log(frequency)
    # (which raises the rare class by 2.2 * tau) turns them into correct predictions.
    logits = np.array([[1.0, 0.5], [1.0, 0.6], [2.0, 0.0], [3.0, 0.0]])
    labels = np.array([1, 1, 0, 0])
    w, tau = _module().choose(logits, np.zeros_like(logits), LOG_FREQ, labels, (0.0, 0.25, 0.5), (0.0, 1.0), _top1)
    assert tau == 0.25 and w == 0.0  # 0.25 already fixes both; ties go to the smaller tau and weight


def test_tau_zero_is_kept_when_adjusting_does_not_help() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1])
    _, tau = _module().choose(logits, np.zeros_like(logits), LOG_FREQ, labels, (0.0, 0.5, 1.0), (0.0,), _top1)
    assert tau == 0.0


def test_a_run_without_a_clinical_prior_is_named_before_any_image_is_read(tmp_path: Path) -> None:
    (tmp_path / "run" / "final").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "no-such-data"), str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "error: " in done.stderr and "run: no final/clinical.npz" in done.stderr
