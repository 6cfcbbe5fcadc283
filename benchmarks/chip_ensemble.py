"""Would two backbones on the chip clear the bar one does not? Finished `qana train` runs made on
the same split, scored as one ensemble, split by split.

    python benchmarks/chip_ensemble.py --data ../shared/data/ham10000 \\
        runs/fixaug-seed0,runs/sog-seed0 runs/fixaug-seed1,runs/sog-seed1

Each argument is one group of runs (comma-separated) that share a lesion-grouped split, e.g. the
shipped recipe and the same recipe with colour constancy. The group's Akida logits are the mean
of its runs' final-head Akida logits (each run's backbone features, executed on Akida with its
own preprocessing and test-time views, plus the head layer's integer arithmetic, as
`qana train` scores them). That is what one linear head over the runs' concatenated features
computes (up to that head's own weight quantization), so it is an ensemble a bundle could
deploy. The float counterpart averages the float models' logits over the same views. The
clinical prior is fitted on the group's training part and weighted on its validation part by
the clinical stage's rule on the Akida ensemble; the float ensemble gets the same prior, as in
`qana train`. Prints each group's validation and test figures, the chip-vs-float fidelity on
test (the issue's 1-point bar), and the mean and sample standard deviation over groups. As in
`benchmarks/seed_spread.py`, two groups of one split are refused, and a group whose runs differ
from the first group's in more than the seed is warned about. The cost is not hidden: every
image goes through every backbone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

METRICS = ("top1", "macro_f1", "balanced_accuracy")
MODELS = ("float", "akida", "float+prior", "akida+prior")


def require_finished_runs(runs: list[Path]) -> None:
    """Exit with one `error:` line naming the first run whose bundle stage has not finished."""
    for run in runs:
        if not (run / "bundle.json").is_file():
            sys.exit(f"error: {run / 'bundle.json'} not found: {run} is not a `qana train` run whose bundle stage has finished")


def check_groups_are_splits(groups: list[list[Path]]) -> None:
    """Exit when two groups are one split, and warn when a group's runs differ from the first
    group's (run by run, in the order given) in more than the seed, as benchmarks/seed_spread.py
    does for runs: the sd over groups counts each group as one split of one ensemble recipe."""
    from seed_spread import check_one_run_per_split, load_run, warn_on_other_recipes

    loaded = [[(run, *load_run(run)) for run in group] for group in groups]
    check_one_run_per_split([group[0] for group in loaded])  # a group's runs share one split (group_logits checks)
    for i in range(max(map(len, loaded))):
        warn_on_other_recipes([group[i] for group in loaded if i < len(group)])
    for group in loaded[1:]:
        if len(group) != len(loaded[0]):
            print(f"warning: the group of {group[0][0]} has {len(group)} runs, the first group {len(loaded[0])}: not one ensemble recipe")


def group_logits(runs: list[Path], data: Path, datasets: dict) -> tuple[dict, dict, dict]:
    """Mean float and Akida logits of a group of runs on its validation and test parts, the
    parts' labels, and the rest a scorer needs: the prior's training inputs and each part's
    lesion ids (benchmarks/bar_interval.py resamples lesions). Exits if the runs were split
    differently."""
    from qana import clinical
    from qana.run_record import recorded_options
    from qana.train import akida_features, akida_head_logits, load_float, load_split, run_dataset
    from qana.views import keras_logits

    logits: dict[tuple[str, str], list[np.ndarray]] = {}
    parts: dict[str, object] = {}
    for run in runs:
        opts = recorded_options(run, data)
        key = (opts.image_size, opts.colour_constancy)
        if key not in datasets:
            datasets[key] = run_dataset(opts)
        train, val, test = load_split(opts, datasets[key])
        for name, part in (("train", train), ("val", val), ("test", test)):
            if name in parts and not np.array_equal(parts[name].image_ids, part.image_ids):
                sys.exit(f"error: {run} was split differently from {runs[0]}; group runs made with the same data and seed")
            parts.setdefault(name, part)
        float_model = load_float(opts)
        for name, part in (("val", val), ("test", test)):
            logits.setdefault(("float", name), []).append(keras_logits(float_model, part.images, opts.test_time_views))
            feats = akida_features(opts, part)
            logits.setdefault(("akida", name), []).append(akida_head_logits(run / "final" / "model.fbz", feats))
    mean = {k: np.mean(v, axis=0) for k, v in logits.items()}
    labels = {name: parts[name].labels for name in ("val", "test")}
    encoded = {name: clinical.encode_dataset(parts[name]) for name in ("train", "val", "test")}
    lesions = {name: parts[name].lesion_ids for name in ("val", "test")}
    return mean, labels, {"encoded": encoded, "train_labels": parts["train"].labels, "seed": opts.seed, "lesions": lesions}


def group_predictions(mean: dict, labels: dict, prior_inputs: dict) -> tuple[dict, float]:
    """Class predictions of the float and Akida ensembles, without and with the clinical prior,
    keyed (model, part), and the prior's weight. As in `qana train` (`evaluate_all`), the weight
    is chosen once, on the Akida logits of the validation part, and the float model gets the
    same prior: the fidelity bar then compares the chip with float under identical host arithmetic."""
    from qana import clinical
    from qana.classes import CLASS_NAMES
    from qana.train import selection_score

    enc = prior_inputs["encoded"]
    fitted = clinical.fit_prior(enc["train"], prior_inputs["train_labels"], CLASS_NAMES, seed=prior_inputs["seed"])
    prior, _ = clinical.choose_weight(fitted, mean[("akida", "val")], enc["val"], labels["val"], selection_score)
    out: dict[tuple[str, str], np.ndarray] = {}
    for model in ("float", "akida"):
        for part in ("val", "test"):
            for name, z in ((model, mean[(model, part)]), (f"{model}+prior", clinical.adjust(prior, mean[(model, part)], enc[part]))):
                out[(name, part)] = z.argmax(1)
    return out, prior.weight


def score_group(mean: dict, labels: dict, prior_inputs: dict) -> tuple[dict, float]:
    """Metrics of each of `group_predictions`' predictions, keyed (model, part), and the prior's weight."""
    from qana.classes import CLASS_NAMES
    from qana.metrics import classification_metrics

    predictions, weight = group_predictions(mean, labels, prior_inputs)
    return {(model, part): classification_metrics(labels[part], pred, CLASS_NAMES) for (model, part), pred in predictions.items()}, weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="comma-separated finished `qana train` runs that share a split, one group per split")
    parser.add_argument("--data", type=Path, required=True, help="the HAM10000-style folder the runs were trained on")
    args = parser.parse_args()

    from qana.metrics import FAITHFUL, FIDELITY_PAIRS, fidelity_line

    groups = [[Path(p) for p in g.split(",") if p] for g in args.groups]
    if not all(groups):
        parser.error(f"a group names no run: {' '.join(args.groups)} (give comma-separated run directories)")
    require_finished_runs([run for group in groups for run in group])
    check_groups_are_splits(groups)
    datasets: dict = {}
    results = []
    print(f"{'group':40s} {'part':5s} " + " ".join(f"{m + ' top-1/mF1/bal':>26s}" for m in MODELS) + "  prior weight")
    for group in groups:
        name = "+".join(run.name for run in group)
        metrics, weight = score_group(*group_logits(group, args.data, datasets))
        results.append((name, metrics))
        for part in ("val", "test"):
            cells = " ".join(f"{'/'.join(f'{metrics[(m, part)][k]:.3f}' for k in METRICS):>26s}" for m in MODELS)
            print(f"{name:40s} {part:5s} {cells}  {weight:g}")

    print(f"\nAkida minus float on test, points of top-1 / macro-F1 (bar: not more than {FAITHFUL * 100:.0f} below)")
    for name, metrics in results:
        cells = []
        for chip, reference, label in FIDELITY_PAIRS:
            cells.append(fidelity_line(metrics[(reference, "test")], metrics[(chip, "test")], label))
        print(f"{name:40s} " + "; ".join(cells))
    if len(results) < 2:
        return
    print(f"\nmean ± sample sd over {len(results)} groups")
    for part in ("val", "test"):
        cells = []
        for m in MODELS:
            values = [[float(metrics[(m, part)][k]) for _, metrics in results] for k in METRICS]
            cells.append(f"{m}: " + "/".join(f"{statistics.mean(v):.3f}±{statistics.stdev(v):.3f}" for v in values))
        print(f"{part:5s} " + "  ".join(cells))


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
