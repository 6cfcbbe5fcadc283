"""Compare `qana train` runs on the same lesion-grouped split: float and quantized Keras models
on validation and test. Used for the ablations in the README (e.g. attention vs none).

    python benchmarks/compare_runs.py --data ../shared/data/ham10000 runs/v2 runs/v2-noatt
    python benchmarks/compare_runs.py --data ../shared/data/ham10000 --views 8 --ensemble runs/a runs/b runs/c

`--views N` averages each model's logits over N flips/turns of every image (qana.views), as a
bundle with `test_time_views` does; `--ensemble` adds the float models' mean class probabilities
(what `qana train --teacher` distils); `--clinical-prior` adds each float model with the clinical
prior (qana.clinical), fitted on that run's training part and weighted on its validation part by
the same rule as `qana train`'s clinical stage.

All runs must have been made on the same data with the same seed (the script checks that their
splits are identical), so differences come from the model, not from the images.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from record_run import RecordError, read_split_indices  # noqa: E402  (no TensorFlow)


def require_float_models(runs: list[Path]) -> None:
    """Exit naming the first run without float.h5: its float stage has not finished. Such a run
    used to be left out of the table without a word (a comparison with one side missing), and
    `--ensemble` over no float model ended in an AxisError. A run without quantized.h5 (e.g.
    `--stop-after float`) is still compared on its float model."""
    for run in runs:
        if not (run / "float.h5").is_file():
            sys.exit(f"error: {run / 'float.h5'} not found: {run}'s float stage has not finished")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--views", type=int, default=1, choices=(1, 2, 4, 8), help="test-time views per image")
    parser.add_argument("--ensemble", action="store_true", help="also score the mean probabilities of all runs' float models")
    parser.add_argument("--clinical-prior", action="store_true", help="also score each float model with the clinical prior (age, sex, body site)")
    args = parser.parse_args()

    from qana import clinical
    from qana.classes import CLASS_NAMES
    from qana.head import softmax
    from qana.metrics import classification_metrics
    from qana.run_record import recorded_options
    from qana.train import load_float, load_quantized, load_split, run_dataset, selection_score
    from qana.views import keras_logits

    def row(name: str, described: str, part_name: str, model_name: str, labels: np.ndarray, pred: np.ndarray) -> None:
        m = classification_metrics(labels, pred, CLASS_NAMES)
        print(f"{name:28s} {described:52s} {part_name:5s} {model_name:9s} {m['top1']:6.3f} {m['macro_f1']:6.3f} {m['balanced_accuracy']:6.3f}")

    datasets: dict[tuple[int, str], object] = {}  # one decode per image size and preprocessing
    reference = None
    ensemble: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    labels: dict[str, np.ndarray] = {}
    print(f"{'run':28s} {'options':52s} {'part':5s} {'model':9s} {'top1':>6s} {'mF1':>6s} {'balAcc':>6s}")
    for run in args.runs:  # all splits first, before any model is loaded
        if not (run / "split.npz").is_file():
            sys.exit(f"error: {run / 'split.npz'} not found: {run} is not a `qana train` run whose split stage has finished")
        try:
            split = read_split_indices(run / "split.npz")
        except RecordError as exc:
            sys.exit(f"error: {exc}")
        if reference is None:
            reference = split
        elif any(not np.array_equal(reference[name], split[name]) for name in split):
            # every part: validation rows of runs with another --val-fraction would be other images
            sys.exit(f"error: {run} was split differently from {args.runs[0]}; compare runs with the same data, seed and --val-fraction")
    require_float_models(args.runs)
    for run in args.runs:
        opts = recorded_options(run, args.data)
        key = (opts.image_size, opts.colour_constancy)
        if key not in datasets:
            datasets[key] = run_dataset(opts)
        train, val, test_part = load_split(opts, datasets[key])
        described = f"{opts.target} w{opts.width} {opts.weight_bits}b att={opts.attention} ep={opts.epochs}"
        if opts.blocks != 1 or opts.zoom:
            described += f" blk={opts.blocks} zoom={opts.zoom}"
        if opts.affine:
            described += " +affine"
        if opts.contrast != "per-channel":
            described += f" contrast={opts.contrast}"
        if opts.mixup:
            described += f" mixup={opts.mixup}" + (f" for {opts.mixup_epochs} epochs" if opts.mixup_epochs is not None else "")
        if opts.saliency_teacher:
            described += " +saliency"
        if opts.colour_constancy != "none":
            described += f" cc={opts.colour_constancy}"
        if opts.class_weighting != "sqrt":
            described += f" cw={opts.class_weighting}"
        if opts.loss != "ce":
            described += f" loss={opts.loss}(gamma={opts.focal_gamma})"
        if opts.weight_ema:
            described += f" ema={opts.weight_ema}"
        if opts.teachers:
            described += f" distil({len(opts.teachers)})"
        if args.views > 1:
            described += f" views={args.views}"
        float_logits: dict[str, np.ndarray] = {}
        for part_name, part in (("val", val), ("test", test_part)):
            labels[part_name] = part.labels
            for model_name, loader in (("float", load_float), ("quantized", load_quantized)):
                if not (run / f"{model_name}.h5").exists():
                    continue  # only quantized.h5 can be missing here (require_float_models)
                logits = keras_logits(loader(opts), part.images, args.views)
                if model_name == "float":
                    ensemble[part_name].append(softmax(logits))
                    float_logits[part_name] = logits
                row(str(run), described, part_name, model_name, part.labels, logits.argmax(1))
        if args.clinical_prior and float_logits:
            encoded = {"val": clinical.encode_dataset(val), "test": clinical.encode_dataset(test_part)}
            prior = clinical.fit_prior(clinical.encode_dataset(train), train.labels, CLASS_NAMES, seed=opts.seed)
            prior, _ = clinical.choose_weight(prior, float_logits["val"], encoded["val"], val.labels, selection_score)
            for part_name, part in (("val", val), ("test", test_part)):
                adjusted = clinical.adjust(prior, float_logits[part_name], encoded[part_name])
                row(str(run), f"{described} prior w={prior.weight:g}", part_name, "float+pri", part.labels, adjusted.argmax(1))
    if args.ensemble:
        for part_name, probs in ensemble.items():
            described = f"mean probabilities of {len(probs)} runs" + (f" views={args.views}" if args.views > 1 else "")
            row("ensemble", described, part_name, "float", labels[part_name], np.mean(probs, axis=0).argmax(1))


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
