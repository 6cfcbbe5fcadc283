"""Head training on backbone features: SMOTE on PCA-whitened embeddings, then `qana.head.train_head`.

Skin-lesion data are badly imbalanced (nv dominates; df and vasc are rare) and each clinic
sees its own skew, so, following the paper, minority classes are oversampled with SMOTE in
a PCA-whitened embedding space before the head is trained. This is the one recipe for a
clinic's local rounds (`client.clinic`), the simulations' baselines and the central
pipeline's head stage (`qana.train.fit_head`). At a clinic everything uses its data only:
the PCA, the neighbours and the synthetic points never leave the clinic.

The loss is class-weighted ("balanced", `TrainConfig`'s default) after SMOTE as well: SMOTE
brings every class with two or more examples up to the largest, so those classes get equal
weights, and only a class SMOTE cannot oversample (a single example) keeps a larger one. The
equal weights are exactly 1 only when no such class is left (counts 30, 30, 1 give 0.68, 0.68,
20.3); train_head normalises by each batch's weight sum, so only these ratios matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qana.head import Head, TrainConfig, train_head, training_inputs
from qana.imbalance import check_seed, smote_whitened


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
    if smote:
        check_seed(config.seed)
    x, y = training_inputs(head, features, labels)  # before SMOTE sees them: train_head's checks, not sklearn's
    if smote and len(y):
        x_all, y_all = smote_whitened(x, y, seed=config.seed)
    else:
        x_all, y_all = x.astype(np.float32), y
    synthetic = y_all[len(y) :]
    trained = train_head(head, x_all, y_all, config)
    classes = tuple(int(c) for c in np.unique(synthetic))
    return trained, LocalTrainingReport(int(len(y)), int(len(synthetic)), classes)
