"""Did self-supervised pretraining (`qana train --pretrain-epochs`) learn anything about lesions?

A linear probe: the backbone is frozen, its `features` (one view per image) are standardised
with the training part's mean and spread, and a softmax regression (the head math clinics use,
`qana.head.train_head`, balanced class weights) is fitted on the training part and scored on the
validation part. The same is done for the randomly initialised backbone the pretraining started
from (same seed), so the gap between the two rows is what pretraining taught before any label
was seen. The test part is not touched.

    python benchmarks/pretrain_probe.py --data ../shared/data/ham10000 runs/ssl-seed1 runs/ssl-seed2

This explains a pretraining screen's result; it decides nothing (the float stage fine-tunes the
whole network from these weights, so a probe gain need not survive fine-tuning).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

PROBE_EPOCHS = 30


def frozen_features(model, images: np.ndarray) -> np.ndarray:
    """The backbone's `features` output for uint8 images (one view, no augmentation)."""
    from qana.model import backbone

    return backbone(model).predict(images.astype(np.float32), batch_size=256, verbose=0)


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> dict:
    """Validation top-1 / macro-F1 / balanced accuracy of a linear probe on standardised features."""
    from qana import head as head_math
    from qana.classes import CLASS_NAMES
    from qana.metrics import classification_metrics

    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    standardise = lambda x: (x - mean) / std  # noqa: E731
    head = head_math.init_head(train_x.shape[1], CLASS_NAMES, seed=seed)
    config = head_math.TrainConfig(epochs=PROBE_EPOCHS, learning_rate=0.003, class_weighting="balanced", seed=seed)
    head = head_math.train_head(head, standardise(train_x), train_y, config)
    pred = head_math.logits(head, standardise(val_x)).argmax(1)
    m = classification_metrics(val_y, pred, CLASS_NAMES)
    return {k: m[k] for k in ("top1", "macro_f1", "balanced_accuracy")}


def probe_run(run_dir: Path, data: Path) -> dict[str, dict]:
    """{"random": scores, "pretrained": scores} for one run directory with a finished pretrain stage."""
    from qana.model import build_model
    from qana.run_record import recorded_options
    from qana.train import load_split, run_dataset, set_seeds

    opts = recorded_options(run_dir, data)
    weights = run_dir / "pretrain.weights.h5"
    if opts.pretrain_epochs <= 0 or not weights.is_file():
        raise SystemExit(f"{run_dir}: no finished pretrain stage (pretrain.weights.h5); train it with --pretrain-epochs N")
    train, val, _ = load_split(opts, run_dataset(opts))
    set_seeds(opts.seed)
    random_start = build_model(opts.model_spec())  # what stage_pretrain starts from (same seed)
    pretrained = build_model(opts.model_spec())
    pretrained.load_weights(str(weights))
    out = {}
    for name, model in (("random", random_start), ("pretrained", pretrained)):
        out[name] = probe_scores(frozen_features(model, train.images), train.labels,
                                 frozen_features(model, val.images), val.labels, opts.seed)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="qana train run directories with a finished pretrain stage")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"{'run':28s} {'backbone':11s} {'val top1':>8s} {'mF1':>6s} {'balAcc':>6s}   (linear probe, frozen features)")
    for run_dir in args.runs:
        for name, m in probe_run(run_dir, args.data).items():
            print(f"{str(run_dir):28s} {name:11s} {m['top1']:8.3f} {m['macro_f1']:6.3f} {m['balanced_accuracy']:6.3f}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
