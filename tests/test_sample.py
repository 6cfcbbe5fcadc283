"""qana.sample (the maintainer's tool that made the embedded sample): a rerun replaces the folder
whole, and unusable inputs are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qana.sample import SampleError, make_sample
from tests.synthetic import as_dataverse_tab, make_synthetic_ham


def _split(path: Path, image_ids: list[str], test: list[int]) -> Path:
    mask = np.zeros(len(image_ids), dtype=bool)
    mask[test] = True
    np.savez(path, image_ids=np.array(image_ids), test=mask)
    return path


def test_a_rerun_replaces_the_sample_whole(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=20, image_size=40, seed=1, centres=("a", "b"))
    ids = sorted(p.stem for p in (clinic.root / "images").glob("ISIC_*.jpg"))
    split = _split(tmp_path / "split.npz", ids, list(range(12)))
    out = tmp_path / "sample"
    assert make_sample(clinic.root, split, out, per_centre=5) == 10
    first = sorted(p.name for p in (out / "images").iterdir())
    assert make_sample(clinic.root, split, out, per_centre=2) == 4
    kept = sorted(p.name for p in (out / "images").iterdir())
    assert len(kept) == 4 and len(first) == 10  # before: the six others stayed, unlisted in the metadata
    assert len((out / "HAM10000_metadata.csv").read_text().splitlines()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ham", "sample", "split.npz"]


def test_a_dataverse_tab_source_gives_the_same_sample(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=20, image_size=40, seed=3, centres=("a", "b"))
    ids = sorted(p.stem for p in (clinic.root / "images").glob("ISIC_*.jpg"))
    split = _split(tmp_path / "split.npz", ids, list(range(12)))
    assert make_sample(clinic.root, split, tmp_path / "from-csv", per_centre=4) == 8
    as_dataverse_tab(clinic)
    assert make_sample(clinic.root, split, tmp_path / "from-tab", per_centre=4) == 8
    for name in ("HAM10000_metadata.csv", "README.md"):
        assert (tmp_path / "from-tab" / name).read_bytes() == (tmp_path / "from-csv" / name).read_bytes()


def test_unusable_inputs_are_named(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=2)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SampleError, match="bad.npz: not a readable split"):
        make_sample(clinic.root, tmp_path / "bad.npz", tmp_path / "out")
    other = _split(tmp_path / "other.npz", ["ISIC_9999999"], [0])
    with pytest.raises(SampleError, match="is in .*is it that run's data"):
        make_sample(clinic.root, other, tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-m", "qana.sample", "--data", str(clinic.root), "--split", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
