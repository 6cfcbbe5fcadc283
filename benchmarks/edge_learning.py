"""Gradient head vs Akida edge-learning head, local-only per centre vs merged across HAM10000's centres.

    python benchmarks/edge_learning.py --bundle /work/runs/v1/bundle --data /work/shared/data/ham10000 \
        [--split /work/runs/v1/split.npz] [--rounds 5] [--seed 0] [--json out.json]

The four HAM10000 centres (the metadata's `dataset` column) are the clinics. Every image's
binary features are computed once with the v1 bundle's backbone (Akida software backend) and
cached by bundle id. Splits are lesion-grouped:

- with `--split` (the bundle's training split, default `<bundle>/../split.npz` when present),
  clinics learn on the backbone's train+val images of their centre and everything is tested on
  the backbone's held-out test images, so neither backbone nor head has seen a test lesion;
- without it, each centre's lesions are split 70/30 (grouped by lesion, stratified by dx); the
  backbone may then have seen test images, which inflates both heads alike.

Methods, all on the same features and splits:

  gradient  local-only    qana.head softmax regression at each centre (SMOTE on PCA-whitened
                          features, as clinics do), quantized to the v1 head (4-bit) and predicted
                          with the integer head
  gradient  federated     FedAvg of the float heads, weighted by training images, `--rounds`
                          rounds of `--local-epochs` epochs from a shared random start
  edge      local-only    qana.edge.learn_edge_head (Akida's AkidaUnsupervised, software backend)
  edge      merged 1 rnd  qana.edge.merge_edge_heads of the four local heads (one shot)
  edge      merged N rnd  clinics continue on-chip learning from the merged head, merged again,
                          `--rounds` times
  edge      bit-avg       the straw man: neuron-wise mean of the four heads' bits, re-binarised
  * central               both heads trained on all centres' training data pooled (upper reference)

Edge settings are chosen by every centre on its own training data (qana.edge.choose_edge_params)
and combined as a federation would (qana.edge.federation_edge_params: median num_weights and
neurons per class, most frequent learning competition). Prints macro-F1 and balanced accuracy on all centres' test images pooled,
and the mean over centres of each centre's own test images.

Measured on the v1 bundle af2e0b7df949 (/work/runs/v1/bundle, D=256, median 77 spikes per image;
the session-6 bundle a16cfc4ec6b1 has the same backbone and head.npz, only its chip head layer differs),
its own split, `--rounds 5`, seeds 0 / 1 / 2; all centres' held-out test images (n=1282):

    method                          macro-F1            balanced accuracy
    gradient local-only (mean)      0.271 0.291 0.275   0.395 0.402 0.402
    gradient federated, 5 rnd       0.404 0.411 0.403   0.476 0.466 0.486
    gradient central                0.497 0.484 0.492   0.555 0.534 0.523
    edge local-only (mean)          0.293 0.258 0.252   0.426 0.409 0.409
    edge merged, 1 rnd              0.437 0.444 0.425   0.565 0.578 0.562
    edge bit-averaged (straw man)   0.293 0.271 0.303   0.502 0.484 0.532
    edge merged, 5 rnd              0.421 0.402 0.383   0.546 0.516 0.543
    edge central                    0.411 0.419 0.388   0.562 0.571 0.522

Re-presenting the same local data in every round slowly pulls the merged neurons back towards
each clinic's own distribution (5 rounds < 1 round); edge rounds should carry new data.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from qana import edge  # noqa: E402
from qana import head as head_math  # noqa: E402
from qana.atomic import write_atomic  # noqa: E402
from qana.data import DEFAULT_CACHE_DIR  # noqa: E402
from qana.metrics import classification_metrics  # noqa: E402


def cached_features(bundle, dataset, cache_dir: Path) -> np.ndarray:
    """Backbone features of every image, computed once per (bundle, image set)."""
    from qana.runtime import AkidaRuntime

    digest = hashlib.sha256("".join(dataset.content_hashes).encode()).hexdigest()[:16]
    path = cache_dir / f"features-{bundle.bundle_id[:16]}-{digest}.npy"
    if path.is_file():
        try:
            feats = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # a run killed while writing it (before session 22): compute again
            feats = None
        if isinstance(feats, np.ndarray) and feats.shape == (len(dataset), bundle.feature_dim):
            return feats
    runtime = AkidaRuntime(bundle, device="software")
    t0 = time.perf_counter()
    feats = runtime.features(dataset.images, batch_size=128).astype(np.uint8)
    print(f"features: {len(dataset)} images in {time.perf_counter() - t0:.0f} s ({runtime.device_description})", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, feats)
    write_atomic(path, buffer.getvalue())  # never a half-written cache file
    return feats


def make_splits(dataset, split_path: Path | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Boolean train / test masks over the dataset, and a description of where they came from."""
    from qana.splits import grouped_split

    n = len(dataset)
    train, test = np.zeros(n, bool), np.zeros(n, bool)
    if split_path is not None:
        with np.load(split_path, allow_pickle=False) as z:
            ids = z["image_ids"]
            where = {str(i): k for k, i in enumerate(dataset.image_ids)}
            for key, mask in (("train", train), ("val", train), ("test", test)):
                rows = [where[str(ids[i])] for i in z[key] if str(ids[i]) in where]
                mask[rows] = True
        return train, test, f"bundle split {split_path} (clinics: train+val, test: held-out test)"
    for centre in np.unique(dataset.centres):
        rows = np.flatnonzero(dataset.centres == centre)
        tr, te = grouped_split(dataset.labels[rows], dataset.lesion_ids[rows], (0.7, 0.3), seed)
        train[rows[tr]] = True
        test[rows[te]] = True
    return train, test, "per-centre 70/30 lesion-grouped split (backbone may have seen test images)"


