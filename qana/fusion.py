"""Lesion fusion: one decision per lesion from all of its photographs.

HAM10000 photographs many lesions more than once (45 % of its images belong to a lesion with two
or more images, most of the rare classes' images do). A clinic diagnoses a lesion, not a
photograph: when several images of the same lesion are classified together, each of them should
get the decision that all of them support. Fusion averages the final logits (after test-time
views and the clinical prior) over the images that share a `lesion_id`, so every image of a
lesion gets the same class; an image whose lesion was photographed once is left as it is.

Nothing is fitted, so fusion cannot be tuned to a split. It needs the lesion ids of the images
being classified together: in `qana evaluate` they come from the metadata CSV, which already
carries them (HAM10000's `lesion_id`). Metrics are still counted per image, so a lesion with
three images weighs three times, as it does without fusion.
"""

from __future__ import annotations

import numpy as np


class FusionError(ValueError):
    """Logits and lesion ids that cannot be fused (shapes differ, or an id is empty)."""


def fuse_by_lesion(logits: np.ndarray, lesion_ids: np.ndarray) -> np.ndarray:
    """Each image's logits replaced by the mean over the images of its lesion: (N, C) float64.

    The mean of logits, not of probabilities: the logits here are log-scores to which the
    clinical prior has already been added, so their mean is the geometric mean of the images'
    probabilities, as the test-time views' averaged features are for one image's orientations.
    """
    logits = np.asarray(logits, dtype=np.float64)
    lesion_ids = np.asarray(lesion_ids)
    if logits.ndim != 2:
        raise FusionError(f"logits must be (images, classes), got shape {logits.shape}")
    if lesion_ids.shape != (logits.shape[0],):
        raise FusionError(f"one lesion id per image is needed: {logits.shape[0]} images but lesion ids of shape {lesion_ids.shape}")
    if logits.shape[0] == 0:
        return logits.copy()
    if any(str(lesion).strip() == "" for lesion in lesion_ids):
        raise FusionError("a lesion id is empty: every image needs the id of the lesion it shows")
    _, lesion_of_image, images_per_lesion = np.unique(lesion_ids, return_inverse=True, return_counts=True)
    sums = np.zeros((images_per_lesion.size, logits.shape[1]))
    np.add.at(sums, lesion_of_image, logits)
    return sums[lesion_of_image] / images_per_lesion[lesion_of_image, None]


def describe_lesions(lesion_ids: np.ndarray) -> str:
    """`1,282 images of 1,004 lesions; 431 images share a lesion with another image`: what fusion acts on."""
    lesion_ids = np.asarray(lesion_ids)
    _, lesion_of_image, counts = np.unique(lesion_ids, return_inverse=True, return_counts=True)
    shared = int((counts[lesion_of_image] > 1).sum()) if lesion_ids.size else 0
    return f"{lesion_ids.size:,} images of {counts.size:,} lesions; {shared:,} images share a lesion with another image"
