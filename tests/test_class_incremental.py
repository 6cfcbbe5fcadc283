"""Class-incremental merge: heads with different class sets, consistent order and shapes, audit record."""

from __future__ import annotations

import numpy as np
import pytest

from qana.head import (
    Head,
    TrainConfig,
    align_heads,
    grow_head,
    init_head,
    merge_aligned,
    predict,
    train_head,
)
from server.audit import AuditLog, EntryFilter
from server.class_incremental import ClinicHead, merge_class_incremental

GLOBAL = ("akiec", "bcc", "mel")
D = 12


def random_head(classes, seed: int) -> Head:
    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(D, len(classes))), rng.normal(size=len(classes)), classes)


def test_align_keeps_global_order_appends_new_classes_and_matches_columns_by_name() -> None:
    a = random_head(GLOBAL, 1)
    b = grow_head(random_head(GLOBAL, 2), GLOBAL + ("vasc",), seed=0)
    c = random_head(("mel", "akiec", "bcc", "df"), 3)  # own order differs: columns go by name
    classes, aligned = align_heads([a, b, c], base=GLOBAL)
    assert classes == GLOBAL + ("vasc", "df")
    assert all(h.classes == classes and h.weights.shape == (D, 5) and h.bias.shape == (5,) for h in aligned)
    np.testing.assert_array_equal(aligned[2].weights[:, 2], c.weights[:, 0])  # mel
    np.testing.assert_array_equal(aligned[2].weights[:, 4], c.weights[:, 3])  # df
    np.testing.assert_allclose(aligned[0].weights[:, 3], a.weights.mean(axis=1), rtol=1e-6)  # vasc filled
    # the global order always leads; new classes follow in first-seen order
    assert align_heads([c, b, a], base=GLOBAL)[0] == GLOBAL + ("df", "vasc")
    assert align_heads([c])[0] == ("mel", "akiec", "bcc", "df")  # without a base: the first head's order


def test_merge_averages_each_column_over_the_clinics_that_have_the_class() -> None:
    a = random_head(GLOBAL, 1)
    b = random_head(GLOBAL + ("vasc",), 2)
    merged = merge_aligned([a, b], [30, 10], base=GLOBAL)
    assert merged.classes == GLOBAL + ("vasc",)
    np.testing.assert_allclose(merged.weights[:, :3], 0.75 * a.weights + 0.25 * b.weights[:, :3], rtol=1e-5)
    np.testing.assert_allclose(merged.bias[:3], 0.75 * a.bias + 0.25 * b.bias[:3], rtol=1e-5)
    np.testing.assert_allclose(merged.weights[:, 3], b.weights[:, 3], rtol=1e-6)  # only b has vasc
    np.testing.assert_allclose(merged.bias[3], b.bias[3], rtol=1e-6)
    # equal class sets: plain FedAvg
    same = merge_aligned([a, random_head(GLOBAL, 5)], [1, 3])
    np.testing.assert_allclose(same.weights, 0.25 * a.weights + 0.75 * random_head(GLOBAL, 5).weights, rtol=1e-5)


def test_a_class_learned_at_one_clinic_is_recognised_by_the_merged_head() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(4, D))  # three global classes + one new one, separable

    def sample(cls: int, n: int) -> np.ndarray:
        return centres[cls] + rng.normal(0, 1, size=(n, D))

    x_old = np.concatenate([sample(k, 60) for k in range(3)])
    y_old = np.repeat(np.arange(3), 60)
    cfg = TrainConfig(epochs=30, learning_rate=0.05, seed=0)
    clinic_a = train_head(init_head(D, GLOBAL), x_old, y_old, cfg)
    grown = grow_head(init_head(D, GLOBAL), GLOBAL + ("vasc",))
    x_b = np.concatenate([x_old[::2], sample(3, 60)])
    y_b = np.concatenate([y_old[::2], np.full(60, 3)])
    clinic_b = train_head(grown, x_b, y_b, cfg)
    merged = merge_aligned([clinic_a, clinic_b], [180, 150], base=GLOBAL)
    x_test = np.concatenate([sample(k, 50) for k in range(4)])
    y_test = np.repeat(np.arange(4), 50)
    pred = predict(merged, x_test)
    assert np.mean(pred[y_test == 3] == 3) >= 0.9
    assert np.mean(pred[y_test < 3] == y_test[y_test < 3]) >= 0.9


def test_heads_of_different_backbones_or_with_duplicate_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="different backbones"):
        align_heads([random_head(GLOBAL, 1), Head(np.zeros((D + 1, 3)), np.zeros(3), GLOBAL)])
    with pytest.raises(ValueError, match="lists a class twice"):
        align_heads([Head(np.zeros((D, 2)), np.zeros(2), ("mel", "mel"))])
    with pytest.raises(ValueError, match="weights"):
        merge_aligned([random_head(GLOBAL, 1)], [0])


def test_coordinator_merge_is_order_independent_and_audits_the_class_addition(tmp_path) -> None:
    updates = [
        ClinicHead("clinic-c", random_head(GLOBAL + ("df",), 3), 20),
        ClinicHead("clinic-a", random_head(GLOBAL, 1), 40),
        ClinicHead("clinic-b", random_head(GLOBAL + ("vasc",), 2), 30),
    ]
    log = AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "audit.key")
    try:
        merged, additions = merge_class_incremental(GLOBAL, updates, log, run_id="run-1", round_=4)
        assert merged.classes == GLOBAL + ("vasc", "df")  # clinic order b before c, whatever the reply order
        assert additions == [("vasc", "clinic-b"), ("df", "clinic-c")]
        again, _ = merge_class_incremental(GLOBAL, updates[::-1])
        np.testing.assert_array_equal(again.weights, merged.weights)
        entries = [e for e in log.entries(EntryFilter(run_id="run-1")) if e.kind == "class_addition"]
        assert [(e.body["class_name"], e.body["clinic_id"], e.body["round"]) for e in entries] == [
            ("vasc", "clinic-b", 4),
            ("df", "clinic-c", 4),
        ]
        # a round in which every clinic has the grown head adds (and records) nothing
        grown = [ClinicHead(u.clinic_id, align_heads([u.head], merged.classes)[1][0], u.num_examples) for u in updates]
        _, none = merge_class_incremental(merged.classes, grown, log, run_id="run-1", round_=5)
        assert none == []
        assert len([e for e in log.entries(EntryFilter(run_id="run-1")) if e.kind == "class_addition"]) == 2
        assert log.verify().ok
    finally:
        log.close()


def test_weights_whose_sum_overflows_are_refused_not_merged_to_zero() -> None:
    # 1e308 + 1e308 = inf: every share became 0 and the merged head was all zeros, silently
    with pytest.raises(ValueError, match="weights must be non-negative, finite, with a finite sum"):
        merge_aligned([random_head(GLOBAL, 1), random_head(GLOBAL, 2)], [1e308, 1e308])


def test_align_takes_a_one_shot_base_once() -> None:
    # an iterator was consumed by dict.fromkeys: "duplicate class names in the global order ()"
    classes, aligned = align_heads([random_head(("bcc", "mel"), 1)], base=iter(("akiec", "bcc")))
    assert classes == ("akiec", "bcc", "mel") and aligned[0].classes == classes