# --------------------------------------------------------------------------- gradient head


def gradient_fit(head, x, y, epochs: int, seed: int, smote: bool = True):
    """A clinic's local gradient training: SMOTE on PCA-whitened features, then qana.head.train_head."""
    from qana.imbalance import smote_whitened

    xs, ys = smote_whitened(x, y, seed=seed) if smote else (x.astype(np.float32), y)
    cfg = head_math.TrainConfig(epochs=epochs, learning_rate=0.003, class_weighting="none" if smote else "balanced", seed=seed)
    return head_math.train_head(head, xs, ys, cfg)


def gradient_predict(head, x) -> np.ndarray:
    return head_math.predict(head_math.quantize_head(head, "v1"), x)


def fedavg(heads, weights) -> head_math.Head:
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    return head_math.Head(
        sum(wi * h.weights for wi, h in zip(w, heads)).astype(np.float32),
        sum(wi * h.bias for wi, h in zip(w, heads)).astype(np.float32),
        heads[0].classes,
        heads[0].feature_scale,
    )


# --------------------------------------------------------------------------- edge head


def bit_average(heads: list[edge.EdgeHead], seed: int) -> edge.EdgeHead:
    """Straw man: FedAvg applied to binary neurons (neuron-wise mean, keep the num_weights largest)."""
    rng = np.random.default_rng(seed)
    mean = np.mean([h.weights for h in heads], axis=0) + rng.random(heads[0].weights.shape) * 1e-6
    top = np.argsort(-mean, axis=1)[:, : heads[0].num_weights]
    w = np.zeros(mean.shape, np.uint8)
    np.put_along_axis(w, top, 1, axis=1)
    h = heads[0]
    return edge.EdgeHead(
        np.packbits(w, axis=1), h.num_features, h.neuron_classes, h.threshold, h.act_step, h.threshold_learning,
        h.thswap, np.sum([x.usage for x in heads], axis=0), h.classes, h.num_weights, h.learning_competition,
    )


