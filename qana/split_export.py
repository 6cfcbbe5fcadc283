"""One part of `qana train`'s lesion-grouped split, written out as its own HAM10000-style folder.

A bundle's test figures are only checkable by someone who can point `qana evaluate` at exactly
the images the bundle was never trained on. `qana train` recomputes its split from the data and
the seed (`qana.splits.train_val_test` over the readable images), so the same computation here
gives the same part; checked against the bundle's record of its split sizes, it cannot silently
give another one. The images are copied byte for byte (same content, so the same content hashes
and feature-cache entries) with their original metadata rows; the folder is what
`qana.data.load_dataset` reads, so `qana evaluate --data FOLDER --model BUNDLE` reproduces the
bundle's recorded test metrics.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qana.atomic import file_in_the_way
from qana.data import METADATA_FILE, Dataset, find_images, find_metadata, metadata_rows
from qana.imbalance import SEED_LIMIT
from qana.splits import VAL_FRACTION_RANGE, train_val_test

PARTS = ("train", "val", "test")

README = """# One part of a lesion-grouped HAM10000 split

{n} images: the `{part}` part of the split `qana train` makes with {settings}
(lesion-grouped, stratified by dx; `qana.splits.train_val_test`) of {source}. Files are
byte-for-byte copies; `{metadata}` holds their original metadata rows.
Made by: `{command}`

HAM10000: Tschandl, Rosendahl, Kittler, Scientific Data 5, 180161 (2018). Licence CC BY-NC 4.0.
"""


class SplitExportError(ValueError):
    """The part cannot be written as asked (bad part name, an occupied folder, a split that
    does not match the bundle it is meant to test)."""


def check_settings(part: str, val_fraction: float) -> None:
    """Refuse a part name or validation share `qana train` would not have used (before any data is read)."""
    if part not in PARTS:
        raise SplitExportError(f"unknown part {part!r} (use one of {', '.join(PARTS)})")
    low, high = VAL_FRACTION_RANGE
    if not low <= val_fraction <= high:
        raise SplitExportError(f"--val-fraction must be from {low:g} to {high:g}, as for `qana train`; got {val_fraction:g}")


def check_seed(seed: int) -> None:
    """The seeds `qana train` takes: 0 up to 2**32 - 1 (numpy's generators refuse the others)."""
    if not 0 <= seed < SEED_LIMIT:
        raise SplitExportError(f"--seed must be from 0 to {SEED_LIMIT - 1}, as for `qana train`; got {seed}")


def part_indices(dataset: Dataset, part: str, seed: int, val_fraction: float) -> np.ndarray:
    """Row indices of `part` in `dataset`: exactly `qana train`'s split for that seed and share."""
    check_settings(part, val_fraction)
    return dict(zip(PARTS, train_val_test(dataset.labels, dataset.lesion_ids, val_fraction, seed=seed)))[part]


def describe_settings(part: str, seed: int, val_fraction: float) -> str:
    """The settings the part depends on: the test part is the same whatever the validation share."""
    if part == "test":
        return f"seed {seed}, any validation share"
    return f"seed {seed} and validation share {val_fraction:g}"


def check_bundle_split(training: dict, dataset: Dataset, part: str, n_part: int) -> None:
    """Refuse a split that is not the one recorded in a bundle's `training` entry: other data
    (a different number of readable images) or other settings (a different part size)."""
    recorded = training.get("split")
    if not isinstance(recorded, dict) or part not in recorded or "n_images" not in recorded:
        raise SplitExportError("the bundle does not record its training split (made by another tool?); give --seed instead of --model")
    n_lesions = len(np.unique(dataset.lesion_ids))
    if int(recorded["n_images"]) != len(dataset) or int(recorded.get("n_lesions", n_lesions)) != n_lesions:
        raise SplitExportError(
            f"the bundle was trained on {recorded['n_images']} readable images of {recorded.get('n_lesions', '?')} lesions, "
            f"this folder has {len(dataset)} of {n_lesions}: its split cannot be reproduced from other data"
        )
    if int(recorded[part]) != n_part:
        hint = f"; its training command was: {training['command']}" if training.get("command") else ""
        raise SplitExportError(
            f"this {part} part has {n_part} images, the bundle's has {recorded[part]}: use the bundle's "
            f"--seed and --val-fraction{hint}"
        )


def check_new_folder(out: Path) -> None:
    """Refuse to write into a folder that already holds files (nothing stored there is
    overwritten), or below a file (which no folder can be made under)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SplitExportError(f"{out} already exists and is not an empty folder; choose a new --out")
    blocking = file_in_the_way(out.parent)
    if blocking is not None:
        raise SplitExportError(f"--out {out}: {blocking} is a file, not a folder")


def write_part(data: Path, image_ids: Sequence[str], out: Path, readme: str) -> int:
    """Copy the listed images and their metadata rows from `data` into a new folder `out`.

    Written into a hidden folder beside `out` and renamed into place at the end, so a failed
    copy (disk full, an image removed meanwhile) never leaves a part that looks complete."""
    check_new_folder(out)
    out = Path(os.path.realpath(out))  # a link to an empty folder: the part goes where it points
    header, rows = metadata_rows(find_metadata(data))
    files = find_images(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the part is meant to be shared
        (tmp / "images").mkdir()
        for image_id in image_ids:
            shutil.copyfile(files[image_id], tmp / "images" / files[image_id].name)
        with (tmp / METADATA_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows[image_id] for image_id in image_ids)
        # a path that is not valid UTF-8 (in the command or the source) is written as \x escapes
        (tmp / "README.md").write_text(readme, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, out)  # onto a missing or empty folder only (checked above)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(image_ids)


def export_part(
    data: Path, dataset: Dataset, out: Path, part: str, seed: int, val_fraction: float, command: str, training: dict | None = None
) -> int:
    """Write `part` of the split of `dataset` (loaded from `data`) to `out`; with a bundle's
    `training` record, only if the part is the one that bundle was split with."""
    index = part_indices(dataset, part, seed, val_fraction)
    if not len(index):
        raise SplitExportError(
            f"the {part} part of this split is empty ({len(dataset)} images of {len(set(dataset.lesion_ids))} lesions "
            f"are too few for a {part} share); nothing written"
        )
    if training is not None:
        check_bundle_split(training, dataset, part, len(index))
    readme = README.format(
        n=len(index), part=part, settings=describe_settings(part, seed, val_fraction), source=data, metadata=METADATA_FILE, command=command
    )
    return write_part(data, [str(i) for i in dataset.image_ids[index]], out, readme)
