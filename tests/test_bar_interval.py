"""benchmarks/bar_interval.py: per-run intervals, the share of resamples over the bar, the
chip-vs-float fidelity share, and the recipe's t-interval over runs."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from benchmark_scripts import load_benchmark

from qana.classes import CLASS_NAMES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bar_interval.py"


def _predictions(n: int = 700, accuracy: float = 0.97, chip_accuracy: float | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(CLASS_NAMES)

    def noisy(acc: float) -> np.ndarray:
        return np.where(rng.random(n) < acc, labels, (labels + 1) % len(CLASS_NAMES))

    reference = noisy(accuracy)
    chip = reference if chip_accuracy is None else noisy(chip_accuracy)
    preds = {"float": reference, "float+prior": reference, "akida": chip, "akida+prior": chip}
    return preds, labels, np.arange(n) // 2  # two images per lesion


def test_a_model_far_over_the_bar_clears_it_in_every_resample(capsys) -> None:
    preds, labels, lesions = _predictions()
    point = load_benchmark("bar_interval").report_run("run", preds, labels, lesions, 1.5, resamples=200, seed=0)
    out = capsys.readouterr().out
    assert "clears top-1 >= 0.80 and macro-F1 >= 0.60 in 100 % of resamples" in out
    assert "images only, points: top-1 +0.0 [+0.0, +0.0]" in out  # chip == float: no fidelity noise
    assert "more than 1 point below in 0 % of resamples" in out
    assert "700 test images from 350 lesions" in out
    assert point["akida+prior"]["top1"] > 0.95


def test_a_chip_far_below_float_falls_outside_the_fidelity_bar_in_every_resample(capsys) -> None:
    preds, labels, lesions = _predictions(accuracy=0.97, chip_accuracy=0.6)
    load_benchmark("bar_interval").report_run("run", preds, labels, lesions, 0.0, resamples=200, seed=0)
    out = capsys.readouterr().out
    assert "clears top-1 >= 0.80 and macro-F1 >= 0.60 in 0 % of resamples" in out
    assert "with the prior, points" in out and "more than 1 point below in 100 % of resamples" in out


def test_recipe_interval_is_the_t_interval_of_the_runs(capsys) -> None:
    top1, mf1 = [0.80, 0.79, 0.81, 0.80], [0.58, 0.60, 0.57, 0.59]
    points = [{"akida+prior": {"top1": t, "macro_f1": m}} for t, m in zip(top1, mf1, strict=True)]
    load_benchmark("bar_interval").report_recipe(points)
    out = capsys.readouterr().out
    half = 3.182446 * statistics.stdev(mf1) / 2  # t(0.975, 3 degrees of freedom) * sd / sqrt(4)
    assert f"macro-F1  0.585 [{0.585 - half:.3f}, {0.585 + half:.3f}]" in out
    assert "3 degrees of freedom" in out


def test_unfinished_run_and_bad_resamples_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    for args, message in (([str(tmp_path / "half")], "bundle stage has finished"), (["--resamples", "0", str(tmp_path)], "--resamples")):
        done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), *args], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert message in done.stderr


def _finished(root: Path, name: str, seed: int, **settings: object) -> Path:
    """The records of a finished run that check_recipe_runs reads: options.json and bundle.json."""
    run = root / name
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"seed": seed, "mixup": 0.0, **settings}))
    m = {"top1": 0.8, "macro_f1": 0.6, "balanced_accuracy": 0.6}
    (run / "bundle.json").write_text(json.dumps({"metrics": {part: {k: m for k in ("float", "quantized", "akida")} for part in ("val", "test")}}))
    return run


def test_one_split_twice_is_refused_and_another_recipe_warned_about(tmp_path: Path, capsys) -> None:
    """As in seed_spread: one split given twice made a zero-width "interval" and two recipes were
    averaged, without a word."""
    a, b = _finished(tmp_path, "a-seed19", 19), _finished(tmp_path, "b-seed19", 19, mixup=0.2)
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(a), str(b)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "both have seed 19, i.e. the same split" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(a), str(a)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the same split" in done.stderr, done.stderr
    load_benchmark("bar_interval").check_recipe_runs([a, _finished(tmp_path, "b-seed20", 20, mixup=0.2)])
    assert "b-seed20 differs from" in capsys.readouterr().out
