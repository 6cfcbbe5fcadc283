"""Compare `qana train` runs on the same lesion-grouped split: float and quantized Keras models
on validation and test. Used for the ablations in the README (e.g. attention vs none).

    python benchmarks/compare_runs.py --data ../shared/data/ham10000 runs/v2 runs/v2-noatt

All runs must have been made on the same data with the same seed (the script checks that their
splits are identical), so differences come from the model, not from the images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    from qana.classes import CLASS_NAMES
    from qana.data import load_dataset
    from qana.metrics import classification_metrics
    from qana.train import TrainOptions, load_float, load_quantized, load_split

    dataset = load_dataset(args.data)
    reference = None
    print(f"{'run':28s} {'options':52s} {'part':5s} {'model':9s} {'top1':>6s} {'mF1':>6s} {'balAcc':>6s}")
    for run in args.runs:
        options = json.loads((run / "options.json").read_text())
        with np.load(run / "split.npz") as z:
            test = z["test"].copy()
        if reference is None:
            reference = test
        elif not np.array_equal(reference, test):
            sys.exit(f"error: {run} was split differently from {args.runs[0]}; compare runs with the same data and seed")
        opts = TrainOptions(data=args.data, run_dir=run, image_size=options["image_size"])
        _, val, test_part = load_split(opts, dataset)
        described = f"{options['target']} w{options['width']} {options['weight_bits']}b att={options['attention']} ep={options['epochs']}"
        if options.get("blocks", 1) != 1 or options.get("zoom", 0.0):
            described += f" blk={options.get('blocks', 1)} zoom={options.get('zoom', 0.0)}"
        if options.get("saliency_teacher"):
            described += " +saliency"
        if options.get("weight_ema"):
            described += f" ema={options['weight_ema']}"
        for part_name, part in (("val", val), ("test", test_part)):
            for model_name, loader in (("float", load_float), ("quantized", load_quantized)):
                if not (run / f"{model_name}.h5").exists():
                    continue
                pred = loader(opts).predict(part.images.astype(np.float32), batch_size=256, verbose=0).argmax(1)
                m = classification_metrics(part.labels, pred, CLASS_NAMES)
                print(f"{str(run):28s} {described:52s} {part_name:5s} {model_name:9s} {m['top1']:6.3f} {m['macro_f1']:6.3f} {m['balanced_accuracy']:6.3f}")


if __name__ == "__main__":
    main()
