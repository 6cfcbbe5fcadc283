"""Where does the Akida backbone depart from the quantized Keras model? Its features, side by side.

    python benchmarks/feature_saturation.py runs/ssl-seed3 [--data ../shared/data/ham10000] [--images 200]
                                            [--part test|val] [--requantize | --reconvert]

The converted model should compute what the quantized Keras model computes, in integers: on
Akida 2.0 the backbone's features (the pooled output of `last_conv`) are integers in units of
the bundle's feature scale (1/64), so Akida feature = 64 x Keras feature, exactly, if the
conversion is faithful. This script runs one view of the first test images of a finished `qana
train` run through both and prints, per band of Keras feature value, the mean Akida / Keras
ratio and the largest Akida value: a ratio under 64 in the upper bands means Akida saturates
features the Keras model (and so QAT) lets grow, which is where the chip's predictions part
from the quantized model's. Needs the run directory (quantized.h5, akida/model.fbz, split.npz).

`--requantize` compares instead a model quantized now from the run's float model, by today's
`qana.convert.quantize_model` and calibrated as the quantized stage does (no fine-tuning), then
converted: how the current quantization settings would have fared on that run. It also prints
the converted `last_conv`'s input shift and the quantized-vs-Akida agreement of predictions.

`--reconvert` keeps the run's own quantized model and converts it now with today's
`qana.convert.convert_checked` (session 25: output rescales below shift -24 rewritten, see
`qana.convert.keep_output_headroom`): how today's conversion fares on that very model.
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


def keras_logits_batched(qmodel, images: np.ndarray, batch: int = 25) -> np.ndarray:
    """The quantized model's logits, called in small batches (see `keras_features`)."""
    import tensorflow as tf

    outs = []
    for start in range(0, len(images), batch):
        out = qmodel(tf.constant(images[start : start + batch].astype(np.float32)), training=False)
        outs.append(out.to_float().numpy() if hasattr(out, "to_float") else np.asarray(out))
    return np.concatenate(outs)


def last_conv_shifts(model_path: Path) -> tuple[int, dict[int, int]]:
    """The converted `last_conv`: input channels cnn2snn shifts to align their scales, and its
    output channels per output rescale shift (below -24 they saturate early)."""
    import akida

    layer = akida.Model(str(model_path)).get_layer("last_conv")
    shifts, counts = np.unique(np.asarray(layer.get_variable("output_shift")).astype(int), return_counts=True)
    return int((layer.get_variable("input_shift") > 0).sum()), {int(s): int(c) for s, c in zip(shifts, counts)}


def requantized(opts, train):
    """The run's float model quantized and calibrated now, as `qana train`'s quantized stage does, and converted."""
    import tempfile

    from qana.convert import convert_checked, quantize_model
    from qana.train import calibration_images, load_float, set_seeds

    set_seeds(opts.seed)
    qmodel = quantize_model(load_float(opts), opts.quant_spec(), calibration_images(opts, train))
    folder = Path(tempfile.mkdtemp(prefix="feature-saturation-"))
    convert_checked(qmodel, opts.target).save(str(folder / "model.fbz"))
    return qmodel, folder


def reconverted(qmodel):
    """The run's own quantized model converted now, with today's conversion checks and rewrites."""
    import tempfile

    from qana.convert import convert_checked

    folder = Path(tempfile.mkdtemp(prefix="feature-saturation-"))
    convert_checked(qmodel, "v2").save(str(folder / "model.fbz"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `qana train` run directory (v2 target)")
    parser.add_argument("--data", type=Path, default=SHARED_HAM)
    parser.add_argument("--images", type=int, default=200, help="first N images of the part (default 200)")
    parser.add_argument("--part", choices=("test", "val"), default="test", help="the run's split part (default test)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--requantize", action="store_true", help="quantize the run's float model now (calibration only) and compare that")
    source.add_argument("--reconvert", action="store_true", help="convert the run's own quantized model now and compare that")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")

    from qana.data import load_dataset
    from qana.run_record import recorded_options
    from qana.train import _akida_runtime, akida_head_logits, load_quantized, load_split

    opts = recorded_options(args.run, args.data)
    if opts.target != "v2":
        parser.error(f"{args.run} is a {opts.target} run; the feature scale compared here is Akida 2.0's")
    dataset = load_dataset(opts.data, size=opts.image_size, cache_dir=opts.cache_dir)
    train, val, test = load_split(opts, dataset)
    images = (test if args.part == "test" else val).images[: args.images]
    if args.requantize:
        qmodel, akida_dir = requantized(opts, train)
    elif args.reconvert:
        qmodel = load_quantized(opts)
        akida_dir = reconverted(qmodel)
    else:
        qmodel, akida_dir = load_quantized(opts), args.run / "akida"
    chip = _akida_runtime(opts, akida_dir, views=1).features(images).reshape(len(images), -1).astype(np.float64)
    keras = keras_features(qmodel, images)

    fit = float((chip * keras).sum() / (keras * keras).sum())
    residual = float(np.linalg.norm(chip - fit * keras) / np.linalg.norm(fit * keras))
    if args.requantize:
        which = "the run's float model quantized now (calibration only) and converted now"
    elif args.reconvert:
        which = "the run's own quantized model, converted now"
    else:
        which = "the run's own quantized and Akida models"
    print(f"{args.run}: {which}; {len(images)} {args.part} images, one view, {keras.shape[1]} features")
    shifted_inputs, output_shifts = last_conv_shifts(akida_dir / "model.fbz")
    print(f"last_conv input shift on {shifted_inputs} input channel(s)")
    print(f"last_conv output channels per output shift: {output_shifts}")
    agreement = float((keras_logits_batched(qmodel, images).argmax(1) == akida_head_logits(akida_dir / "model.fbz", chip).argmax(1)).mean())
    print(f"quantized vs Akida predictions agree on {agreement:.2%}")
    print(f"least-squares Akida = {fit:.2f} x Keras (faithful: 64), relative residual {residual:.3f}")
    print("Keras feature band | values | mean Akida / Keras | largest Akida value")
    for low, high in BANDS:
        band = (keras >= low) & (keras < high)
        if band.any():
            ratio = chip[band].mean() / keras[band].mean()
            print(f"[{low:g}, {high:g}) | {int(band.sum())} | {ratio:.2f} | {chip[band].max():g}")
    return 0


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
