"""Judge a recipe change by the rule this project writes into NOTES.md before its runs exist.

    python benchmarks/judge_rule.py --baseline runs/fixaug-seed19 runs/fixaug-seed20 \\
        --variant runs/mixlate-seed19 runs/mixlate-seed20

Both arms must be finished `qana train` runs (or `benchmarks/records/` folders) on the same
splits: one run per seed in each arm, the same seeds in both. The rule (session 28, reused
since), on the Akida model with the clinical prior, which is what a clinic's `qana evaluate`
scores:

  (a) mean validation top-1 + macro-F1 of the variant >= the baseline's + MARGIN (0.010);
  (b) neither mean validation measure (top-1, macro-F1) of the variant below the baseline's;
  (c) at least as many splits as the baseline with the chip inside the 1-point fidelity bar of
      its float model on test: counted images only, with the prior, and on both at once.

The change passes only if all three hold. Why these: validation picks everything in this
project, so a change must be better there by more than its epoch-to-epoch jitter, and must not
trade one measure for the other; and the issue's bar asks the chip to reproduce its float
model, which a test split shows (one 1,282-image test part moves by about ±2 points, so its
accuracy is not judged here). Only validation figures and the fidelity verdicts are printed:
the arms' test accuracies are for `benchmarks/seed_spread.py`, after the decision.

A run whose clinical prior got weight 0 on validation counts with its images-only figures,
as in seed_spread (`count_runs_without_a_prior`, over both arms). Settings missing from an
older run's options.json count as their defaults (as `qana train` reads them); the runs of
one seed must also agree on the split's other settings, and on the split itself wherever both
folders tell it: a run directory's `split.npz`, a record's `split-indices.sha256`
(benchmarks/record_run.py); a run made with `--reuse-from` another seed's run has that run's
split whatever its own seed. Exit status
0 whatever the verdict; an `error:` line and a non-zero status on unusable input (unfinished
runs, other splits, an arm that is not one recipe).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qana.metrics import FAITHFUL, FIDELITY_PAIRS, shortfall  # noqa: E402  (no TensorFlow)
from seed_spread import check_one_run_per_split, count_runs_without_a_prior, differences, load_run, split_of  # noqa: E402

SCORED = "akida+prior"  # what `qana evaluate` scores with a bundle that has the clinical prior
MEASURES = ("top1", "macro_f1")
SPLIT_SETTINGS = ("val_fraction", "test_fraction", "limit")  # with the seed and the data, they make the split
Run = tuple[Path, dict, dict]


def training_defaults(runs: list[Run]) -> dict:
    """`qana train`'s settings as options.json records them, for runs recorded before a setting
    existed; {} when every run records the same settings."""
    recorded = [set(options) for _, options, _ in runs if not options.get("shipped_bundle")]
    if all(keys == recorded[0] for keys in recorded):
        return {}

    from qana.run_record import default_settings

    return default_settings()


def completed(options: dict, defaults: dict) -> dict:
    """A run's recorded settings, those it predates as their defaults (a shipped bundle's record
    holds only its command, which seed_spread compares instead)."""
    return options if options.get("shipped_bundle") else {**defaults, **options}


def check_arm(name: str, runs: list[Run], defaults: dict) -> None:
    """Exit when a seed repeats in one arm or a run's settings differ from the first's in more
    than the seed (then the arm is not one recipe)."""
    check_one_run_per_split(runs)
    first = completed(runs[0][1], defaults)
    for path, options, _ in runs[1:]:
        differs = differences(first, completed(options, defaults))
        if differs:
            sys.exit(f"error: {name}: {path} differs from {runs[0][0]} in more than the seed ({', '.join(differs)})")


def check_same_splits(baseline: list[Run], variant: list[Run], defaults: dict) -> None:
    """Exit unless each seed of one arm has a run of the same split in the other: the same seed,
    the same split settings and, where both folders tell it, the same split indices (a record's
    split-indices.sha256, a run directory's split.npz: a run can reuse another seed's split)."""
    by_seed = {str(options.get("seed")): (path, completed(options, defaults)) for path, options, _ in baseline}
    seeds = sorted(by_seed), sorted(str(options.get("seed")) for _, options, _ in variant)
    if seeds[0] != seeds[1]:
        sys.exit(f"error: the arms are not on the same splits: baseline seeds {', '.join(seeds[0])}, "
                 f"variant seeds {', '.join(seeds[1])}")
    for path, options, _ in variant:
        base_path, base = by_seed[str(options.get("seed"))]
        options = completed(options, defaults)
        other = [k for k in SPLIT_SETTINGS if base.get(k) != options.get(k)]
        if other:
            sys.exit(f"error: {base_path} and {path} have the same seed but other split settings ({', '.join(other)})")
        prints = split_of(base_path), split_of(path)
        if None not in prints and prints[0] != prints[1]:
            sys.exit(f"error: {base_path} and {path} have the same seed but other splits (their split indices differ)")


def with_prior_figures(baseline: list[Run], variant: list[Run]) -> None:
    """Give a run whose prior got weight 0 its images-only figures as prior ones (over both
    arms: one arm may have no run with a prior); exit if a run still has none."""
    count_runs_without_a_prior(baseline + variant)
    missing = [path.name for path, _, metrics in baseline + variant if SCORED not in metrics["val"] or "float+prior" not in metrics["test"]]
    if missing:
        sys.exit(f"error: {', '.join(missing)} recorded no figures with the clinical prior, which the rule judges")


def validation_means(runs: list[Run]) -> dict[str, float]:
    """Mean validation top-1 and macro-F1 of the scored model over an arm's splits."""
    return {k: statistics.mean(float(metrics["val"][SCORED][k]) for _, _, metrics in runs) for k in MEASURES}


