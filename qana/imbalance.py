"""SMOTE on PCA-whitened embeddings (the paper's class-imbalance treatment), for head training.

SMOTE interpolates between a minority sample and one of its nearest neighbours. On raw CNN
features the neighbourhoods are dominated by a few high-variance directions; whitening with PCA
first makes every direction count equally, so synthetic samples follow the class's shape rather
than its loudest feature. The synthetic points are mapped back to feature space, so the head is
trained (and later runs on the chip) on ordinary features.

Used on training features only, after the split, and at a clinic on its own data only.
"""

from __future__ import annotations

import numpy as np

SEED_LIMIT = 2**32  # sklearn's PCA and imblearn's SMOTE take random_state in [0, 2**32)


def check_seed(seed: int) -> None:
    """ValueError unless sklearn and imblearn accept `seed`. Checked before the data decide whether
    SMOTE has anything to do, so one seed does not work on balanced data and fail on imbalanced data
    (np.random.default_rng, which orders the training samples, takes any non-negative integer)."""
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32) for SMOTE, not {seed!r}")


def smote_whitened(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, k_neighbors: int = 5, variance: float = 0.99
) -> tuple[np.ndarray, np.ndarray]:
    """Oversample every class with at least 2 examples up to the majority count.

    Returns (features, labels) including the originals. Classes with a single example are
    kept as they are (SMOTE needs a neighbour); with fewer than two classes nothing changes.
    """
    check_seed(seed)
    from imblearn.over_sampling import SMOTE
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    if len(present) < 2 or len(x) < 3:
        return x.astype(np.float32), y
    majority = int(counts.max())
    strategy = {int(c): majority for c in present if 2 <= counts[c] < majority}
    if not strategy:
        return x.astype(np.float32), y
    n_components = min(x.shape[1], x.shape[0] - 1)
    pca = PCA(n_components=n_components, whiten=True, random_state=seed).fit(x)
    keep = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), variance) + 1)
    keep = max(1, min(keep, n_components))
    pca = PCA(n_components=keep, whiten=True, random_state=seed).fit(x)
    z = pca.transform(x)
    # Each class gets as many neighbours as it has (up to k_neighbors): one SMOTE call per
    # neighbour count, because imblearn takes one k for all classes, and a class of two images
    # must not force k=1 (interpolation only towards the nearest image) on every other class.
    k_of = {c: max(1, min(k_neighbors, int(counts[c]) - 1)) for c in strategy}
    z_new, y_new = [], []
    for k in sorted(set(k_of.values()), reverse=True):
        group = {c: n for c, n in strategy.items() if k_of[c] == k}
        z_res, y_res = SMOTE(sampling_strategy=group, k_neighbors=k, random_state=seed).fit_resample(z, y)
        z_new.append(z_res[len(x) :])
        y_new.append(y_res[len(x) :])
    synthetic = pca.inverse_transform(np.concatenate(z_new))
    lo, hi = x.min(axis=0), x.max(axis=0)
    synthetic = np.clip(synthetic, lo, hi)  # stay within the features' range (e.g. >= 0 after ReLU)
    return np.concatenate([x, synthetic]).astype(np.float32), np.concatenate([y, *y_new])
