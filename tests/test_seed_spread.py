"""benchmarks/seed_spread.py: per-run figures, mean ± sd, and a warning when runs differ in more than the seed."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_spread.py"


def _run_dir(
    root: Path, name: str, seed: int, top1: float, width: int = 32, prior: float | None = None, akida_macro_f1_loss: float = 0.0
) -> Path:
    run = root / name
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"seed": seed, "width": width, "run_dir": str(run)}))
    m = {"top1": top1, "macro_f1": top1 - 0.2, "balanced_accuracy": top1 - 0.25}
    models = {k: m for k in ("float", "quantized", "akida")}
    models["akida"] = {**m, "macro_f1": m["macro_f1"] - akida_macro_f1_loss}
    if prior is not None:
        models["akida_with_clinical_prior"] = {"top1": prior, "macro_f1": prior - 0.1, "balanced_accuracy": prior - 0.1}
    (run / "bundle.json").write_text(json.dumps({"metrics": {part: models for part in ("val", "test")}}))
    return run


def _spread(*runs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, runs)], check=False, capture_output=True, text=True, timeout=60)


def test_mean_and_sample_sd_over_seeds(tmp_path: Path) -> None:
    done = _spread(_run_dir(tmp_path, "a", 0, 0.70), _run_dir(tmp_path, "b", 1, 0.80))
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stdout
    assert "0.750±0.071/0.550±0.071/0.500±0.071" in done.stdout  # sd of (0.70, 0.80) = 0.0707


def test_other_options_are_flagged_and_unfinished_runs_refused(tmp_path: Path) -> None:
    done = _spread(_run_dir(tmp_path, "a", 0, 0.70), _run_dir(tmp_path, "b", 1, 0.80, width=48))
    assert "differs from" in done.stdout and "width" in done.stdout
    unfinished = tmp_path / "c"
    unfinished.mkdir()
    done = _spread(unfinished)
    assert done.returncode != 0 and "bundle.json not found" in done.stderr


def test_clinical_prior_column_only_when_every_run_has_it(tmp_path: Path) -> None:
    both = _spread(_run_dir(tmp_path, "a", 0, 0.70, prior=0.72), _run_dir(tmp_path, "b", 1, 0.80, prior=0.82))
    assert both.returncode == 0, both.stderr
    assert "akida+prior:    0.770±0.071/0.670±0.071/0.670±0.071" in both.stdout
    one = _spread(_run_dir(tmp_path, "c", 0, 0.70, prior=0.72), _run_dir(tmp_path, "d", 1, 0.80))
    assert one.returncode == 0 and "akida+prior" not in one.stdout


def test_fidelity_bar_is_judged_per_run_and_one_sided(tmp_path: Path) -> None:
    done = _spread(
        _run_dir(tmp_path, "faithful", 0, 0.70, akida_macro_f1_loss=0.005),
        _run_dir(tmp_path, "lossy", 1, 0.80, akida_macro_f1_loss=0.016),
        _run_dir(tmp_path, "better", 2, 0.75, akida_macro_f1_loss=-0.03),
    )
    assert done.returncode == 0, done.stderr
    fidelity = {line.split()[0]: line for line in done.stdout.splitlines() if "images only" in line}
    assert set(fidelity) == {"faithful", "lossy", "better"}
    assert "+0.0 / -0.5 (ok)" in fidelity["faithful"]
    assert "+0.0 / -1.6 (outside the bar)" in fidelity["lossy"]
    assert "+0.0 / +3.0 (ok)" in fidelity["better"]  # scoring higher than float is not a failure of the chip
    assert "with the prior" not in done.stdout  # no run recorded float and Akida with the prior
