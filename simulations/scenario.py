"""The `new-class` scenario: one clinic brings a class the federation has not seen, at round k.

What is simulated (`qana-sim run --scenario new-class --new-class df --new-class-round 3`):

- the federation starts with every class but the new one (`initial-classes` of the ServerApp);
- the new class's *training* images exist at one clinic only: the clinic with the most
  training lesions of it (or `--new-class-clinic`). Every other clinic's lesions of that class
  are moved to its local test part: they never train on the class, but their test images show
  whether the grown head recognises it there too ("recall at every clinic");
- the introducing clinic runs `client.clinic` with `new-classes=<class>` and
  `new-classes-from-round=k`, exactly as `qana-client start --new-class` would from round k:
  before round k its images of the class are left out, from round k its head grows by the
  class and the coordinator merges heads with differing class sets by class name.

What is reported, from the heads the audit log recorded for every round (the same heads the
clinics ran on their chips): recall of the new class on each clinic's test images, and
macro-F1 over the old classes (test images of old classes only; a new-class prediction on an
old-class image counts as an error) on every clinic's test part pooled, before the class
appeared (round k-1) and at the end. The target: old classes lose at most 1 point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qana.edge import EdgeHead, predict_edge_reference
from qana.head import Head, predict, quantize_head
from qana.metrics import classification_metrics
from simulations.baselines import data_columns
from simulations.partition import ClinicPart, Partition

OLD_CLASS_TOLERANCE = 0.01  # the target: old classes drop by at most 1 point


class ScenarioError(ValueError):
    """The scenario cannot be set up on this data; the message says why."""


@dataclass(frozen=True)
class NewClass:
    """Who introduces which class when."""

    name: str
    clinic_id: str
    from_round: int
    moved_to_test: dict[str, int]  # other clinics: training images of the class moved to their test part

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "clinic": self.clinic_id, "round": self.from_round, "moved_to_test": dict(self.moved_to_test)}


def apply_new_class(
    partition: Partition,
    labels: np.ndarray,
    lesion_ids: np.ndarray,
    class_names: Sequence[str],
    name: str,
    from_round: int,
    clinic_id: str | None = None,
) -> tuple[Partition, NewClass]:
    """The partition of the scenario: the new class's training lesions kept at one clinic only."""
    if name not in class_names:
        raise ScenarioError(f"new class {name!r} is not a class of the data ({', '.join(class_names)})")
    if from_round < 1:
        raise ScenarioError(f"new-class round {from_round}: must be 1 or later")
    label = list(class_names).index(name)
    train_counts = {p.clinic_id: int(len(np.unique(lesion_ids[p.train[labels[p.train] == label]]))) for p in partition.clinics}
    if clinic_id is None:
        clinic_id = max(train_counts, key=lambda c: (train_counts[c], c))
    if clinic_id not in train_counts:
        raise ScenarioError(f"new-class clinic {clinic_id!r} is not one of {', '.join(train_counts)}")
    if train_counts[clinic_id] == 0:
        raise ScenarioError(f"{clinic_id} has no training images of {name!r}; choose another class or clinic")
    clinics: list[ClinicPart] = []
    moved: dict[str, int] = {}
    for part in partition.clinics:
        if part.clinic_id == clinic_id:
            clinics.append(part)
            continue
        is_new = labels[part.train] == label
        moved[part.clinic_id] = int(is_new.sum())
        clinics.append(
            replace(part, train=part.train[~is_new], test=np.sort(np.concatenate([part.test, part.train[is_new]])))
        )
        if len(clinics[-1].train) == 0:
            raise ScenarioError(f"{part.clinic_id} would keep no training images without {name!r}")
    note = (
        f"new-class scenario: {name!r} enters at round {from_round} from {clinic_id} "
        f"({train_counts[clinic_id]} training lesions); other clinics' {name} images are test-only"
    )
    return replace(partition, clinics=tuple(clinics), notes=(*partition.notes, note)), NewClass(name, clinic_id, from_round, moved)


def _predicted_labels(head: Head | EdgeHead, target: str, features: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Predictions as indices of the data's classes (heads may have fewer, or other-ordered, classes)."""
    if isinstance(head, EdgeHead):
        pred = predict_edge_reference(head, features)
    else:
        pred = predict(quantize_head(head, target), features)
    return data_columns(head.classes, class_names)[pred] if len(pred) else pred


def round_scores(
    head: Head | EdgeHead,
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    class_names: Sequence[str],
    new_class: str,
) -> dict[str, Any]:
    """New-class recall per clinic and old-class macro-F1 (pooled and per clinic) of one head."""
    label = list(class_names).index(new_class)
    recall: dict[str, float | None] = {}
    old_by_clinic: dict[str, float] = {}
    truths, preds = [], []
    for part in partition.clinics:
        y = labels[part.test]
        pred = _predicted_labels(head, target, features[part.test], class_names)
        is_new = y == label
        recall[part.clinic_id] = float(np.mean(pred[is_new] == label)) if is_new.any() else None
        old_truth, old_pred = y[~is_new], pred[~is_new]
        old_by_clinic[part.clinic_id] = classification_metrics(old_truth, old_pred, tuple(class_names))["macro_f1"]
        truths.append(old_truth)
        preds.append(old_pred)
    pooled = classification_metrics(np.concatenate(truths), np.concatenate(preds), tuple(class_names))
    measured = [v for v in recall.values() if v is not None]
    return {
        "has_class": new_class in head.classes,
        "new_class_recall": recall,
        "new_class_recall_mean": float(np.mean(measured)) if measured else None,
        "old_macro_f1": float(pooled["macro_f1"]),
        "old_macro_f1_by_clinic": old_by_clinic,
    }


def scenario_summary(
    heads: dict[int, Head | EdgeHead],
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    class_names: Sequence[str],
    scenario: NewClass,
) -> dict[str, Any]:
    """Per-round scores and the before/after comparison the report shows."""
    rounds = {r: round_scores(h, target, features, labels, partition, class_names, scenario.name) for r, h in sorted(heads.items())}
    before_round = scenario.from_round - 1
    last = max(rounds) if rounds else None
    appeared = [r for r, s in rounds.items() if s["has_class"]]
    out: dict[str, Any] = {**scenario.to_dict(), "rounds": {str(r): s for r, s in rounds.items()}}
    out["appeared_in_round"] = min(appeared) if appeared else None
    if before_round in rounds and last is not None and last > before_round:
        before, after = rounds[before_round]["old_macro_f1"], rounds[last]["old_macro_f1"]
        out["old_macro_f1_before"] = before
        out["old_macro_f1_after"] = after
        out["old_macro_f1_change"] = after - before
        out["old_classes_within_target"] = bool(after >= before - OLD_CLASS_TOLERANCE)
        out["new_class_recall_after"] = rounds[last]["new_class_recall"]
    return out