def inside_the_bar(metrics: dict) -> dict[str, bool]:
    """Per fidelity pair (images only; with the prior): whether a run's chip stays within
    FAITHFUL of its float model on test."""
    return {label: shortfall(metrics["test"][reference], metrics["test"][chip]) <= FAITHFUL
            for chip, reference, label in FIDELITY_PAIRS}


def splits_inside_the_bar(runs: list[Run]) -> dict[str, int]:
    """How many of an arm's splits keep the chip inside the bar, per fidelity pair and on both at once."""
    counts = {label: 0 for _, _, label in FIDELITY_PAIRS} | {"both": 0}
    for _, _, metrics in runs:
        inside = inside_the_bar(metrics)
        for label, ok in inside.items():
            counts[label] += ok
        counts["both"] += all(inside.values())
    return counts


def judge(baseline: list[Run], variant: list[Run], margin: float) -> tuple[bool, list[str]]:
    """(passes, one line per criterion) of the rule in the module docstring."""
    base_val, var_val = validation_means(baseline), validation_means(variant)
    base_sum, var_sum = sum(base_val.values()), sum(var_val.values())
    base_in, var_in = splits_inside_the_bar(baseline), splits_inside_the_bar(variant)
    checks = [
        (var_sum >= base_sum + margin,
         f"(a) validation top-1 + macro-F1: variant {var_sum:.4f} vs baseline {base_sum:.4f} + {margin:.3f}"),
        (all(var_val[k] >= base_val[k] for k in MEASURES),
         "(b) neither validation measure lower: " + "; ".join(f"{k} variant {var_val[k]:.4f} vs baseline {base_val[k]:.4f}" for k in MEASURES)),
        (all(var_in[k] >= base_in[k] for k in base_in),
         f"(c) splits inside the test fidelity bar (of {len(variant)}): "
         + "; ".join(f"{k} variant {var_in[k]} vs baseline {base_in[k]}" for k in base_in)),
    ]
    return all(ok for ok, _ in checks), [f"{'pass' if ok else 'FAIL'}  {line}" for ok, line in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, nargs="+", required=True, help="the baseline recipe's runs, one per split")
    parser.add_argument("--variant", type=Path, nargs="+", required=True, help="the changed recipe's runs on the same splits")
    parser.add_argument("--margin", type=float, default=0.010, help="how much higher the variant's validation top-1 + macro-F1 must be")
    args = parser.parse_args()

    baseline, variant = ([(path, *load_run(path)) for path in paths] for paths in (args.baseline, args.variant))
    defaults = training_defaults(baseline + variant)
    check_arm("--baseline", baseline, defaults)
    check_arm("--variant", variant, defaults)
    check_same_splits(baseline, variant, defaults)
    with_prior_figures(baseline, variant)
    changed = differences(completed(baseline[0][1], defaults), completed(variant[0][1], defaults))
    print(f"variant differs from the baseline in: {', '.join(changed) or 'nothing recorded'}")
    print(f"\nvalidation, {SCORED} top-1 / macro-F1, and whether the chip is within the bar on test")
    for arm, runs in (("baseline", baseline), ("variant", variant)):
        for path, options, metrics in sorted(runs, key=lambda r: str(r[1].get("seed"))):
            val = metrics["val"][SCORED]
            verdicts = [f"{label} {'ok' if ok else 'outside'}" for label, ok in inside_the_bar(metrics).items()]
            print(f"{arm:<9} {path.name:<22} seed {options.get('seed')!s:>3}  val {val['top1']:.3f} / {val['macro_f1']:.3f}  "
                  f"test fidelity: {', '.join(verdicts)}")
    passes, lines = judge(baseline, variant, args.margin)
    print()
    print("\n".join(lines))
    print(f"\nRULE {'PASSES' if passes else 'FAILS'}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
