"""Does one decision per lesion beat one decision per photograph? Bundles scored both ways.

    python benchmarks/lesion_fusion.py --data ham-test --model qana/bundles/v2 --model qana/bundles/v2-s7

`--data` is a HAM10000-style folder of held-out images, e.g. a part written by `qana split`
(`qana split --data ../shared/data/ham10000 --model qana/bundles/v2 --part test --out ham-test`).
For each bundle it computes the logits exactly as `qana evaluate` does (`qana.evaluate`: the
bundle's test-time views, the Akida model and, when the bundle carries it, the float Keras
model; the bundle's clinical prior) and scores them per image and with lesion fusion
(`qana.fusion`: the images of one lesion share the mean of their logits). It prints:

- top-1 / macro-F1 / balanced accuracy of each model, images only and with the prior, per image
  and fused, with the change;
- the chip minus float with fusion (the issue's 1-point fidelity bar), when float is in the bundle;
- how often Akida + prior clears the issue's accuracy bar (top-1 >= 0.80, macro-F1 >= 0.60) when
  the folder's lesions are drawn again with replacement (`qana.metrics.grouped_bootstrap`), per
  image and fused, on the same resamples.

Nothing here is chosen: fusion has no parameter. The decision it informs is written in NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qana.metrics import ACCURACY_BAR as BAR  # noqa: E402

METRICS = ("top1", "macro_f1", "balanced_accuracy")


def bundle_scores(bundle, dataset, backends: tuple[str, ...]) -> dict[tuple[str, bool], np.ndarray]:
    """Final logits keyed (model name, fused?), model names like `akida` and `akida+prior`."""
    from qana import clinical
    from qana.evaluate import bundle_logits, clinical_inputs
    from qana.fusion import fuse_by_lesion

    prior, encoded, _ = clinical_inputs(bundle, dataset, use_prior=True)
    out: dict[tuple[str, bool], np.ndarray] = {}
    for backend in backends:
        image_logits = bundle_logits(bundle, dataset.images, backend)
        variants = {backend: image_logits}
        if prior is not None:
            variants[f"{backend}+prior"] = clinical.adjust(prior, image_logits, encoded)
        for name, z in variants.items():
            out[(name, False)] = z
            out[(name, True)] = fuse_by_lesion(z, dataset.lesion_ids)
    return out


def figures(metrics: dict) -> str:
    return "/".join(f"{metrics[k]:.3f}" for k in METRICS)


def report(bundle_path: Path, data: Path, resamples: int) -> None:
    from qana.bundle import load_bundle
    from qana.data import describe_skipped, load_dataset
    from qana.fusion import describe_lesions
    from qana.metrics import FAITHFUL, FIDELITY_PAIRS, classification_metrics, clears_bar, fidelity_line, grouped_bootstrap

    bundle = load_bundle(bundle_path)
    dataset = load_dataset(data, size=bundle.input_shape[0], progress=False)
    backends = ("akida", "float") if (bundle.path / "float.h5").is_file() else ("akida",)
    print(f"\n{bundle_path} on {data}: {describe_lesions(dataset.lesion_ids)} ({describe_skipped(dataset.skipped)})")
    logits = bundle_scores(bundle, dataset, backends)
    metrics = {key: classification_metrics(dataset.labels, z.argmax(1), bundle.classes) for key, z in logits.items()}
    print(f"  {'model':14s} {'per image top-1/mF1/bal':>24s} {'fused top-1/mF1/bal':>24s}  change (points)")
    for name in dict.fromkeys(name for name, _ in logits):
        single, fused = metrics[(name, False)], metrics[(name, True)]
        change = " / ".join(f"{100 * (fused[k] - single[k]):+.1f}" for k in METRICS)
        print(f"  {name:14s} {figures(single):>24s} {figures(fused):>24s}  {change}")
    if "float" in backends:
        print(f"  Akida minus float, fused (bar: not more than {FAITHFUL * 100:.0f} point below):")
        for chip, reference, label in FIDELITY_PAIRS:
            if (chip, True) in metrics:
                print("    " + fidelity_line(metrics[(reference, True)], metrics[(chip, True)], label))
    shipped = "akida+prior" if ("akida+prior", False) in logits else "akida"
    predictions = {f"{shipped} {way}": logits[(shipped, fused)].argmax(1) for way, fused in (("per image", False), ("fused", True))}
    draws = grouped_bootstrap(dataset.labels, predictions, dataset.lesion_ids, bundle.classes, resamples=resamples)
    print(f"  {resamples} lesion resamples, share clearing top-1 >= {BAR['top1']:.2f} and macro-F1 >= {BAR['macro_f1']:.2f}:")
    for name, values in draws.items():
        print(f"    {name:24s} {100 * clears_bar(values).mean():.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000-style folder of held-out images (e.g. from `qana split`)")
    parser.add_argument("--model", type=Path, action="append", required=True, help="bundle directory; repeat for several")
    parser.add_argument("--resamples", type=int, default=2000, help="lesion bootstrap resamples for the share clearing the bar")
    args = parser.parse_args()
    if args.resamples < 1:
        sys.exit(f"error: --resamples must be at least 1, not {args.resamples}")
    if not args.data.is_dir():
        sys.exit(f"error: data folder not found: {args.data}")
    from qana.bundle import BundleError
    from qana.data import DataError

    for bundle_path in args.model:
        try:
            report(bundle_path, args.data, args.resamples)
        except (BundleError, DataError, ValueError) as exc:
            sys.exit(f"error: {bundle_path}: {exc}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
