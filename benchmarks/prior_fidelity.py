"""Why can the chip be within a point of float on images alone but not with the clinical prior?

    python benchmarks/prior_fidelity.py --data ../shared/data/ham10000 runs/fixaug-seed11 runs/fixaug-seed12 --test

For each finished `qana train` run: how large the Akida head's logits are against the float
model's (standard deviation of the class-centred logits, Akida / float), how often the two
agree on the top class, and chip-minus-float top-1 / macro-F1 with the run's own clinical prior
at every candidate weight (`qana.clinical.WEIGHT_CANDIDATES`; the run's chosen one is marked).
The prior adds the same term to both models' logits (`qana.train.evaluate_all`), so where the
chip's logits are larger the prior moves fewer of its decisions. Validation by default;
`--test` adds the test part. Needs no training: the Akida logits come from the runs' cached
backbone features, the float logits from their float.h5.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qana import clinical  # noqa: E402
from qana.classes import CLASS_NAMES  # noqa: E402
from qana.metrics import classification_metrics  # noqa: E402


def logit_scale_ratio(float_logits: np.ndarray, akida_logits: np.ndarray) -> float:
    """sd of the Akida logits over sd of the float logits, each centred per image (a constant
    added to every class of an image changes no decision, so it is taken out first)."""
    def centred_sd(z: np.ndarray) -> float:
        z = np.asarray(z, np.float64)
        return float((z - z.mean(axis=1, keepdims=True)).std())

    return centred_sd(akida_logits) / centred_sd(float_logits)


def fidelity_by_weight(
    labels: np.ndarray, float_logits: np.ndarray, akida_logits: np.ndarray, term: np.ndarray, weights: tuple[float, ...]
) -> list[tuple[float, dict, dict]]:
    """(weight, float metrics, Akida metrics) with `weight * term` added to both models' logits."""
    out = []
    for w in weights:
        f = classification_metrics(labels, (float_logits + w * term).argmax(1), CLASS_NAMES)
        a = classification_metrics(labels, (akida_logits + w * term).argmax(1), CLASS_NAMES)
        out.append((w, f, a))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` runs")
    parser.add_argument("--data", type=Path, required=True, help="the HAM10000-style folder the runs were trained on")
    parser.add_argument("--test", action="store_true", help="also print the test part")
    args = parser.parse_args()
    from benchmarks.chip_ensemble import group_logits, require_finished_runs

    require_finished_runs(args.runs)

    from qana.run_record import recorded_options
    from qana.train import load_prior

    datasets: dict = {}
    for run in args.runs:
        prior = load_prior(recorded_options(run, args.data))
        if prior is None:
            print(f"{run.name}: no clinical prior (the run's clinical stage left it off)")
            continue
        mean, labels, inputs = group_logits([run], args.data, datasets)
        for part in ("val", "test") if args.test else ("val",):
            fl, al = mean[("float", part)], mean[("akida", part)]
            term = clinical.log_odds(prior, inputs["encoded"][part])
            agree = float(np.mean(fl.argmax(1) == al.argmax(1)))
            print(f"{run.name} {part}: Akida/float logit scale {logit_scale_ratio(fl, al):.3f}, top class agrees on {agree:.3f}")
            for w, f, a in fidelity_by_weight(labels[part], fl, al, term, clinical.WEIGHT_CANDIDATES):
                mark = " <- the run's weight" if w == prior.weight else ""
                print(
                    f"   weight {w:<5g} float {f['top1']:.3f}/{f['macro_f1']:.3f}  Akida {a['top1']:.3f}/{a['macro_f1']:.3f}  "
                    f"chip minus float {100 * (a['top1'] - f['top1']):+.1f}/{100 * (a['macro_f1'] - f['macro_f1']):+.1f}{mark}"
                )
        sys.stdout.flush()


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
