"""Inference speed of a bundle: Akida software backend vs the float Keras model, same 512 images.

    python benchmarks/inference.py [--model BUNDLE] [--data DIR] [--n 512] [--repeats 5]

Prints images/s for both (median of `repeats` timed passes over the same images, measured
side by side in one run), their ratio, model sizes in bytes and MACs per image. Timings on a
shared 2-core machine are noisy: compare the ratio, not absolute numbers across machines.
Without --data the images are random uint8 (speed does not depend on content).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qana.cli_errors import at_least  # noqa: E402


def keras_macs(model) -> int:
    """Multiply-accumulates per image of a tf_keras model's Conv/Depthwise/Separable/Dense layers."""
    import tf_keras as keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.SeparableConv2D):
            _, h, w, cout = layer.output_shape
            cin = layer.input_shape[-1]
            k = int(np.prod(layer.kernel_size))
            # depthwise at input resolution (pooling, if any, comes after), then pointwise
            hin, win = layer.input_shape[1:3]
            total += hin * win * k * cin + h * w * cin * cout
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output_shape
            total += h * w * int(np.prod(layer.kernel_size)) * c
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = layer.output_shape
            total += h * w * int(np.prod(layer.kernel_size)) * layer.input_shape[-1] * cout
        elif isinstance(layer, keras.layers.Dense):
            total += int(layer.input_shape[-1]) * layer.units
    return int(total)


def time_passes(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="bundle directory (default: shipped v2)")
    parser.add_argument("--data", type=Path, default=None, help="HAM10000-style folder (default: random images)")
    parser.add_argument("--n", type=at_least(1), default=512, help="images to time (default 512)")
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed passes; the median is reported")
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    args = parser.parse_args()

    import tf_keras as keras

    from qana.bundle import load_bundle, load_default_bundle
    from qana.runtime import AkidaRuntime
    from qana.preprocess import preprocess
    from qana.views import keras_logits

    bundle = load_bundle(args.model) if args.model else load_default_bundle("v2")
    size = bundle.input_shape[0]
    if args.data:
        from qana.data import load_dataset

        images = load_dataset(args.data, size=size).images[: args.n]
    else:
        images = np.random.default_rng(0).integers(0, 256, (args.n, size, size, 3)).astype(np.uint8)
    float_path = bundle.path / "float.h5"
    if not float_path.is_file():
        sys.exit(f"error: {bundle.path} does not carry float.h5; use a bundle written by `qana train`")
    float_model = keras.models.load_model(float_path, compile=False)
    runtime = AkidaRuntime(bundle, device="software")
    views = bundle.test_time_views  # both sides look at each image in as many orientations as the bundle asks

    def float_logits() -> np.ndarray:
        return keras_logits(float_model, preprocess(images, bundle.colour_constancy), views, batch_size=args.batch_size)  # as the runtime does

    t_akida = time_passes(lambda: runtime.logits(images, batch_size=args.batch_size), args.repeats)
    t_float = time_passes(float_logits, args.repeats)
    agree = float((runtime.logits(images).argmax(1) == float_logits().argmax(1)).mean())

    akida_ips, float_ips = len(images) / t_akida, len(images) / t_float
    print(f"bundle                 {bundle.path} (Akida {bundle.target}, {bundle.manifest.get('bits', {})})")
    print(f"images                 {len(images)} x {size}x{size}x3 uint8 ({'HAM10000 ' + str(args.data) if args.data else 'random'}), median of {args.repeats} passes")
    print(f"test-time views        {views} (backbone passes per image, on both sides)")
    print(f"akida software backend {akida_ips:10.1f} images/s")
    print(f"float keras (TF, CPU)  {float_ips:10.1f} images/s")
    print(f"ratio akida/float      {akida_ips / float_ips:10.2f}")
    print(f"model size bytes       akida .fbz {bundle.model_path.stat().st_size}   float .h5 {float_path.stat().st_size}")
    print(f"MACs per image         akida {runtime.model.macs * views}   float keras {keras_macs(float_model) * views}")
    print(f"top-1 agreement akida vs float on these images: {agree:.3f}")
    print("energy/latency on AKD1000 hardware: not measured here (no Akida device; model.statistics needs one)")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
