"""The new-class simulation scenario: data placement and the before/after scores."""

from __future__ import annotations

import numpy as np
import pytest

from qana.head import Head
from simulations.partition import make_partition
from simulations.scenario import (
    ScenarioError,
    apply_new_class,
    round_scores,
    scenario_summary,
)

CLASSES = ("a", "b", "new")


def _data(n_lesions: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    lesion_labels = rng.choice(3, n_lesions, p=[0.45, 0.45, 0.10])
    per = rng.integers(1, 3, n_lesions)
    labels = np.repeat(lesion_labels, per)
    lesions = np.repeat(np.array([f"L{i:04d}" for i in range(n_lesions)]), per)
    centres = np.repeat(np.array(["c1", "c2", "c3"])[np.arange(n_lesions) % 3], per)
    means = np.array([[40, 0, 0], [0, 40, 0], [0, 0, 40]], float)
    features = np.clip(np.round(means[labels] + rng.normal(0, 6, (len(labels), 3))), 0, 255).astype(np.int16)
    return features, labels, lesions, centres


def test_the_new_class_trains_at_one_clinic_only_and_is_tested_everywhere() -> None:
    features, labels, lesions, centres = _data()
    part = make_partition(labels, lesions, centres, split="centre", num_clinics=None, seed=0)
    scen_part, scen = apply_new_class(part, labels, lesions, CLASSES, "new", from_round=2)
    new = CLASSES.index("new")
    trained_at = [p.clinic_id for p in scen_part.clinics if (labels[p.train] == new).any()]
    assert trained_at == [scen.clinic_id]
    for before, after in zip(part.clinics, scen_part.clinics):
        assert np.array_equal(np.sort(np.concatenate([after.train, after.test])), np.sort(np.concatenate([before.train, before.test])))
        if after.clinic_id != scen.clinic_id:
            assert scen.moved_to_test[after.clinic_id] == int((labels[before.train] == new).sum())
            assert set(lesions[after.train]).isdisjoint(lesions[after.test])  # still no lesion on both sides
    with pytest.raises(ScenarioError, match="not a class"):
        apply_new_class(part, labels, lesions, CLASSES, "zzz", from_round=2)
    with pytest.raises(ScenarioError, match="not one of"):
        apply_new_class(part, labels, lesions, CLASSES, "new", from_round=2, clinic_id="nowhere")


def test_scores_map_head_columns_by_class_name_and_report_old_class_change() -> None:
    features, labels, lesions, centres = _data(seed=1)
    part = make_partition(labels, lesions, centres, split="centre", num_clinics=None, seed=0)
    part, scen = apply_new_class(part, labels, lesions, CLASSES, "new", from_round=2)
    eye = np.eye(3, dtype=np.float32) / 40.0
    # before: a 2-class head whose columns are in another order than the data's classes
    before = Head(eye[:, [1, 0]], np.zeros(2, np.float32), ("b", "a"), 1.0)
    after = Head(eye, np.zeros(3, np.float32), CLASSES, 1.0)
    s_before = round_scores(before, "v2", features, labels, part, CLASSES, "new")
    s_after = round_scores(after, "v2", features, labels, part, CLASSES, "new")
    assert not s_before["has_class"] and s_after["has_class"]
    assert s_before["old_macro_f1"] > 0.95  # correct despite the column order
    assert all(v in (None, 0.0) for v in s_before["new_class_recall"].values())
    assert s_after["new_class_recall_mean"] > 0.9
    summary = scenario_summary({0: before, 1: before, 2: after}, "v2", features, labels, part, CLASSES, scen)
    assert summary["appeared_in_round"] == 2
    assert summary["old_classes_within_target"] and abs(summary["old_macro_f1_change"]) < 0.05
    # a grown head that swallows old classes is flagged
    greedy = Head(eye, np.array([0, 0, 5], np.float32), CLASSES, 1.0)
    bad = scenario_summary({1: before, 2: greedy}, "v2", features, labels, part, CLASSES, scen)
    assert not bad["old_classes_within_target"] and bad["old_macro_f1_change"] < -0.1
