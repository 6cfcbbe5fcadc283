"""Test-time views: the same image seen in several orientations, features averaged.

A dermoscopic image has no "up": a lesion rotated or mirrored is the same lesion, which is why
training already flips and turns images. At test time the backbone can look at several such
views and the host averages its integer feature vectors before the head. On Akida this costs
one backbone pass per view on the chip and a 256-value mean on the host; the head still runs
on the chip because the rounded mean is again a valid integer feature vector in the head's
input range (for 1-bit Akida 1.0 features the rounded mean is a per-feature majority vote, so it
stays binary). Because the head is linear, the mean feature gives the same logits as
averaging the logits of the views, up to the rounding.

Views come in a fixed order, so n views are always the same n: the identity first, then the
two mirrors and the half turn (the group a flip pair generates), then the quarter turns and
the transposes.
"""

from __future__ import annotations

import numpy as np

VIEW_COUNTS = (1, 2, 4, 8)
VIEW_NAMES = ("identity", "mirror left-right", "mirror up-down", "half turn", "quarter turn", "three-quarter turn", "transpose", "anti-transpose")


def check_view_count(n: int, what: str = "test-time views") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in VIEW_COUNTS:
        raise ValueError(f"{what} must be one of {', '.join(map(str, VIEW_COUNTS))}; got {n!r}")
    return int(n)


def dihedral_view(images: np.ndarray, index: int) -> np.ndarray:
    """View number `index` (see VIEW_NAMES) of a batch of square NHWC images, contiguous."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"test-time views need a batch of square NHWC images; got shape {x.shape}")
    views = (
        lambda a: a,
        lambda a: a[:, :, ::-1],
        lambda a: a[:, ::-1],
        lambda a: a[:, ::-1, ::-1],
        lambda a: np.rot90(a, 1, axes=(1, 2)),
        lambda a: np.rot90(a, 3, axes=(1, 2)),
        lambda a: a.transpose(0, 2, 1, 3),
        lambda a: a[:, ::-1, ::-1].transpose(0, 2, 1, 3),
    )
    return np.ascontiguousarray(views[index](x))


def averaged_features(images: np.ndarray, n_views: int, features_of) -> np.ndarray:
    """Mean of `features_of(view)` over the first `n_views` views, rounded half up to integers.

    `features_of` maps a uint8 image batch to integer features (N, D); one view returns its
    features unchanged.
    """
    n_views = check_view_count(n_views)
    if n_views == 1:
        return features_of(images)
    return rounded_mean([features_of(dihedral_view(images, i)) for i in range(n_views)])


def rounded_mean(per_view: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean of integer feature arrays, rounded half up, exactly, in integers."""
    n = len(per_view)
    total = np.sum([np.asarray(f, dtype=np.int64) for f in per_view], axis=0)
    return ((total + n // 2) // n).astype(np.int32)  # floor((sum + n/2) / n)


def averaged_logits(images: np.ndarray, n_views: int, logits_of) -> np.ndarray:
    """Mean of `logits_of(view)` over the first `n_views` views (for the float Keras models)."""
    n_views = check_view_count(n_views)
    if n_views == 1:
        return logits_of(images)
    return np.mean([logits_of(dihedral_view(images, i)) for i in range(n_views)], axis=0)


def keras_logits(model, images: np.ndarray, n_views: int = 1, batch_size: int = 256) -> np.ndarray:
    """A Keras model's logits for uint8 images, averaged over `n_views` views, so the float and
    quantized models are scored on the same views as the chip (no TensorFlow import here)."""
    return averaged_logits(
        images, n_views, lambda x: model.predict(x.astype(np.float32), batch_size=batch_size, verbose=0)
    )
