"""Where does the Akida backbone depart from the quantized Keras model? Its features, side by side.

    python benchmarks/feature_saturation.py runs/ssl-seed3 [--data ../shared/data/ham10000] [--images 200]

The converted model should compute what the quantized Keras model computes, in integers: on
Akida 2.0 the backbone's features (the pooled output of `last_conv`) are integers in units of
the bundle's feature scale (1/64), so Akida feature = 64 x Keras feature, exactly, if the
conversion is faithful. This script runs one view of the first test images of a finished `qana
train` run through both and prints, per band of Keras feature value, the mean Akida / Keras
ratio and the largest Akida value: a ratio under 64 in the upper bands means Akida saturates
features the Keras model (and so QAT) lets grow, which is where the chip's predictions part
from the quantized model's. Needs the run directory (quantized.h5, akida/model.fbz, split.npz).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED_HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
BANDS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0), (1.0, float("inf")))


def keras_features(qmodel, images: np.ndarray, batch: int = 25) -> np.ndarray:
    """Input of the quantized model's head layer, as floats.

    Called layer by layer in small batches: `predict` on a quantizeml sub-model concatenates
    FixedPoint outputs, which quantizeml refuses for more than two batches.
    """
    import tensorflow as tf
    import tf_keras as keras

    head = [layer for layer in qmodel.layers if "Dense" in type(layer).__name__][-1]
    sub = keras.Model(qmodel.input, head.input)
    outs = []
    for start in range(0, len(images), batch):
        out = sub(tf.constant(images[start : start + batch].astype(np.float32)), training=False)
        outs.append(out.to_float().numpy() if hasattr(out, "to_float") else np.asarray(out))
    return np.concatenate(outs).reshape(len(images), -1).astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `qana train` run directory (v2 target)")
    parser.add_argument("--data", type=Path, default=SHARED_HAM)
    parser.add_argument("--images", type=int, default=200, help="first N test images (default 200)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")

    from qana.data import load_dataset
    from qana.train import _akida_runtime, load_quantized, load_split, recorded_options

    opts = recorded_options(args.run, args.data)
    if opts.target != "v2":
        parser.error(f"{args.run} is a {opts.target} run; the feature scale compared here is Akida 2.0's")
    dataset = load_dataset(opts.data, size=opts.image_size, cache_dir=opts.cache_dir)
    _, _, test = load_split(opts, dataset)
    images = test.images[: args.images]
    chip = _akida_runtime(opts, args.run / "akida", views=1).features(images).reshape(len(images), -1).astype(np.float64)
    keras = keras_features(load_quantized(opts), images)

    fit = float((chip * keras).sum() / (keras * keras).sum())
    residual = float(np.linalg.norm(chip - fit * keras) / np.linalg.norm(fit * keras))
    print(f"{args.run}: {len(images)} test images, one view, {keras.shape[1]} features")
    print(f"least-squares Akida = {fit:.2f} x Keras (faithful: 64), relative residual {residual:.3f}")
    print("Keras feature band | values | mean Akida / Keras | largest Akida value")
    for low, high in BANDS:
        band = (keras >= low) & (keras < high)
        if band.any():
            ratio = chip[band].mean() / keras[band].mean()
            print(f"[{low:g}, {high:g}) | {int(band.sum())} | {ratio:.2f} | {chip[band].max():g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
