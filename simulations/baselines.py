"""What the consortium is compared with: pooled (centralised) and local-only head training.

Both baselines use exactly what a clinic uses in a federated round — the cached backbone
features, `qana.learning.train_local_head` (SMOTE in PCA-whitened space, then
`qana.head.train_head`) and `qana.head.quantize_head` — with the same settings, the same
initial head and the same per-round seed (`seed + round`, as `client.clinic.Clinic.train`).
Only the data differ:

- pooled: one head trained on the union of all clinics' training parts (what a central
  server holding everyone's images would get);
- local-only: every clinic trains its own head on its own training part and never talks to
  anyone.

"Round" r of a baseline means r x local-epochs epochs, continued from round r-1's head: every
training image is seen as often as in r federated rounds, so curves are comparable round by
round. Every method is scored on the same images: each clinic's local test part, with the
quantized head's integer arithmetic (`qana.head.predict`), which is what the chip computes
(a federated clinic refuses to report numbers its chip does not reproduce exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qana.learning import train_local_head
from qana.edge import EdgeHead, predict_edge_reference
from qana.head import Head, TrainConfig, init_head, predict, quantize_head
from qana.metrics import classification_metrics
from simulations.config import SimConfig
from simulations.partition import Partition

METRICS = ("top1", "macro_f1", "balanced_accuracy")


@dataclass
class Scores:
    """One head (or one head per clinic) scored on every clinic's local test part."""

    overall: dict[str, float]  # on the union of all clinics' test parts
    by_clinic: dict[str, dict[str, float]]
    confusion: list[list[int]] = field(default_factory=list)  # union, rows = true class

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall, "by_clinic": self.by_clinic, "confusion": self.confusion}


def round_config(cfg: SimConfig, server_round: int) -> TrainConfig:
    """The local training settings of round `server_round`, as `client.clinic.Clinic.train` builds them."""
    return TrainConfig(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        l2=cfg.l2,
        proximal_mu=0.0,
        absent_classes=cfg.absent_classes,  # as the federated clinics are told (SimConfig, default keep)
        seed=cfg.seed + server_round,
    )


def initial_head(cfg: SimConfig, bundle_head: Head) -> Head:
    """The head every method starts from: as the coordinator picks it (`initial-head` random|bundle)."""
    if cfg.initial_head == "bundle":
        return bundle_head
    return init_head(bundle_head.num_features, bundle_head.classes, bundle_head.feature_scale, seed=cfg.seed)


def _summary(result: dict[str, Any]) -> dict[str, float]:
    return {**{k: float(result[k]) for k in METRICS}, "n": int(result["n"])}


def data_columns(head_classes: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """For each head column, the index of its class in the data's classes (matched by name)."""
    unknown = [c for c in head_classes if c not in classes]
    if unknown:
        raise ValueError(f"head class(es) {', '.join(unknown)} are not classes of the data ({', '.join(classes)})")
    return np.array([list(classes).index(c) for c in head_classes], dtype=np.int64)


def score(
    heads: Callable[[str], Head | EdgeHead],
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    classes: Sequence[str],
) -> Scores:
    """Score `heads(clinic_id)` on each clinic's test part, per clinic and on their union.

    Head columns are matched to the data's classes by name (a federation may run with fewer
    classes, or a grown head with its own order). Test images of a class the head does not
    have are left out, as a clinic leaves them out of its own evaluation (so the driver's
    scores equal the clinics' on-chip reports); the new-class scenario scores those images
    separately (`simulations.scenario`).
    """
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    by_clinic = {}
    quantized: dict[int, Any] = {}
    for part in partition.clinics:
        head = heads(part.clinic_id)
        q = quantized.get(id(head))
        if q is None:  # an akida-edge head is scored as it is: its neurons are what the chip holds
            q = quantized[id(head)] = head if isinstance(head, EdgeHead) else quantize_head(head, target)
        test, truth = part.test, labels[part.test]
        if tuple(head.classes) != tuple(classes):
            to_data = data_columns(head.classes, classes)
            known = np.isin(truth, to_data)
            test, truth = test[known], truth[known]
        pred = predict_edge_reference(q, features[test]) if isinstance(q, EdgeHead) else predict(q, features[test])
        if tuple(head.classes) != tuple(classes):
            pred = to_data[pred] if len(pred) else pred
        by_clinic[part.clinic_id] = _summary(classification_metrics(truth, pred, classes))
        y_true.append(truth)
        y_pred.append(pred)
    union = classification_metrics(np.concatenate(y_true), np.concatenate(y_pred), classes)
    return Scores(_summary(union), by_clinic, union["confusion"])


def pooled(
    cfg: SimConfig,
    start: Head,
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    on_round: Callable[[int], None] | None = None,
) -> list[Scores]:
    """Centralised training on all clinics' training parts; scores for rounds 0..R."""
    train = np.concatenate([p.train for p in partition.clinics])
    x, y = features[train], labels[train]
    head = start
    curve = [score(lambda _c: head, target, features, labels, partition, start.classes)]
    for r in range(1, cfg.rounds + 1):
        head, _ = train_local_head(head, x, y, round_config(cfg, r), smote=cfg.smote)
        curve.append(score(lambda _c: head, target, features, labels, partition, start.classes))
        if on_round is not None:
            on_round(r)
    return curve


def local_only(
    cfg: SimConfig,
    start: Head,
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    on_round: Callable[[int], None] | None = None,
) -> list[Scores]:
    """Every clinic alone on its own training part; each scored on its own test part; rounds 0..R."""
    heads = {p.clinic_id: start for p in partition.clinics}
    curve = [score(lambda c: heads[c], target, features, labels, partition, start.classes)]
    for r in range(1, cfg.rounds + 1):
        for part in partition.clinics:
            heads[part.clinic_id], _ = train_local_head(
                heads[part.clinic_id], features[part.train], labels[part.train], round_config(cfg, r), smote=cfg.smote
            )
        curve.append(score(lambda c: heads[c], target, features, labels, partition, start.classes))
        if on_round is not None:
            on_round(r)
    return curve
