"""The embedded HAM10000 sample: a few hundred real images shipped inside the package, so the
main job (`qana-sim run` without --data) needs nothing but a fresh install.

The images come from the *test* part of the shipped model's lesion-grouped split (the backbone
never saw them), from all four source centres, centre-cropped and stored at 64x64 as JPEG
(quality 95: a re-encoding, so pixels differ slightly from decoding the 200x150 originals).
Licence: CC BY-NC 4.0, Tschandl et al. 2018 (see the README beside the images).

    python -m qana.sample --data ../shared/data/ham10000 --split runs/v2/split.npz --out qana/samples/ham10000-sample
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from qana.atomic import replace_directory
from qana.cli_errors import EXIT_ERROR, script_main
from qana.data import METADATA_FILE, decode_image, find_images, find_metadata, metadata_rows, read_metadata
from qana.head import NPZ_ERRORS

SAMPLE_DIR = Path(__file__).parent / "samples" / "ham10000-sample"

SAMPLE_README = """# Embedded HAM10000 sample

{n} real dermatoscopic images from HAM10000 (Tschandl, Rosendahl, Kittler, "The HAM10000
dataset, a large collection of multi-source dermatoscopic images of common pigmented skin
lesions", Scientific Data 5, 180161, 2018). Licence: CC BY-NC 4.0 (non-commercial use only).

Drawn (seed {seed}) from the lesion-grouped *test* part of the shipped model's split, so the
shipped backbone never trained on them; centre-cropped and stored at 64x64 (JPEG quality 95).
`HAM10000_metadata.csv` holds their original Dataverse metadata rows, including `dataset` (the
source centre). Made by: `{command}`.
"""


class SampleError(ValueError):
    """The inputs cannot make a sample; the message names the file and the problem."""


def test_part_ids(split_file: Path) -> set[str]:
    """The image ids of the test part a training run recorded in its split.npz."""
    try:
        with np.load(split_file) as z:
            return set(str(i) for i in z["image_ids"][z["test"]])
    except (*NPZ_ERRORS, IndexError) as exc:  # what reading a damaged .npz raises; IndexError: a mask of another length
        raise SampleError(f"{split_file}: not a readable split of a `qana train` run ({exc})") from None


def make_sample(data: Path, split_file: Path, out: Path, per_centre: int = 200, seed: int = 0, command: str = "") -> int:
    """Write the sample folder; returns the number of images. The folder is replaced whole
    (qana.atomic.replace_directory): a rerun with fewer images leaves none of the old ones behind,
    and a failure half-way leaves the previous sample as it was."""
    if per_centre < 1:
        raise SampleError(f"--per-centre must be at least 1, not {per_centre}")
    test_ids = test_part_ids(split_file)
    metadata = find_metadata(data)
    records = [r for r in read_metadata(metadata) if r.image_id in test_ids]
    header, rows = metadata_rows(metadata)
    files = find_images(data)
    rng = np.random.default_rng(seed)
    chosen = []
    for centre in sorted({r.centre for r in records}):
        members = [r for r in records if r.centre == centre and r.image_id in files]
        take = rng.permutation(len(members))[: min(per_centre, len(members))]
        chosen.extend(members[i] for i in sorted(take))
    if not chosen:
        raise SampleError(f"none of the {len(test_ids)} test images of {split_file} is in {data}: is it that run's data?")

    def build(folder: Path) -> None:
        (folder / "images").mkdir()
        for record in chosen:
            pixels = decode_image(files[record.image_id].read_bytes(), 64)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
            (folder / "images" / f"{record.image_id}.jpg").write_bytes(buf.getvalue())
        with (folder / METADATA_FILE).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            for record in chosen:
                writer.writerow(rows[record.image_id])
        (folder / "README.md").write_text(SAMPLE_README.format(n=len(chosen), seed=seed, command=command))

    replace_directory(out, build)
    return len(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="split.npz of the shipped model's training run")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--per-centre", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    command = (
        f"python -m qana.sample --data {args.data} --split {args.split} --out {args.out} "
        f"--per-centre {args.per_centre} --seed {args.seed}"
    )
    try:
        n = make_sample(args.data, args.split, args.out, args.per_centre, args.seed, command)
    except SampleError as exc:  # run as __main__, this module's class is not qana.sample's: named here
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{n} images written to {args.out}")
    return 0


if __name__ == "__main__":
    script_main(main)
