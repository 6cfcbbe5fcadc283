"""`qana split`: one part of `qana train`'s split as its own folder, exactly, and refusals that lose nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from synthetic import as_dataverse_tab, make_synthetic_ham
from typer.testing import CliRunner

from qana.cli import app
from qana.data import METADATA_FILE, load_dataset
from qana.split_export import SplitExportError, check_bundle_split
from qana.splits import train_val_test

runner = CliRunner()
SHIPPED_V2 = Path(__file__).resolve().parents[1] / "qana" / "bundles" / "v2"


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    return make_synthetic_ham(tmp_path_factory.mktemp("split") / "data", n_images=90, image_size=32, seed=5, n_corrupt=2)


def _rows(folder: Path) -> dict[str, dict]:
    with (folder / METADATA_FILE).open(newline="") as handle:
        return {row["image_id"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("part, number", [("test", 2), ("val", 1)])
def test_the_part_is_training_s_split_copied_byte_for_byte(clinic, private_cache, tmp_path: Path, part: str, number: int) -> None:
    out = tmp_path / part
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(out), "--part", part, "--seed", "3", "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 image(s)" in result.output  # the corrupt files are reported, as training reports them

    full = load_dataset(clinic.root, size=32, cache_dir=None)
    parts = train_val_test(full.labels, full.lesion_ids, 0.2, seed=3)
    expected = full.image_ids[parts[number]]
    written = load_dataset(out, size=32, cache_dir=None)
    assert sorted(written.image_ids) == sorted(expected)
    assert not set(written.lesion_ids) & set(full.lesion_ids[parts[0]])  # no lesion shared with training
    for image_id in expected:
        assert (out / "images" / f"{image_id}.jpg").read_bytes() == (clinic.root / "images" / f"{image_id}.jpg").read_bytes()
    original = _rows(clinic.root)
    assert all(row == original[image_id] for image_id, row in _rows(out).items())
    assert "qana split" in (out / "README.md").read_text()


def test_refusals_are_one_line_errors_and_keep_what_is_stored(clinic, private_cache, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(occupied)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"

    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "a"), "--part", "holdout"])
    assert result.exit_code == 2 and "unknown part 'holdout'" in result.output
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "b"), "--val-fraction", "0.9"])
    assert result.exit_code == 2 and "--val-fraction must be from 0.02 to 0.5" in result.output
    result = runner.invoke(app, ["split", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "data folder not found" in result.output
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "d"), "--seed", "-1"])
    assert result.exit_code == 2 and "--seed must be from 0 to 4294967295" in result.output
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "d"), "--seed", str(2**32)])
    assert result.exit_code == 2 and "--seed must be from 0 to 4294967295" in result.output  # helper-30 P16
    assert not (tmp_path / "d").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(a_file / "part")])
    assert result.exit_code == 2 and f"{a_file} is a file, not a folder" in result.output
    assert a_file.read_text() == "keep me"


def test_a_copy_that_fails_half_way_leaves_no_part(clinic, private_cache, tmp_path: Path, monkeypatch) -> None:
    """A part that looks complete but is not would be evaluated as if it were the bundle's test set."""
    import shutil

    from qana import split_export

    copied = []
    real_copy = shutil.copyfile

    def copy_then_fail(source, target):
        if len(copied) == 3:
            raise OSError(28, "No space left on device")
        copied.append(target)
        return real_copy(source, target)

    monkeypatch.setattr(split_export.shutil, "copyfile", copy_then_fail)
    out = tmp_path / "part"
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(out)])
    assert result.exit_code == 2 and "No space left on device" in result.output and len(copied) == 3
    assert "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".part")]


