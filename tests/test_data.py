"""Reading HAM10000 folders: layouts, corrupt and missing files, bad metadata, the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qana.data import DataError, load_dataset, read_metadata
from tests.synthetic import make_synthetic_ham


def test_reads_images_anywhere_below_the_folder(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=1)
    # The official layout splits images over two part folders.
    part2 = clinic.root / "HAM10000_images_part_2"
    part2.mkdir()
    moved = sorted((clinic.root / "images").glob("*.jpg"))[:10]
    for path in moved:
        shutil.move(str(path), part2 / path.name)
    ds = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    assert len(ds) == 30
    assert ds.images.shape == (30, 16, 16, 3) and ds.images.dtype == np.uint8
    assert set(ds.image_ids) == set(clinic.image_ids)
    assert ds.skipped == {}


def test_corrupt_and_missing_images_are_skipped_and_named(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=20, seed=2, n_corrupt=2, n_missing=1)
    ds = load_dataset(clinic.root, size=16, cache_dir=None)
    assert len(ds) == 20
    assert set(ds.skipped) == set(clinic.corrupt) | set(clinic.missing)
    for name in clinic.corrupt:
        assert ds.skipped[name].startswith("corrupt")
    for name in clinic.missing:
        assert ds.skipped[name].startswith("missing")


def test_upper_case_jpeg_is_read_and_other_formats_are_named(tmp_path: Path) -> None:
    """A camera export's .JPG is a JPEG like any other; a PNG is reported by its own name."""
    from PIL import Image

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, seed=4)
    first, second = sorted((clinic.root / "images").glob("*.jpg"))[:2]
    first.rename(first.with_suffix(".JPG"))
    with Image.open(second) as img:
        img.save(second.with_suffix(".png"))
    second.unlink()
    ds = load_dataset(clinic.root, size=16, cache_dir=None)
    assert first.stem in set(ds.image_ids)
    assert ds.skipped == {second.stem: f"missing: no JPEG file, only {second.stem}.png (images must be .jpg/.jpeg)"}


def test_labels_lesions_and_centres_are_kept(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=25, seed=3, centres=("a", "b"))
    ds = load_dataset(clinic.root, size=16, cache_dir=None)
    by_id = dict(zip(clinic.image_ids, zip(clinic.labels, clinic.lesion_ids)))
    for image_id, label, lesion in zip(ds.image_ids, ds.labels, ds.lesion_ids):
        assert ds.class_names[label] == by_id[image_id][0]
        assert lesion == by_id[image_id][1]
    assert set(ds.centres) <= {"a", "b"}


def test_missing_metadata_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metadata file not found"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="data folder not found"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "content, message",
    [
        ("image_id,dx\nISIC_1,nv\n", "missing column"),
        ("lesion_id,image_id,dx\nL1,ISIC_1,cancer\n", "unknown diagnosis"),
        ("lesion_id,image_id,dx\nL1,ISIC_1,nv\nL1,ISIC_1,nv\n", "listed twice"),
        ("lesion_id,image_id,dx\n", "no rows"),
        ("lesion_id,image_id,dx\n,ISIC_1,nv\n", "empty image_id or lesion_id"),
    ],
)
def test_malformed_metadata_names_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "HAM10000_metadata.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_metadata(path)


def test_metadata_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts the file with a BOM; the first column must still be lesion_id."""
    path = tmp_path / "HAM10000_metadata.csv"
    path.write_bytes("lesion_id,image_id,dx\nL1,ISIC_1,nv\n".encode("utf-8-sig"))
    [record] = read_metadata(path)
    assert (record.lesion_id, record.image_id) == ("L1", "ISIC_1")


def test_binary_metadata_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "HAM10000_metadata.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(DataError):
        read_metadata(path)


def test_second_load_uses_the_cache_not_the_jpegs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, seed=4)
    first = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a JPEG although it was cached")

    monkeypatch.setattr("qana.data.decode_image", no_decoding)
    second = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, second.images)


def test_cache_is_keyed_by_content_not_name(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, seed=5)
    before = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    # Replace one image's bytes under the same name: the cache must not serve the old pixels.
    paths = sorted((clinic.root / "images").glob("*.jpg"))
    other = paths[1].read_bytes()
    paths[0].write_bytes(other)
    after = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    index = list(after.image_ids).index(paths[0].stem)
    index1 = list(after.image_ids).index(paths[1].stem)
    np.testing.assert_array_equal(after.images[index], after.images[index1])
    assert after.content_hashes[index] != before.content_hashes[index]
