"""Would a richer clinical prior help? Metadata models compared on finished `qana train` runs.

    python benchmarks/prior_variants.py --data ../shared/data/ham10000 runs/fixaug-seed0 runs/fixaug-seed1

`qana.clinical`'s prior is a softmax regression on one-hot age band, sex and body site. This
refits variants of it on each run's training part, weights each on the run's validation part
by the clinical stage's rule (best validation top-1 + macro-F1 of the final head's Akida logits
plus the weighted prior), and prints validation figures, which decide. `--test` adds each
variant's test figures and the chip-vs-float fidelity with that prior, to be read only after
the decision. The `today` row is the shipped prior and reproduces the runs' recorded figures.
Needs no training: the Akida logits come from the runs' cached backbone features.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qana import clinical  # noqa: E402
from qana.classes import CLASS_NAMES  # noqa: E402
from qana.metrics import classification_metrics  # noqa: E402

N_AGE, N_SEX = len(clinical.AGE_BANDS) + 1, len(clinical.SEXES) + 1


def with_interactions(encoded: np.ndarray) -> np.ndarray:
    """The one-hot encoding plus every (age band, site), (sex, site) and (age band, sex) pair:
    lets the prior say that a site means something else at 25 than at 80."""
    age, sex, site = encoded[:, :N_AGE], encoded[:, N_AGE : N_AGE + N_SEX], encoded[:, N_AGE + N_SEX :]

    def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)

    return np.concatenate([encoded, pairs(age, site), pairs(sex, site), pairs(age, sex)], axis=1)


TODAY = clinical.PRIOR_TRAINING
# name: (features from the one-hot encoding, epochs, L2); `today` is qana.clinical.fit_prior's setting.
VARIANTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int, float]] = {
    "today": (lambda e: e, TODAY.epochs, TODAY.l2),
    "converged": (lambda e: e, 5 * TODAY.epochs, TODAY.l2),
    "interactions": (with_interactions, 2 * TODAY.epochs, TODAY.l2),
    "interactions-l2": (with_interactions, 2 * TODAY.epochs, 10 * TODAY.l2),
}


def fit_log_odds(train_x: np.ndarray, train_y: np.ndarray, epochs: int, l2: float, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit a metadata model as `clinical.fit_prior` does, on any encoding; returns x -> log p(c | x) - log p(c)."""
    config = replace(clinical.PRIOR_TRAINING, epochs=epochs, l2=l2, seed=seed)
    model, log_frequency = clinical.fit_metadata_model(train_x, train_y, CLASS_NAMES, train_x.shape[1], config)
    return lambda x: clinical.metadata_log_odds(model, log_frequency, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` runs (one per split)")
    parser.add_argument("--data", type=Path, required=True, help="the HAM10000-style folder the runs were trained on")
    parser.add_argument("--test", action="store_true", help="also print test figures and fidelity (read after the decision)")
    args = parser.parse_args()
    from benchmarks.chip_ensemble import group_logits, require_finished_runs  # scores a run as chip_ensemble.py does a group of one

    require_finished_runs(args.runs)

    from qana.train import selection_score

    scores: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    datasets: dict = {}
    for run in args.runs:
        mean, labels, inputs = group_logits([run], args.data, datasets)
        enc = inputs["encoded"]
        for name, (features, epochs, l2) in VARIANTS.items():
            log_odds = fit_log_odds(features(enc["train"]), inputs["train_labels"], epochs, l2, inputs["seed"])
            term = {part: log_odds(features(enc[part])) for part in ("val", "test")}
            weight, _ = clinical.best_weight(term["val"], mean[("akida", "val")], labels["val"], selection_score)
            for part in ("val", "test"):
                for model in ("akida", "float"):
                    m = classification_metrics(labels[part], (mean[(model, part)] + weight * term[part]).argmax(1), CLASS_NAMES)
                    scores.setdefault((name, part, model), []).append((m["top1"], m["macro_f1"]))
            top1, mf1 = scores[(name, "val", "akida")][-1]
            print(f"{run.name:22s} {name:16s} weight {weight:<5g} validation Akida + prior {top1:.3f} / {mf1:.3f}")

    print("\nvalidation, Akida + prior, mean over runs: top-1 / macro-F1, sum")
    for name in VARIANTS:
        a = np.array(scores[(name, "val", "akida")])
        print(f"{name:16s} {a[:, 0].mean():.3f} / {a[:, 1].mean():.3f}  sum {a.sum(axis=1).mean():.3f}")
    if args.test:
        print("\ntest, Akida + prior per run and mean; chip minus float with the same prior, points")
        for name in VARIANTS:
            a, f = np.array(scores[(name, "test", "akida")]), np.array(scores[(name, "test", "float")])
            per_run = " ".join(f"{x:.3f}/{y:.3f}" for x, y in a)
            fidelity = " ".join(f"{100 * (x - u):+.1f}/{100 * (y - v):+.1f}" for (x, y), (u, v) in zip(a, f, strict=True))
            print(f"{name:16s} {per_run}  mean {a[:, 0].mean():.3f}/{a[:, 1].mean():.3f}  fidelity {fidelity}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
