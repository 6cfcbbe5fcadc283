"""Splits grouped by lesion and stratified by diagnosis, in plain numpy.

Several HAM10000 images show the same lesion; a split that puts one in training and another
in test overstates accuracy. Every split here assigns whole lesions. Stratification works on
lesions: lesions of each class are shuffled with the seed and dealt out in proportion, so
rare classes (df, vasc) appear on both sides. Numpy only, so clinics can use it too.
"""

from __future__ import annotations

import numpy as np

# `qana train`'s validation share of lesions: enough to pick checkpoints and heads by, at most half.
VAL_FRACTION = 0.15  # `qana train`'s default validation share (`qana split` must default to the same)
VAL_FRACTION_RANGE = (0.02, 0.5)
TEST_FRACTION = 0.15  # `qana train`'s test share (fixed: one seed keeps the same test lesions)


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, fractions: tuple[float, ...], seed: int = 0
) -> list[np.ndarray]:
    """Split row indices into len(fractions) parts; whole groups only, stratified by label.

    Returns index arrays (sorted). Each group's label is the label of its first row (all
    images of one HAM10000 lesion share a diagnosis).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape:
        raise ValueError("labels and groups must have the same length")
    fractions_arr = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions_arr < 0) or not np.isclose(fractions_arr.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    unique_groups, first_row, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first_row]
    assignment = np.empty(len(unique_groups), dtype=np.int64)
    cum = np.cumsum(fractions_arr)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        members = members[rng.permutation(len(members))]
        # Boundaries by rounding cumulative shares: every part gets its share of each class.
        # The last part (test) is counted from the end, so it depends only on its own
        # fraction: a smaller validation share never moves a test lesion.
        n = len(members)
        bounds = np.round(cum * n).astype(int)
        bounds[-1] = n
        if len(bounds) > 1:
            last_start = n - int(np.round(fractions_arr[-1] * n))
            bounds[:-1] = np.minimum(bounds[:-1], last_start)
            bounds[-2] = last_start
        start = 0
        for part, end in enumerate(bounds):
            assignment[members[start:end]] = part
            start = end
    row_part = assignment[inverse]
    return [np.flatnonzero(row_part == part) for part in range(len(fractions))]


def train_val_test(
    labels: np.ndarray, groups: np.ndarray, val: float = VAL_FRACTION, test: float = TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The standard three-way lesion-grouped split used by `qana train`."""
    train_idx, val_idx, test_idx = grouped_split(labels, groups, (1.0 - val - test, val, test), seed)
    return train_idx, val_idx, test_idx
