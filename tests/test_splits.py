"""Lesion-grouped, stratified splits never put one lesion on two sides."""

from __future__ import annotations

import numpy as np
import pytest

from qana.splits import grouped_split, train_val_test


def _toy(seed: int = 0, n_lesions: int = 400):
    rng = np.random.default_rng(seed)
    lesion_label = rng.choice(7, n_lesions, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    reps = rng.integers(1, 4, n_lesions)
    groups = np.repeat(np.arange(n_lesions), reps).astype(str)
    labels = np.repeat(lesion_label, reps)
    return labels, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_lesion_in_two_parts(seed: int) -> None:
    labels, groups = _toy(seed)
    parts = train_val_test(labels, groups, 0.15, 0.15, seed)
    seen = [set(groups[p]) for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(p) for p in parts) == len(labels)


def test_every_class_reaches_every_part_in_proportion() -> None:
    labels, groups = _toy(3, n_lesions=2000)
    train, val, test = train_val_test(labels, groups, 0.15, 0.15, 0)
    for cls in range(7):
        share = np.isin(np.flatnonzero(labels == cls), test).mean()
        assert 0.08 < share < 0.25, f"class {cls}: {share:.2f} of its images in test"
    assert 0.6 < len(train) / len(labels) < 0.8


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels, groups = _toy(4)
    a = train_val_test(labels, groups, seed=7)
    b = train_val_test(labels, groups, seed=7)
    c = train_val_test(labels, groups, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])


def test_bad_fractions_are_refused() -> None:
    labels, groups = _toy(5)
    with pytest.raises(ValueError, match="sum to 1"):
        grouped_split(labels, groups, (0.5, 0.6))