def test_a_bundle_s_split_is_reproduced_or_refused(clinic, private_cache, tmp_path: Path) -> None:
    # the shipped v2 bundle records seed 0 and its split sizes on the 8,584-image HAM10000
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "a"), "--model", str(SHIPPED_V2), "--seed", "3"])
    assert result.exit_code == 2 and "--seed 3 differs from the bundle's split seed 0" in result.output
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "b"), "--model", str(SHIPPED_V2)])
    assert result.exit_code == 2 and "trained on 8584 readable images" in result.output
    assert not (tmp_path / "b").exists()

    dataset = load_dataset(clinic.root, size=32, cache_dir=None)
    train, val, test = (len(p) for p in train_val_test(dataset.labels, dataset.lesion_ids, 0.2, seed=0))
    record = {"n_images": len(dataset), "n_lesions": len(np.unique(dataset.lesion_ids)), "train": train, "val": val, "test": test}
    check_bundle_split({"split": record}, dataset, "val", val)  # the bundle's own split passes
    with pytest.raises(SplitExportError, match=f"this val part has {val + 1} images, the bundle's has {val}.*--val-fraction 0.2"):
        check_bundle_split({"split": record, "command": "qana train --val-fraction 0.2"}, dataset, "val", val + 1)
    with pytest.raises(SplitExportError, match="does not record its training split"):
        check_bundle_split({"command": "python tests/fixtures/make_tiny_bundle.py"}, dataset, "test", test)


def test_a_trailing_comma_is_copied_without_it_and_a_misaligned_row_is_refused(private_cache, tmp_path: Path) -> None:
    """A spreadsheet's trailing comma made `qana split` crash with a traceback (helper-15) while
    `qana evaluate` accepted the file; a non-empty extra field means the columns are shifted."""
    data = make_synthetic_ham(tmp_path / "data", n_images=40, image_size=32, seed=8).root
    metadata = data / METADATA_FILE
    lines = metadata.read_text().splitlines()
    metadata.write_text("\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n")
    out = tmp_path / "part"
    result = runner.invoke(app, ["split", "--data", str(data), "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert all(None not in row and row["dx"] for row in _rows(out).values())
    lines[3] = lines[3] + ",shifted"
    metadata.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["split", "--data", str(data), "--out", str(tmp_path / "again")])
    assert result.exit_code == 2 and f"{METADATA_FILE}:4: 1 more field(s)" in result.output and "'shifted'" in result.output


def test_a_part_of_a_dataverse_tab_folder_is_written_as_csv(private_cache, tmp_path: Path) -> None:
    """Rows copied from Dataverse's tab-separated metadata land in the part's CSV as they were."""
    clinic = make_synthetic_ham(tmp_path / "data", n_images=40, image_size=32, seed=9)
    original = _rows(clinic.root)
    as_dataverse_tab(clinic)
    out = tmp_path / "part"
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(out), "--seed", "2"])
    assert result.exit_code == 0, result.output
    written = _rows(out)
    assert written and all(row == original[image_id] for image_id, row in written.items())
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(written)


def test_an_empty_part_is_refused_not_written(private_cache, tmp_path: Path) -> None:
    data = make_synthetic_ham(tmp_path / "data", n_images=3, image_size=32, seed=9).root
    out = tmp_path / "tiny-test"
    result = runner.invoke(app, ["split", "--data", str(data), "--out", str(out), "--part", "val", "--val-fraction", "0.05"])
    assert result.exit_code == 2 and "the val part of this split is empty" in result.output, result.output
    assert not out.exists()


def test_a_link_to_an_empty_folder_and_a_name_that_is_not_utf8(clinic, private_cache, tmp_path: Path) -> None:
    """helper-30 P6/P7: both copied every image, then failed (a traceback for the second)."""
    import os
    import subprocess
    import sys

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = runner.invoke(app, ["split", "--data", str(clinic.root), "--out", str(tmp_path / "link")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / METADATA_FILE).is_file()
    odd = os.fsencode(str(tmp_path)) + b"/part-\xff"  # as a shell passes it: bytes, not text
    done = subprocess.run([sys.executable, "-m", "qana.cli", "split", "--data", str(clinic.root), "--out", odd], capture_output=True, timeout=300)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    odd = Path(os.fsdecode(odd))
    assert (odd / METADATA_FILE).is_file() and "Made by" in (odd / "README.md").read_text(encoding="utf-8")
