"""Local head training at a clinic: SMOTE on PCA-whitened embeddings, then `qana.head.train_head`.

Skin-lesion data are badly imbalanced (nv dominates; df and vasc are rare) and each clinic
sees its own skew, so, following the paper, minority classes are oversampled with SMOTE in
a PCA-whitened embedding space before the head is trained. Both steps are the shared
implementations (`qana.imbalance.smote_whitened`, `qana.head.train_head`), so a clinic
trains exactly as the central pipeline and the simulations do. Everything uses this
clinic's data only: the PCA, the neighbours and the synthetic points never leave the clinic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qana.head import Head, TrainConfig, train_head
from qana.imbalance import smote_whitened


@dataclass(frozen=True)
class LocalTrainingReport:
    num_examples: int  # real local training images
    num_synthetic: int  # SMOTE points added (0 when SMOTE was off or not applicable)
    smote_classes: tuple[int, ...]  # classes that were oversampled


def train_local_head(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    smote: bool = True,
) -> tuple[Head, LocalTrainingReport]:
    """Train the head on this clinic's features (optionally SMOTE-balanced), starting from `head`."""
    x = np.asarray(features).reshape(len(features), -1)
    y = np.asarray(labels, dtype=np.int64)
    if smote and len(y):
        x_all, y_all = smote_whitened(x, y, seed=config.seed)
    else:
        x_all, y_all = x.astype(np.float32), y
    synthetic = y_all[len(y) :]
    trained = train_head(head, x_all, y_all, config)
    classes = tuple(int(c) for c in np.unique(synthetic))
    return trained, LocalTrainingReport(int(len(y)), int(len(synthetic)), classes)
