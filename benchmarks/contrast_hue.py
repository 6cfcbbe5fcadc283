"""How far does the training's contrast jitter move the hue of real lesion images?

    python benchmarks/contrast_hue.py --data ../shared/data/ham10000

`qana train` jitters contrast by a factor drawn from 0.8-1.2. tf.image's contrast (the default,
`--contrast per-channel`) moves each channel about its own mean, which shifts a pixel's hue by an
amount set by the image's colour cast; `--contrast grey` (qana.augment.random_grey_contrast)
moves all channels about one grey level and keeps hue up to the clip at 255. This prints, for
both at the range's ends (0.8 and 1.2), how many degrees of hue the pixels of the decoded
images (at the model's input size) turn: percentiles and the share turning more than 5 degrees.
Only pixels whose hue means something are counted (saturation and value at least 0.1). The
functions measured are the ones training calls, followed by its clip. This is the measurement
behind the grey-contrast rule in NOTES.md (session 37).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qana.augment import CONTRASTS  # noqa: E402
from qana.data import load_dataset  # noqa: E402

FACTORS = (0.8, 1.2)  # the ends of make_dataset's contrast range
MEANINGFUL = 0.1  # least saturation and value of a pixel whose hue is counted
PERCENTILES = (50, 90, 99)
CHUNK = 512  # images per TensorFlow call


def hue_turns(images: np.ndarray, contrast: str, factor: float) -> np.ndarray:
    """Degrees of hue each meaningful pixel of `images` turns under one contrast at one factor."""
    import tensorflow as tf

    from qana.augment import random_grey_contrast

    turns = []
    for start in range(0, len(images), CHUNK):
        x = tf.constant(images[start:start + CHUNK], tf.float32)
        if contrast == "grey":  # per image, as the training pipeline maps it
            y = tf.map_fn(lambda im: random_grey_contrast(im, factor, factor), x)
        else:
            y = tf.image.adjust_contrast(x, factor)  # what tf.image.random_contrast applies
        y = tf.clip_by_value(y, 0.0, 255.0)
        before = tf.image.rgb_to_hsv(x / 255.0).numpy()
        after = tf.image.rgb_to_hsv(y / 255.0).numpy()
        keep = (before[..., 1] >= MEANINGFUL) & (before[..., 2] >= MEANINGFUL)
        d = np.abs(after[..., 0] - before[..., 0])[keep]
        turns.append(np.minimum(d, 1.0 - d) * 360.0)
    return np.concatenate(turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a HAM10000-style folder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    args = parser.parse_args()
    if args.limit < 0:
        sys.exit(f"error: --limit must be at least 0, not {args.limit}")
    images = load_dataset(args.data, size=args.image_size).images
    if args.limit:
        images = images[: args.limit]
    print(f"{len(images)} images at {args.image_size}x{args.image_size}; hue turn in degrees of pixels with saturation and value >= {MEANINGFUL}")
    print(f"{'contrast':12s} {'factor':>6s}  " + "  ".join(f"{'p' + str(p):>6s}" for p in PERCENTILES) + f"  {'> 5 deg':>8s}")
    for contrast in CONTRASTS:
        for factor in FACTORS:
            turns = hue_turns(images, contrast, factor)
            if not turns.size:
                sys.exit(f"error: no pixel of these {len(images)} images has saturation and value >= {MEANINGFUL}: no hue to measure")
            cells = "  ".join(f"{v:6.2f}" for v in np.percentile(turns, PERCENTILES))
            print(f"{contrast:12s} {factor:6.1f}  {cells}  {100 * np.mean(turns > 5):7.2f}%")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
