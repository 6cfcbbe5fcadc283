"""Head training on features (`qana.learning`): the one recipe of clinics, baselines and the head stage."""

from __future__ import annotations

import numpy as np
import pytest

from qana.head import TrainConfig, init_head, predict, train_head
from qana.imbalance import smote_whitened
from qana.learning import train_local_head
from qana.train import fit_head


def test_local_training_reports_what_smote_added() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 40, (4, 16))
    y = np.array([0] * 40 + [1] * 6 + [2] * 3 + [3] * 1)
    x = np.clip(np.round(means[y] + rng.normal(0, 5, (len(y), 16))), 0, None).astype(np.int16)
    head = init_head(16, ("a", "b", "c", "d"), feature_scale=1 / 40)
    _, report = train_local_head(head, x, y, TrainConfig(epochs=2), smote=True)
    # class 3 has a single example: SMOTE cannot interpolate it
    assert report.smote_classes == (1, 2) and report.num_synthetic == (40 - 6) + (40 - 3)
    _, plain = train_local_head(head, x, y, TrainConfig(epochs=2), smote=False)
    assert plain.num_synthetic == 0 and plain.num_examples == 50


def test_local_training_learns_minority_classes_better_with_smote() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(0, 12, (3, 16))
    y = np.array([0] * 90 + [1] * 6 + [2] * 4)
    x = np.round(means[y] + rng.normal(0, 10, (len(y), 16))).astype(np.int16)
    yt = np.repeat([0, 1, 2], 200)
    xt = np.round(means[yt] + rng.normal(0, 10, (len(yt), 16))).astype(np.int16)
    head = init_head(16, ("a", "b", "c"), feature_scale=1 / 12)
    cfg = TrainConfig(epochs=30, learning_rate=0.05, class_weighting="none")
    plain, _ = train_local_head(head, x, y, cfg, smote=False)
    balanced, report = train_local_head(head, x, y, cfg, smote=True)
    assert report.num_synthetic == (90 - 6) + (90 - 4) and report.num_examples == 100
    minority = yt > 0
    assert np.mean(predict(balanced, xt[minority]) == yt[minority]) > np.mean(predict(plain, xt[minority]) == yt[minority])


def test_the_head_stage_trains_as_clinics_do() -> None:
    """qana.train.fit_head is train_local_head; after a full SMOTE its balanced weights are all exactly 1."""
    rng = np.random.default_rng(2)
    means = rng.normal(0, 12, (3, 8))
    y = np.array([0] * 60 + [1] * 12 + [2] * 7)
    x = np.round(means[y] + rng.normal(0, 10, (len(y), 8))).astype(np.int16)
    head = init_head(8, ("a", "b", "c"), feature_scale=1 / 12)
    central = fit_head(head, x, y, smote=True, seed=3, epochs=5)
    clinic, _ = train_local_head(head, x, y, TrainConfig(epochs=5, learning_rate=0.003, seed=3), smote=True)
    np.testing.assert_array_equal(central.weights, clinic.weights)
    # what the head stage computed before it shared the recipe: SMOTE, then no class weights
    x_all, y_all = smote_whitened(x, y, seed=3)
    before = train_head(head, x_all, y_all, TrainConfig(epochs=5, learning_rate=0.003, class_weighting="none", seed=3))
    np.testing.assert_array_equal(central.weights, before.weights)


@pytest.mark.parametrize("smote", [True, False])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda y: y.astype(float) + np.eye(1, len(y), 5)[0] * 0.7, "labels must be integer class indices, not float64"),
        (lambda y: np.where(np.arange(len(y)) == 0, -1, y), r"labels must be class indices in \[0, 3\); got -1..2"),
        (lambda y: np.where(np.arange(len(y)) == 0, 200_000_000, y), r"labels must be class indices in \[0, 3\); got 0..200000000"),
        (lambda y: y[1:], "40 feature rows but 39 labels"),
        (lambda y: y[:, None], r"labels must be a 1-D array of class indices, not shape \(40, 1\)"),
    ],
)
def test_local_training_checks_labels_as_train_head_does_before_smote(change, message, smote) -> None:
    """A label of 1.7 trained as class 1 (cast before the check); -1, 2e8 or a missing label reached
    np.bincount or sklearn inside SMOTE first (2e8 allocated 1.6 GB there)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (40, 6)).astype(np.uint8)
    y = np.array([0] * 30 + [1] * 8 + [2] * 2)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            train_local_head(init_head(6, "abc"), x, change(y), TrainConfig(epochs=1), smote=smote)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"refusing 40 labels allocated {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("smote", [True, False])
def test_local_training_names_features_that_are_not_finite(smote: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 6)).astype(np.float32)
    x[3, 1] = np.nan
    y = np.array([0] * 30 + [1] * 10)
    with pytest.raises(ValueError, match=r"features contain NaN or Inf \(1 row\(s\), first row 3\)"):
        train_local_head(init_head(6, "ab"), x, y, TrainConfig(epochs=1), smote=smote)


@pytest.mark.parametrize("labels", [[0] * 20 + [1] * 20, [0] * 30 + [1] * 10])
@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_smote_cannot_take_is_refused_whatever_the_data(labels, seed: int) -> None:
    """sklearn/imblearn take seeds in [0, 2**32): 2**32 failed only when SMOTE had a class to oversample."""
    x = np.random.default_rng(0).integers(0, 20, (40, 6)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\) for SMOTE"):
        train_local_head(init_head(6, "ab"), x, np.array(labels), TrainConfig(epochs=1, seed=seed), smote=True)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\) for SMOTE"):
        smote_whitened(x, np.array(labels), seed=seed)


def test_the_largest_smote_seed_works() -> None:
    x = np.random.default_rng(0).integers(0, 20, (40, 6)).astype(np.uint8)
    _, report = train_local_head(init_head(6, "ab"), x, np.array([0] * 30 + [1] * 10), TrainConfig(epochs=1, seed=2**32 - 1))
    assert report.num_synthetic == 20
