"""benchmarks/record_run.py: a finished run's small records, kept in git with its split's fingerprint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "record_run.py"


def _finished_run(root: Path, name: str, test: list[int]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    for file in ("bundle.json", "options.json", "quantized.json", "split.json"):
        (run / file).write_text(json.dumps({"file": file, "name": name}))
    np.savez(run / "split.npz", train=np.array([0, 1, 2]), val=np.array([3]), test=np.array(test), image_ids=np.array(["a", "b", "c", "d", "e"]))
    return run


def _record(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True, timeout=60)


def test_a_record_holds_the_files_and_the_splits_fingerprint(tmp_path: Path) -> None:
    records = tmp_path / "records"
    done = _record(_finished_run(tmp_path, "a-seed1", [4]), _finished_run(tmp_path / "x", "a-seed2", [4]), "--records", records)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (records / "a-seed1").iterdir()) == [
        "bundle.json", "options.json", "quantized.json", "split-indices.sha256", "split.json"]
    first, second = ((records / n / "split-indices.sha256").read_text().split()[0] for n in ("a-seed1", "a-seed2"))
    assert first == second and len(first) == 64  # the same indices: the same split, whatever else the file holds
    other = _record(_finished_run(tmp_path / "y", "b-seed1", [5]), "--records", records)
    assert other.returncode == 0
    assert (records / "b-seed1" / "split-indices.sha256").read_text().split()[0] != first
    assert "top1" not in done.stdout  # nothing of the metrics is shown


def test_unfinished_runs_and_other_records_are_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    records = tmp_path / "records"
    run = _finished_run(tmp_path, "a-seed1", [4])
    assert _record(run, "--records", records).returncode == 0
    assert _record(run, "--records", records).returncode == 0  # the same record again: left as it is
    (run / "bundle.json").write_text("{}")  # the run was redone since
    done = _record(run, "--records", records)
    assert done.returncode != 0 and "already holds another record (bundle.json differ)" in done.stderr, done.stderr
    assert json.loads((records / "a-seed1" / "bundle.json").read_text())["name"] == "a-seed1"  # the kept record is intact
    (run / "bundle.json").unlink()
    done = _record(run, "--records", records)
    assert done.returncode != 0 and "has no bundle.json" in done.stderr
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "split.npz").write_text("not a zip")
    for file in ("bundle.json", "options.json", "quantized.json", "split.json"):
        (tmp_path / "b" / file).write_text("{}")
    done = _record(tmp_path / "b", "--records", records)
    assert done.returncode != 0 and "not a readable split" in done.stderr, done.stderr
    assert not (records / "b").exists()


def test_a_cut_off_or_empty_split_is_named_not_a_traceback(tmp_path: Path) -> None:
    """np.load raises BadZipFile for a truncated .npz and EOFError for an empty one; both ended
    with a traceback."""
    records = tmp_path / "records"
    for name, cut in (("half", lambda data: data[: len(data) // 2]), ("empty", lambda data: b"")):
        run = _finished_run(tmp_path, name, [4])
        (run / "split.npz").write_bytes(cut((run / "split.npz").read_bytes()))
        done = _record(run, "--records", records)
        assert done.returncode == 2 and "split.npz: not a readable split" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not (records / name).exists()
