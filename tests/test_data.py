"""Reading HAM10000 folders: layouts, corrupt and missing files, bad metadata, the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qana.data import DataError, find_metadata, load_dataset, metadata_rows, read_metadata
from tests.synthetic import as_dataverse_tab, make_synthetic_ham


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


def test_a_clinic_s_own_image_names_are_read_when_the_metadata_lists_them(tmp_path: Path) -> None:
    """A clinic adding its own images (metadata rows plus JPEGs) need not rename them ISIC_*."""
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=2)
    first = clinic.image_ids[0]
    (clinic.root / "images" / f"{first}.jpg").rename(clinic.root / "images" / "IMG_0001.jpg")
    meta = clinic.root / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(f",{first},", ",IMG_0001,"))
    (clinic.root / "images" / "IMG_0002.jpg").write_bytes((clinic.root / "images" / f"{clinic.image_ids[1]}.jpg").read_bytes())
    ds = load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    assert "IMG_0001" in set(ds.image_ids) and len(ds) == 12
    assert ds.skipped == {}  # a JPEG the metadata does not list, not named ISIC_*, is not the data's business


def test_corrupt_and_missing_images_are_skipped_and_named(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=20, seed=2, n_corrupt=2, n_missing=1)
    ds = load_dataset(clinic.root, size=16, cache_dir=None)
    assert len(ds) == 20
    assert set(ds.skipped) == set(clinic.corrupt) | set(clinic.missing)
    for name in clinic.corrupt:  # the synthetic "corrupt" files are text: named, with their path
        assert ds.skipped[name].startswith(("corrupt image: ", "not a JPEG image: ")) and f"{name}.jpg" in ds.skipped[name]
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
    with pytest.raises(DataError, match="metadata file not found.*HAM10000_metadata.csv .*HAM10000_metadata.tab"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="data folder not found"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["HAM10000_metadata.tab", "HAM10000_metadata"])
def test_dataverse_s_tab_separated_metadata_reads_like_the_csv(tmp_path: Path, name: str) -> None:
    """Harvard Dataverse's download button and API give the metadata as a tab-separated .tab
    (some scripts save it without an extension); before, only the CSV was looked for."""
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=14, image_size=32, seed=6, centres=("a", "b"), n_corrupt=1)
    lines = clinic.metadata.read_text().splitlines()
    fields = lines[1].split(",")
    fields[4] = ""  # a missing age, as 57 of HAM10000's rows have
    no_age = fields[1]
    clinic.metadata.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    from_csv = load_dataset(clinic.root, cache_dir=None)
    header, rows = metadata_rows(clinic.metadata)
    tab = as_dataverse_tab(clinic, name)
    assert '"' in tab.read_text() and "," not in tab.read_text().splitlines()[1]
    assert find_metadata(clinic.root) == tab
    from_tab = load_dataset(clinic.root, cache_dir=None)
    for column in ("image_ids", "labels", "lesion_ids", "centres", "ages", "sexes", "sites", "images"):
        assert np.array_equal(getattr(from_tab, column), getattr(from_csv, column)), column
    assert from_tab.skipped == from_csv.skipped and len(from_tab.skipped) == 1
    assert metadata_rows(tab) == (header, rows)
    assert from_tab.ages is not None and from_tab.ages[list(from_tab.image_ids).index(no_age)] == ""


def test_a_csv_beside_a_tab_is_the_one_read(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=8, image_size=32, seed=7)
    csv_text = clinic.metadata.read_text()
    as_dataverse_tab(clinic)
    clinic.metadata.write_text("\n".join(csv_text.splitlines()[:4]) + "\n")  # a CSV of three rows beside the full .tab
    assert find_metadata(clinic.root) == clinic.metadata
    assert len(load_dataset(clinic.root, cache_dir=None)) == 3


def test_a_shifted_row_in_a_tab_file_names_the_tab(tmp_path: Path) -> None:
    path = tmp_path / "HAM10000_metadata.tab"
    path.write_text('lesion_id\timage_id\tdx\n"L1"\t"ISIC_1"\t"nv"\t"extra"\n')
    with pytest.raises(DataError, match="HAM10000_metadata.tab:2: 1 more field.*'extra'.*is a tab inside a value"):
        read_metadata(path)


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


def test_a_cache_entry_reaches_the_disk_before_it_gets_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After a power cut a renamed but unflushed entry can keep its header and lose its pixels,
    # and would then load as a black image. Each entry must be fsynced, whole, before the rename.
    import os

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=3, seed=6)
    synced: list[int] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    def replace(src, dst) -> None:
        assert synced and synced[-1] == os.path.getsize(src), f"{src} renamed before its content was flushed"
        synced.clear()
        real_replace(src, dst)

    monkeypatch.setattr("qana.data.os.fsync", fsync)
    monkeypatch.setattr("qana.data.os.replace", replace)
    load_dataset(clinic.root, size=16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def _one_image_folder(root: Path, n: int = 4) -> list[Path]:
    clinic = make_synthetic_ham(root, n_images=n, seed=7)
    return sorted((clinic.root / "images").glob("*.jpg"))


def test_an_unwritable_cache_is_switched_off_with_a_warning_not_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A file where the cache folder belongs (as a read-only or full disk would): before, an OSError
    # from the cache stopped the load, and `qana evaluate` printed a traceback.
    _one_image_folder(tmp_path / "ham")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    with caplog.at_level("WARNING", logger="qana.data"):
        ds = load_dataset(tmp_path / "ham", size=16, cache_dir=blocker)
    assert len(ds) == 4 and ds.skipped == {}
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1  # once, not per image
    assert blocker.read_text() == "not a folder"


def test_empty_and_non_jpeg_files_are_named_with_their_path(tmp_path: Path) -> None:
    from PIL import Image

    paths = _one_image_folder(tmp_path / "ham")
    paths[0].write_bytes(b"")
    # A 16-bit PNG named .jpg: before, it was decoded (to a nearly all-white image) and used.
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(paths[1], format="PNG")
    ds = load_dataset(tmp_path / "ham", size=16, cache_dir=None)
    assert ds.skipped[paths[0].stem] == f"empty file: {paths[0]}"
    assert ds.skipped[paths[1].stem] == f"not a JPEG image: {paths[1]}"
    assert "BytesIO" not in " ".join(ds.skipped.values())
    assert len(ds) == 2


def test_when_no_image_can_be_read_the_error_says_why(tmp_path: Path) -> None:
    paths = _one_image_folder(tmp_path / "ham", n=3)
    for path in paths:
        path.unlink()
    (tmp_path / "ham" / "HAM10000_images_part_1.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"missing: no image file found.*unpack HAM10000_images_part_1.zip first"):
        load_dataset(tmp_path / "ham", size=16, cache_dir=None)


def test_copies_of_one_image_that_differ_are_skipped_and_named(tmp_path: Path) -> None:
    paths = _one_image_folder(tmp_path / "ham")
    other = tmp_path / "ham" / "HAM10000_images_part_1"
    other.mkdir()
    shutil.copy(paths[0], other / paths[0].name)  # the same bytes twice: harmless
    (other / paths[1].name).write_bytes(b"")  # an empty copy must not hide (or replace) the good one silently
    ds = load_dataset(tmp_path / "ham", size=16, cache_dir=None)
    assert paths[0].stem in set(ds.image_ids)
    reason = ds.skipped[paths[1].stem]
    assert reason.startswith("conflicting copies") and f"images/{paths[1].name}" in reason and f"HAM10000_images_part_1/{paths[1].name}" in reason
    assert len(ds) == 3


def test_metadata_errors_name_the_physical_line_and_repeated_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "HAM10000_metadata.csv"
    csv_path.write_text('lesion_id,image_id,dx,localization\n\nL1,ISIC_1,nv,"lower\nback"\n\nL2,ISIC_2,melanoma,back\n')
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv:6: unknown diagnosis 'melanoma'"):
        read_metadata(csv_path)
    csv_path.write_text("lesion_id,image_id,dx,dx\nL1,ISIC_1,nv,mel\n")
    with pytest.raises(DataError, match="column.s. dx appear more than once"):
        read_metadata(csv_path)


def test_an_empty_cache_variable_does_not_put_the_cache_in_the_working_folder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "QANA_CACHE_DIR": ""}
    out = subprocess.run(
        [sys.executable, "-c", "import qana.data; print(qana.data.DEFAULT_CACHE_DIR)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == str(Path.home() / ".cache" / "qana")


def test_images_in_a_linked_folder_are_found_and_a_dangling_link_is_named(tmp_path: Path) -> None:
    # A clinic keeping its images on another disk links them in; before, rglob did not follow the
    # link and no image was found. A link loop must not hang the walk.
    paths = _one_image_folder(tmp_path / "ham")
    elsewhere = tmp_path / "other-disk"
    shutil.move(str(tmp_path / "ham" / "images"), elsewhere)
    (tmp_path / "ham" / "images").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(tmp_path / "ham", target_is_directory=True)
    gone = elsewhere / paths[0].name
    gone.rename(tmp_path / "moved-away.jpg")
    gone.symlink_to(tmp_path / "nowhere.jpg")
    ds = load_dataset(tmp_path / "ham", size=16, cache_dir=None)
    assert len(ds) == 3
    assert ds.skipped[paths[0].stem].startswith("missing: ") and "nowhere.jpg" in ds.skipped[paths[0].stem]
