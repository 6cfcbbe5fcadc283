"""Would a post-hoc logit adjustment raise macro-F1? Scored on finished `qana train` runs.

    python benchmarks/logit_adjustment.py --data ../shared/data/ham10000 runs/fixaug-seed0 runs/fixaug-seed1

Macro-F1 weighs the rare classes (df, vasc, akiec) as much as nevi, and an arg-max over
posterior-like logits favours the frequent ones. Menon et al. (2021, "Long-tail learning via
logit adjustment") subtract tau * log(class frequency) from the logits, a per-class bias that
moves decisions towards the rare classes. Here it is added on top of what a bundle scores by
default: the final head's Akida logits on the run's cached test-time-view features, plus the
clinical prior (qana.clinical) with weight w.

For each run, (w, tau) is chosen on its validation part by top-1 + macro-F1 (the score every
choice in `qana train` uses; ties go to the smaller tau, then the smaller w) and the test part
is scored, next to the same choice with tau fixed at 0 — which reproduces the bundle's own
"Akida + prior" figures, a check that the logits are the bundle's. Prints each run, the means,
and each run's test gain in top-1 + macro-F1. Nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
PARTS = ("val", "test")


def choose(
    logits: np.ndarray, prior_term: np.ndarray, log_freq: np.ndarray, labels: np.ndarray,
    taus: Sequence[float], weights: Sequence[float], score: Callable[[np.ndarray, np.ndarray], float],
) -> tuple[float, float]:
    """The (w, tau) with the best validation score; ties to the smaller tau, then the smaller w."""
    best = max(
        ((score(labels, (logits + w * prior_term - tau * log_freq).argmax(1)), -tau, -w) for tau in taus for w in weights)
    )
    return -best[2], -best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` run directories (with final/clinical.npz)")
    parser.add_argument("--data", type=Path, required=True, help="the HAM10000 folder the runs were trained on")
    args = parser.parse_args()

    from qana import clinical
    from qana.classes import CLASS_NAMES
    from qana.metrics import classification_metrics
    from qana.run_record import recorded_options
    from qana.train import akida_features, akida_head_logits, load_split, run_dataset, selection_score

    options = {}
    for run in args.runs:  # before decoding any image: a wrong run directory is named at once
        if not (run / "final" / clinical.PRIOR_FILE).is_file():
            sys.exit(f"error: {run}: no final/{clinical.PRIOR_FILE} (the run is not finished, or validation left the clinical prior off)")
        options[run] = recorded_options(run, args.data)
    inputs = {(o.image_size, o.colour_constancy) for o in options.values()}
    if len(inputs) != 1:
        sys.exit(f"error: the runs see different inputs (image size, colour constancy: {sorted(inputs)}); compare runs of one kind")
    dataset = run_dataset(next(iter(options.values())))
    results = []
    for run in args.runs:
        prior_file = run / "final" / clinical.PRIOR_FILE
        opts = options[run]  # the run's own settings (features are recomputed if stale)
        _, val, test = load_split(opts, dataset)
        prior = clinical.prior_from_npz(prior_file.read_bytes())
        parts = {}
        for name, part in zip(PARTS, (val, test)):
            logits = akida_head_logits(run / "final" / "model.fbz", akida_features(opts, part))
            parts[name] = (logits, clinical.log_odds(prior, clinical.encode_dataset(part)), part.labels)
        row = {}
        for label, taus in (("tau=0", (0.0,)), ("tau chosen", TAUS)):
            w, tau = choose(*parts["val"][:2], prior.log_class_frequency, parts["val"][2], taus, clinical.WEIGHT_CANDIDATES, selection_score)
            scores = {}
            for name in PARTS:
                logits, term, labels = parts[name]
                m = classification_metrics(labels, (logits + w * term - tau * prior.log_class_frequency).argmax(1), CLASS_NAMES)
                scores[name] = np.array([m["top1"], m["macro_f1"], m["balanced_accuracy"]])
            row[label] = {"w": w, "tau": tau, **scores}
            figures = "  ".join(f"{n} {scores[n][0]:.3f} / {scores[n][1]:.3f} / {scores[n][2]:.3f}" for n in PARTS)
            print(f"{str(run):28s} {label:10s} w={w:<4g} tau={tau:<4g} {figures}")
        results.append(row)
    print("means (top-1 / macro-F1 / balanced accuracy):")
    for label in ("tau=0", "tau chosen"):
        print(f"  {label:10s} " + "  ".join(
            f"{n} " + " / ".join(f"{x:.4f}" for x in np.mean([r[label][n] for r in results], axis=0)) for n in PARTS
        ))
    gains = [float(r["tau chosen"]["test"][:2].sum() - r["tau=0"]["test"][:2].sum()) for r in results]
    print("test top-1 + macro-F1 gain per run (points): " + ", ".join(f"{100 * g:+.2f}" for g in gains))


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
