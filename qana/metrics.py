"""Classification metrics in plain numpy, shared by evaluation, clients, server and simulation.

Written out rather than taken from scikit-learn so that a clinic's install and the
Flower messages use exactly the same definitions, including for classes that have no
examples at one clinic (they are left out of the macro averages, not counted as zero).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels and predictions differ in shape: {y_true.shape} vs {y_pred.shape}")
    check_class_indices(y_true, num_classes, "labels")
    check_class_indices(y_pred, num_classes, "predictions")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def check_class_indices(values: np.ndarray, num_classes: int, what: str) -> None:
    """ValueError unless every value is a class index 0..num_classes-1.

    numpy would count -1 (the "class the head lacks" marker) in the last class's row and spill
    an index past the end into the next row, so a bad label would pass as a scored image.
    """
    values = np.asarray(values)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        shown = ", ".join(str(v) for v in np.unique(bad)[:5])
        raise ValueError(f"{what} must be class indices 0..{num_classes - 1}; got {shown}")


def metrics_from_confusion(cm: np.ndarray, class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """top-1, macro-F1, balanced accuracy and per-class precision/recall/F1 from a confusion matrix.

    Macro averages run over the classes that occur in the true labels, so a clinic that
    never saw `df` is not penalised for a class it could not have predicted correctly.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    per_class = {
        str(name): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "top1": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": per_class,
        "confusion": cm.astype(np.int64).tolist(),
        "n": int(n),
    }


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """All metrics for one set of predictions (see metrics_from_confusion)."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, len(class_names)), class_names)


FAITHFUL = 0.01  # the bar: the chip within 1 point of the float model in top-1 and macro-F1
ACCURACY_BAR = {"top1": 0.80, "macro_f1": 0.60}  # the accuracy bar for the shipped v2 bundle, on held-out lesions
# (chip, reference, label) pairs the fidelity bar compares, in the benchmarks' score names: the chip
# against float on images alone, and both with the clinical prior under identical host arithmetic.
FIDELITY_PAIRS = (("akida", "float", "images only"), ("akida+prior", "float+prior", "with the prior"))


def reaches_bar(figures: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per part of ACCURACY_BAR, whether figures (one value, or one per bootstrap resample) reach
    it; the bar itself counts as reached."""
    return {k: np.asarray(figures[k]) >= bar for k, bar in ACCURACY_BAR.items()}


def clears_bar(figures: dict[str, Any]) -> np.ndarray:
    """Whether figures (one value, or one per bootstrap resample) reach every part of ACCURACY_BAR."""
    return np.logical_and.reduce(list(reaches_bar(figures).values()))


def shortfall(reference: dict, candidate: dict) -> float:
    """How far `candidate` falls below `reference` in top-1 or macro-F1, whichever is worse (0 if in neither).

    One-sided on purpose: the chip reproducing a model is judged by what it loses, not by
    where it happens to score higher. Used by the quantized stage and the benchmarks (`fidelity_line`).
    """
    return max(0.0, reference["top1"] - candidate["top1"], reference["macro_f1"] - candidate["macro_f1"])


def fidelity_line(reference: dict, chip: dict, label: str) -> str:
    """`label +0.3 / -1.1 (outside the bar)`: chip minus reference in points of top-1 / macro-F1
    and the verdict against FAITHFUL, as the benchmarks print it for each split."""
    verdict = "outside the bar" if shortfall(reference, chip) > FAITHFUL else "ok"
    return f"{label} {100 * (chip['top1'] - reference['top1']):+.1f} / {100 * (chip['macro_f1'] - reference['macro_f1']):+.1f} ({verdict})"


BOOTSTRAP_METRICS = ("top1", "macro_f1", "balanced_accuracy")


def grouped_bootstrap(
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    groups: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """top-1, macro-F1 and balanced accuracy of each model on `resamples` bootstrap resamples.

    Resamples whole groups (lesions), not images: images of one lesion are near-copies, so
    resampling images would pretend the test part holds more independent evidence than it does
    (the same reason the split is grouped by lesion). Every model is scored on the same
    resamples, so differences between them (the chip minus float) are paired. Returns
    model -> metric -> (resamples,) array.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups)
    if labels.shape != groups.shape:
        raise ValueError(f"labels and groups differ in shape: {labels.shape} vs {groups.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    for name, pred in predictions.items():
        if np.shape(pred) != labels.shape:
            raise ValueError(f"predictions of {name!r} differ in shape from the labels: {np.shape(pred)} vs {labels.shape}")
    _, group_of_image = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_image.max()) + 1 if labels.size else 0
    if n_groups == 0:
        raise ValueError("no images to resample")
    k = len(class_names)
    check_class_indices(labels, k, "labels")
    for name, pred in predictions.items():
        check_class_indices(pred, k, f"predictions of {name!r}")
    cells = {name: labels * k + np.asarray(pred, dtype=np.int64) for name, pred in predictions.items()}
    rng = np.random.default_rng(seed)
    out = {name: {m: np.empty(resamples) for m in BOOTSTRAP_METRICS} for name in predictions}
    for r in range(resamples):
        # how often each group was drawn = the weight of each of its images in this resample
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of_image]
        for name, cell in cells.items():
            cm = np.bincount(cell, weights=weight, minlength=k * k).reshape(k, k)
            m = metrics_from_confusion(cm, class_names)
            for metric in BOOTSTRAP_METRICS:
                out[name][metric][r] = m[metric]
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of independent runs (e.g. one recipe
    on several splits). Unlike a bootstrap of one test part, it includes the training randomness
    and the choice of split. Needs two values or more; scipy is imported only here (training installs)."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least two values, got {len(values)}")
    sample = np.asarray(values, dtype=np.float64)
    mean = float(sample.mean())
    half = float(stats.t.ppf(0.5 + level / 2, len(sample) - 1)) * float(sample.std(ddof=1)) / len(sample) ** 0.5
    return mean, mean - half, mean + half
