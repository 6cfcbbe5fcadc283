"""benchmarks/compare_runs.py: runs are compared only on the same split, every part of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"


def _run(root: Path, name: str, val: list[int]) -> Path:
    run = root / name
    run.mkdir()
    np.savez(run / "split.npz", train=np.array([0, 1, 2]), val=np.array(val), test=np.array([5, 6]), image_ids=np.arange(7).astype(str))
    return run


def test_runs_split_with_another_validation_share_are_refused(tmp_path: Path) -> None:
    # same test part, other validation images (another --val-fraction): the val rows would not be comparable
    a, b = _run(tmp_path, "a", [3, 4]), _run(tmp_path, "b", [3])
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(a), str(b)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "was split differently" in done.stderr, done.stderr
    missing = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "split.npz not found" in missing.stderr and "Traceback" not in missing.stderr


def test_a_cut_off_split_is_named_not_a_traceback(tmp_path: Path) -> None:
    run = _run(tmp_path, "cut", [3])
    (run / "split.npz").write_bytes((run / "split.npz").read_bytes()[:100])
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cut/split.npz: not a readable split" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_whose_float_stage_has_not_finished_is_named(tmp_path: Path) -> None:
    """It used to be left out of the table silently, and --ensemble over it alone raised an AxisError."""
    done_run, unfinished = _run(tmp_path, "done", [3]), _run(tmp_path, "training", [3])
    (done_run / "float.h5").write_bytes(b"")
    for runs in ([unfinished], [done_run, unfinished]):
        done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--ensemble", *map(str, runs)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"{unfinished / 'float.h5'} not found" in done.stderr, done.stderr
        assert "float stage has not finished" in done.stderr and "Traceback" not in done.stderr
