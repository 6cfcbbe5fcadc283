"""`train_head` must not depend on `feature_scale`, which is only a conditioning choice.

Regression test for a unit inversion: weights were converted to scaled-feature units by
multiplying by `feature_scale` instead of dividing, so after training the weights were off
by feature_scale**2 relative to the bias. Invisible on data a head can separate without its
bias; fatal where the bias matters, e.g. classes that differ only in feature magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from qana import head as H


def _magnitude_classes(n: int = 600, seed: int = 0):
    """Three classes along one direction: only a bias (threshold) can tell them apart."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    direction = rng.uniform(0.5, 1.5, 12)
    level = np.array([10.0, 40.0, 70.0])[y] + rng.normal(0, 3, n)
    x = np.clip(np.round(level[:, None] * direction[None, :]), 0, 255).astype(np.int32)
    return x, y


@pytest.mark.parametrize("feature_scale", [1.0, 1 / 64, 1 / 8])
def test_training_fits_bias_dependent_classes_for_any_feature_scale(feature_scale: float) -> None:
    x, y = _magnitude_classes()
    head = H.train_head(H.init_head(12, "abc", feature_scale=feature_scale), x, y, H.TrainConfig(epochs=60, learning_rate=0.05))
    assert (H.predict(head, x) == y).mean() > 0.95
    assert (H.predict(H.quantize_head(head, "v2"), x) == y).mean() > 0.95


def test_zero_epochs_of_training_changes_nothing() -> None:
    x, y = _magnitude_classes(n=50)
    start = H.init_head(12, "abc", feature_scale=1 / 64, seed=3)
    same = H.train_head(start, x, y, H.TrainConfig(epochs=0))
    np.testing.assert_allclose(same.weights, start.weights, rtol=1e-6)