# --------------------------------------------------------------------------- report


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes) -> dict[str, float]:
    m = classification_metrics(y_true, y_pred, classes)
    return {"macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"], "n": m["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "qana" / "bundles" / "v1", help="a v1 bundle (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000", help="HAM10000-style folder")
    parser.add_argument("--split", type=Path, default=None, help="split.npz of the bundle's training run (default: <bundle>/../split.npz if present)")
    parser.add_argument("--no-split", action="store_true", help="ignore the bundle's split; split each centre 70/30 by lesion")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5, help="gradient epochs per federated round")
    parser.add_argument("--epochs", type=int, default=30, help="gradient epochs for local-only and central heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR / "edge-bench")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    args = parser.parse_args()
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        # checked before the hour of computing, not after it
        raise SystemExit(f"error: --json {args.json}: a folder, or its folder does not exist; give a file path")

    from qana.bundle import load_bundle
    from qana.data import load_dataset

    bundle = load_bundle(args.bundle)
    if bundle.target != "v1":
        raise SystemExit(f"{args.bundle} targets {bundle.target}; edge learning needs the v1 bundle")
    dataset = load_dataset(args.data, size=bundle.input_shape[0])
    classes = bundle.classes
    feats = cached_features(bundle, dataset, args.cache_dir)
    split_path = None if args.no_split else (args.split or (args.bundle.parent / "split.npz"))
    if split_path is not None and not split_path.is_file():
        if args.split is not None:
            raise SystemExit(f"split file not found: {split_path}")
        split_path = None
    train, test, split_desc = make_splits(dataset, split_path, args.seed)
    centres = sorted(np.unique(dataset.centres))
    y = dataset.labels
    print(f"bundle {bundle.path} ({bundle.bundle_id[:12]}), {len(dataset)} images, D={bundle.feature_dim}, "
          f"median spikes/image {np.median(feats.sum(1)):.0f}; {split_desc}")
    for c in centres:
        tr, te = train & (dataset.centres == c), test & (dataset.centres == c)
        print(f"  {c:14s} train {tr.sum():5d}  test {te.sum():4d}  train classes {np.bincount(y[tr], minlength=len(classes)).tolist()}")

    local_train = {c: np.flatnonzero(train & (dataset.centres == c)) for c in centres}
    local_test = {c: np.flatnonzero(test & (dataset.centres == c)) for c in centres}
    all_test = np.flatnonzero(test)
    all_train = np.flatnonzero(train)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def evaluate(name: str, own_predict, pooled: dict[str, float] | None = None) -> None:
        """own_predict(centre, rows) -> class indices for that centre's test rows; `pooled` are the
        scores on all centres' test images (computed from own_predict(None, ...) when not given)."""
        if pooled is None:
            pooled = scores(y[all_test], own_predict(None, all_test), classes)
        own = [scores(y[local_test[c]], own_predict(c, local_test[c]), classes) for c in centres if len(local_test[c])]
        results[name] = {
            "all_test": {k: float(pooled[k]) for k in ("macro_f1", "balanced_accuracy")},
            "own_centre_mean": {k: float(np.mean([o[k] for o in own])) for k in ("macro_f1", "balanced_accuracy")},
        }

    def mean_scores(predictions: list[np.ndarray]) -> dict[str, float]:
        """Local-only heads on all centres' test images: the mean of the heads' scores."""
        each = [scores(y[all_test], p, classes) for p in predictions]
        return {k: float(np.mean([e[k] for e in each])) for k in ("macro_f1", "balanced_accuracy")}

    # ---- edge settings, chosen per centre and combined as a federation would
    t0 = time.perf_counter()
    chosen = {}
    for c in centres:
        rows = local_train[c]
        chosen[c] = edge.choose_edge_params(feats[rows], y[rows], classes, groups=dataset.lesion_ids[rows], seed=args.seed)
    federation = edge.federation_edge_params(list(chosen.values()))
    nw, npc, comp = federation.num_weights, federation.neurons_per_class, federation.learning_competition
    timings["choose_edge_params"] = time.perf_counter() - t0
    for c, p in chosen.items():
        print(f"  {c:14s} chose num_weights={p.num_weights} neurons/class={p.neurons_per_class} competition={p.learning_competition} (median spikes {p.median_active:.0f})")
    print(f"federation edge settings: num_weights={nw}, neurons/class={npc}, learning_competition={comp}")
    central_params = edge.choose_edge_params(feats[all_train], y[all_train], classes, groups=dataset.lesion_ids[all_train], seed=args.seed)

    # ---- gradient head
    t0 = time.perf_counter()
    start = head_math.init_head(bundle.feature_dim, classes, float(bundle.manifest.get("feature_scale", 1.0)), seed=args.seed)
    grad_local = {c: gradient_fit(start, feats[r], y[r], args.epochs, args.seed) for c, r in local_train.items()}
    evaluate(
        "gradient local-only",
        lambda c, rows: gradient_predict(grad_local[c], feats[rows]),
        mean_scores([gradient_predict(h, feats[all_test]) for h in grad_local.values()]),
    )
    global_head = start
    for r in range(args.rounds):
        updates = [gradient_fit(global_head, feats[rows], y[rows], args.local_epochs, args.seed + r) for rows in local_train.values()]
        global_head = fedavg(updates, [len(rows) for rows in local_train.values()])
    evaluate(f"gradient federated ({args.rounds} rnd FedAvg)", lambda c, rows: gradient_predict(global_head, feats[rows]))
    grad_central = gradient_fit(start, feats[all_train], y[all_train], args.epochs, args.seed)
    evaluate("gradient central (pooled data)", lambda c, rows: gradient_predict(grad_central, feats[rows]))
    timings["gradient"] = time.perf_counter() - t0

    # ---- edge head
    t0 = time.perf_counter()
    edge_local = {
        c: edge.learn_edge_head(feats[r], y[r], classes, npc, nw, comp, seed=args.seed + i)
        for i, (c, r) in enumerate(local_train.items())
    }
    evaluate(
        "edge local-only",
        lambda c, rows: edge.predict_edge(edge_local[c], feats[rows]),
        mean_scores([edge.predict_edge(h, feats[all_test]) for h in edge_local.values()]),
    )
    heads = list(edge_local.values())
    merged = edge.merge_edge_heads(heads, npc, seed=args.seed, classes=classes)
    evaluate("edge merged (1 rnd, k-medoids)", lambda c, rows: edge.predict_edge(merged, feats[rows]))
    straw = bit_average(heads, args.seed)
    evaluate("edge bit-averaged (straw man)", lambda c, rows: edge.predict_edge(straw, feats[rows]))
    current = merged
    for r in range(1, args.rounds):
        updates = [
            edge.learn_edge_head(feats[rows], y[rows], classes, npc, nw, comp, seed=args.seed + 100 * r + i, init=current)
            for i, rows in enumerate(local_train.values())
        ]
        current = edge.merge_edge_heads(updates, npc, seed=args.seed + r, classes=classes)
    evaluate(f"edge merged ({args.rounds} rnd, k-medoids)", lambda c, rows: edge.predict_edge(current, feats[rows]))
    edge_central = edge.learn_edge_head(feats[all_train], y[all_train], classes, central_params.neurons_per_class,
                                        central_params.num_weights, central_params.learning_competition, seed=args.seed)
    evaluate("edge central (pooled data)", lambda c, rows: edge.predict_edge(edge_central, feats[rows]))
    timings["edge"] = time.perf_counter() - t0
    wire = len(merged.to_npz())

    # ---- table
    print()
    print(f"{'method':40s} {'all centres: macro-F1':>22s} {'bal-acc':>8s}   {'own centre: macro-F1':>21s} {'bal-acc':>8s}")
    for name, res in results.items():
        a, o = res["all_test"], res["own_centre_mean"]
        print(f"{name:40s} {a['macro_f1']:22.3f} {a['balanced_accuracy']:8.3f}   {o['macro_f1']:21.3f} {o['balanced_accuracy']:8.3f}")
    print("\nlocal-only 'all centres' = mean over the four local heads; 'own centre' = mean over centres of their own test images.")
    print(f"edge head on the wire: {merged.num_neurons} neurons x {merged.num_features} bits -> {wire} bytes (npz); "
          f"central edge settings: num_weights={central_params.num_weights}, neurons/class={central_params.neurons_per_class}, "
          f"competition={central_params.learning_competition}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        write_atomic(args.json, json.dumps({
            "bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "split": split_desc, "seed": args.seed,
            "rounds": args.rounds, "edge_settings": {"num_weights": nw, "neurons_per_class": npc, "learning_competition": comp},
            "per_centre_choice": {c: {"num_weights": p.num_weights, "neurons_per_class": p.neurons_per_class,
                                      "learning_competition": p.learning_competition, "sweep": list(p.sweep)} for c, p in chosen.items()},
            "results": results, "seconds": timings, "edge_head_bytes": wire,
        }, indent=2).encode())


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
