"""How sure is "over the bar" or "under the bar"? Bootstrap intervals for finished runs' test figures.

    python benchmarks/bar_interval.py --data ../shared/data/ham10000 runs/fixaug-seed0
    python benchmarks/bar_interval.py --data ../shared/data/ham10000 runs/fixaug-seed0 runs/fixaug-seed1 \\
        runs/fixaug-seed2 runs/fixaug-seed3

The issue's bar (v2: top-1 >= 0.80 and macro-F1 >= 0.60; the chip within 1 point of float) is
checked on one test part of about 1,300 images from about 1,000 lesions, with a few dozen of the
rarest classes. The withheld evaluation is another sample of lesions like it. So this script
asks, per run: if the test lesions had been drawn again, where would the figures land?

It rescores each run exactly as `benchmarks/chip_ensemble.py` scores a one-run group (which
reproduces the run's recorded `bundle.json` figures): float and Akida logits with the run's
test-time views, the clinical prior fitted on the training part and weighted on validation.
Then it resamples the test part's *lesions* with replacement (`qana.metrics.grouped_bootstrap`;
all models on the same resamples) and prints, per run: the 95 % interval of top-1, macro-F1
and balanced accuracy of each model; how often Akida + prior clears the accuracy bar; and the
interval of the chip minus float (images only and with the prior) with how often the chip falls
more than the 1-point bar below. With two runs or more (the same recipe on other seeds), it also
prints the recipe's mean over runs with a 95 % t-interval: that one includes the training
randomness and the split, which one run's bootstrap cannot see. As in `benchmarks/seed_spread.py`,
two runs of one split are refused and runs that differ in more than the seed are warned about.

Nothing here chooses a model: it measures how far one test part can be trusted.
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

from qana.metrics import ACCURACY_BAR as BAR  # noqa: E402
from qana.metrics import FIDELITY_PAIRS, mean_interval  # noqa: E402

MODELS = ("float", "akida", "float+prior", "akida+prior")
SHIPPED = "akida+prior"  # what `qana evaluate` scores by default, and what the bar is judged on
LABELS = {"top1": "top-1", "macro_f1": "macro-F1", "balanced_accuracy": "balanced acc."}


def run_predictions(run: Path, data: Path, datasets: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """Test predictions of each of MODELS for one finished run, the test labels, the test
    images' lesion ids, and the clinical prior's weight (chosen on validation)."""
    import chip_ensemble

    mean, labels, extras = chip_ensemble.group_logits([run], data, datasets)
    predictions, weight = chip_ensemble.group_predictions(mean, labels, extras)
    return {m: predictions[(m, "test")] for m in MODELS}, labels["test"], extras["lesions"]["test"], weight


def share(condition: np.ndarray) -> str:
    return f"{100 * float(np.mean(condition)):.0f} %"


def report_run(name: str, predictions: dict, labels: np.ndarray, lesions: np.ndarray, weight: float, resamples: int, seed: int) -> dict:
    """Print one run's intervals; return its point figures (model -> metrics) for the recipe summary."""
    from qana.classes import CLASS_NAMES
    from qana.metrics import BOOTSTRAP_METRICS, FAITHFUL, classification_metrics, clears_bar, grouped_bootstrap, interval, reaches_bar

    point = {m: classification_metrics(labels, predictions[m], CLASS_NAMES) for m in MODELS}
    boot = grouped_bootstrap(labels, predictions, lesions, CLASS_NAMES, resamples=resamples, seed=seed)
    print(f"\n{name}: {len(labels)} test images from {len(np.unique(lesions))} lesions; "
          f"clinical prior weight {weight:g}; {resamples} lesion resamples; figure [95 % interval]")
    print(f"{'model':<13} " + " ".join(f"{LABELS[k]:<22}" for k in BOOTSTRAP_METRICS))
    for m in MODELS:
        cells = [f"{point[m][k]:.3f} [{interval(boot[m][k])[0]:.3f}, {interval(boot[m][k])[1]:.3f}]" for k in BOOTSTRAP_METRICS]
        print(f"{m:<13} " + " ".join(f"{c:<22}" for c in cells))

    over = reaches_bar(boot[SHIPPED])
    print(f"{SHIPPED} clears top-1 >= {BAR['top1']:.2f} and macro-F1 >= {BAR['macro_f1']:.2f} in "
          f"{share(clears_bar(boot[SHIPPED]))} of resamples (top-1 alone {share(over['top1'])}, "
          f"macro-F1 alone {share(over['macro_f1'])})")

    for chip, reference, label in FIDELITY_PAIRS:
        diff = {k: 100 * (boot[chip][k] - boot[reference][k]) for k in BAR}
        cells = []
        for k in BAR:
            low, high = interval(diff[k])
            cells.append(f"{LABELS[k]} {100 * (point[chip][k] - point[reference][k]):+.1f} [{low:+.1f}, {high:+.1f}]")
        below = (diff["top1"] < -100 * FAITHFUL) | (diff["macro_f1"] < -100 * FAITHFUL)
        print(f"Akida minus float, {label}, points: " + ", ".join(cells) +
              f"; more than {100 * FAITHFUL:.0f} point below in {share(below)} of resamples")
    return point


def report_recipe(points: list[dict]) -> None:
    """Mean over runs of the shipped model's figures with a 95 % t-interval (runs = splits)."""
    n = len(points)
    print(f"\nrecipe: {SHIPPED} on test, mean over {n} runs [95 % t-interval, {n - 1} degrees of freedom]")
    for k, bar in BAR.items():
        mean, low, high = mean_interval([p[SHIPPED][k] for p in points])
        print(f"{LABELS[k]:<9} {mean:.3f} [{low:.3f}, {high:.3f}]  (bar {bar:.2f})")


def check_recipe_runs(runs: list[Path]) -> None:
    """Exit when two runs are one split, and warn when they differ in more than the seed, as
    benchmarks/seed_spread.py does: the recipe's t-interval counts each run as one split of one
    recipe (one split given twice made a zero-width "interval")."""
    from seed_spread import check_one_run_per_split, load_run, warn_on_other_recipes

    loaded = [(run, *load_run(run)) for run in runs]
    check_one_run_per_split(loaded)
    warn_on_other_recipes(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` run directories")
    parser.add_argument("--data", type=Path, required=True, help="the HAM10000-style folder the runs were trained on")
    parser.add_argument("--resamples", type=int, default=2000, help="lesion bootstrap resamples per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    args = parser.parse_args()
    if args.resamples < 1:
        sys.exit(f"error: --resamples must be at least 1, got {args.resamples}")
    import chip_ensemble

    chip_ensemble.require_finished_runs(args.runs)
    check_recipe_runs(args.runs)

    datasets: dict = {}
    points = []
    for run in args.runs:
        predictions, labels, lesions, weight = run_predictions(run, args.data, datasets)
        points.append(report_run(str(run), predictions, labels, lesions, weight, args.resamples, args.seed))
    if len(points) >= 2:
        report_recipe(points)


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
