"""Local head training at a clinic: SMOTE on PCA-whitened embeddings, then `qana.head.train_head`.

Skin-lesion data are badly imbalanced (nv dominates; df and vasc are rare), and each clinic
sees its own skew. Following the paper, minority classes are oversampled with SMOTE *in a
PCA-whitened embedding space*: the backbone's integer features are strongly correlated and
differently scaled, so nearest neighbours in raw feature space are dominated by a few
high-variance directions; whitening makes SMOTE's interpolation neighbours meaningful. The
synthetic points are mapped back to feature space and the head is trained there with the
one head implementation (`qana.head.train_head`). Everything uses this clinic's data only:
the PCA, the neighbours and the synthetic points never leave the clinic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qana.head import Head, TrainConfig, train_head

SMOTE_NEIGHBOURS = 5
PCA_VARIANCE = 0.99


@dataclass(frozen=True)
class LocalTrainingReport:
    num_examples: int  # real local training images
    num_synthetic: int  # SMOTE points added (0 when SMOTE was off or not applicable)
    smote_classes: tuple[int, ...]  # classes that were oversampled


def smote_whitened(
    features: np.ndarray, labels: np.ndarray, feature_scale: float, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Oversample minority classes with SMOTE in PCA-whitened space; return features in feature units.

    Classes with fewer than 2 examples cannot be interpolated and are left as they are; with
    fewer than 2 classes there is nothing to balance. Returns only the synthetic rows.
    """
    from imblearn.over_sampling import SMOTE  # imported here: only training needs scikit-learn
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1) * feature_scale
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    eligible = [int(c) for c in present if counts[c] >= 2]
    if len(present) < 2 or len(eligible) < 1:
        return x[:0] / feature_scale, y[:0], ()
    target = int(counts.max())
    strategy = {c: target for c in eligible if counts[c] < target}
    if not strategy:
        return x[:0] / feature_scale, y[:0], ()
    n_components = min(x.shape[0] - 1, x.shape[1])
    if n_components < 1:
        return x[:0] / feature_scale, y[:0], ()
    pca = PCA(n_components=n_components, whiten=True, svd_solver="full", random_state=seed).fit(x)
    keep = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), PCA_VARIANCE) + 1)
    keep = max(1, min(keep, n_components))
    pca = PCA(n_components=keep, whiten=True, svd_solver="full", random_state=seed).fit(x)
    z = pca.transform(x)
    # Only classes being oversampled (plus the majority as reference) go to SMOTE; classes
    # with a single example would make SMOTE refuse, so they stay out.
    use = np.isin(y, list(strategy) + [int(np.argmax(counts))])
    k = max(1, min(SMOTE_NEIGHBOURS, min(int(counts[c]) for c in strategy) - 1))
    z_res, y_res = SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=seed).fit_resample(z[use], y[use])
    synthetic_z, synthetic_y = z_res[int(use.sum()) :], y_res[int(use.sum()) :]
    synthetic_x = pca.inverse_transform(synthetic_z) / feature_scale
    return synthetic_x.astype(np.float32), synthetic_y.astype(np.int64), tuple(sorted(strategy))


def train_local_head(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    smote: bool = True,
) -> tuple[Head, LocalTrainingReport]:
    """Train the head on this clinic's features (optionally SMOTE-balanced) from the global head."""
    x = np.asarray(features).reshape(len(features), -1).astype(np.float32)
    y = np.asarray(labels, dtype=np.int64)
    classes: tuple[int, ...] = ()
    n_synthetic = 0
    if smote and len(y):
        sx, sy, classes = smote_whitened(x, y, head.feature_scale, config.seed)
        if len(sy):
            x = np.concatenate([x, sx])
            y = np.concatenate([y, sy])
            n_synthetic = int(len(sy))
    trained = train_head(head, x, y, config)
    return trained, LocalTrainingReport(int(len(labels)), n_synthetic, classes)
