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


@pytest.mark.parametrize("n_lesions", [40, 77, 133, 400, 1001])
def test_test_part_does_not_depend_on_the_validation_share(n_lesions: int) -> None:
    """`qana train --val-fraction` promises: one seed, one test part, whatever the validation share.

    Moving validation lesions into training must not move a single test lesion, or runs with
    different validation shares could not be compared on the same test images.
    """
    labels, groups = _toy(6, n_lesions=n_lesions)
    reference = train_val_test(labels, groups, 0.15, 0.15, seed=2)[2]
    for val in (0.02, 0.05, 0.1, 0.2, 0.3, 0.45):
        train, val_part, test = train_val_test(labels, groups, val, 0.15, seed=2)
        assert np.array_equal(test, reference), f"val share {val} moved test lesions"
        assert len(train) + len(val_part) + len(test) == len(labels)
