"""Test-time views on Akida: a trained run's converted model scored with 1, 2, 4 and 8 views.

    python benchmarks/views.py --data ../shared/data/ham10000 runs/v2-main

For each part (validation, test) the backbone runs once per view on the Akida software backend
(8 passes per image: minutes for the ~2,500 images); the host averages the integer features and
rounds them (qana.views), and the run's final head layer is applied with its exact integer
arithmetic. Also printed: averaging the views' logits instead of their features, to show the
rounding costs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `qana train` run directory whose head stage has finished")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    from qana.classes import CLASS_NAMES
    from qana.metrics import classification_metrics
    from qana.run_record import recorded_options
    from qana.train import _akida_runtime, akida_head_logits, load_split, run_dataset
    from qana.views import VIEW_COUNTS, dihedral_view, rounded_mean

    opts = recorded_options(args.run, args.data)
    _, val, test = load_split(opts, run_dataset(opts))
    model = args.run / "final" / "model.fbz"
    runtime = _akida_runtime(opts, args.run / "final", views=1)
    print(f"{'part':5s} {'views':>5s} {'averaged':9s} {'top1':>6s} {'mF1':>6s} {'balAcc':>6s}")
    for name, part in (("val", val), ("test", test)):
        per_view = [runtime.features(dihedral_view(part.images, i)) for i in range(max(VIEW_COUNTS))]
        for n in VIEW_COUNTS:
            mean = rounded_mean(per_view[:n])  # what qana.views.averaged_features computes
            for how, logits in (
                ("features", akida_head_logits(model, mean)),
                ("logits", np.mean([akida_head_logits(model, f) for f in per_view[:n]], axis=0)),
            ):
                m = classification_metrics(part.labels, logits.argmax(1), CLASS_NAMES)
                print(f"{name:5s} {n:5d} {how:9s} {m['top1']:6.3f} {m['macro_f1']:6.3f} {m['balanced_accuracy']:6.3f}", flush=True)


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
