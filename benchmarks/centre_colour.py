"""How differently do the centres' cameras colour their images, before and after colour constancy?

    python benchmarks/centre_colour.py --data ../shared/data/ham10000

Prints, per source centre (the metadata's `dataset` column), the number of images and their mean
R/G/B at the model's input size, as decoded and after each colour constancy of qana.preprocess.
A spread between centres that colour constancy removes is a cue a model could learn instead of
the lesion (each centre has its own mix of diagnoses); this is the measurement behind the README's
colour-constancy paragraph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from qana.data import load_dataset  # noqa: E402
from qana.preprocess import COLOUR_CONSTANCY, preprocess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a HAM10000-style folder")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    dataset = load_dataset(args.data, size=args.image_size)
    print(f"{'centre':22s} {'images':>6s}  " + "  ".join(f"{name + ' R/G/B':>26s}" for name in COLOUR_CONSTANCY))
    for centre in sorted(set(dataset.centres.tolist())):
        images = dataset.images[dataset.centres == centre]
        means = [preprocess(images, name).reshape(-1, 3).mean(0) for name in COLOUR_CONSTANCY]
        print(f"{centre:22s} {len(images):6d}  " + "  ".join(f"{'/'.join(f'{v:5.1f}' for v in m):>26s}" for m in means))


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
