"""The clinical prior: what a patient's age, sex and the lesion's body site say about the diagnosis.

Dermatologists never read a lesion without knowing whom and where it is on: a pigmented
lesion on the back of a 25-year-old is most likely a naevus, a scaly one on the face of an
80-year-old a keratosis. HAM10000's metadata records exactly these three facts (`age`, `sex`,
`localization`) for every image, and the images alone leave that signal unused.

The prior is a separate small model, not a change to the network. A softmax regression on the
encoded metadata gives `log p(class | metadata)`; dividing out the class frequencies it was
trained on leaves what the metadata adds, and that is added to the image's logits:

    logits = image_logits + weight * (log p(class | metadata) - log p(class))

This is Bayes' rule if image and metadata are independent given the diagnosis
(p(c | x, m) ~ p(c | x) p(c | m) / p(c)), with `weight` (chosen on the lesion-grouped validation
part, 0 = off) absorbing how far that assumption and the image model's calibration are off.
Because the term only adds to logits, it works unchanged for every backend (float, quantized,
Akida), every head a federation produces, and both chip targets: the backbone and the head on
the chip are untouched, the addition is 7 numbers per image on the host.

The encoding is fixed and documented so that any clinic can produce it: age in bands, sex, and
HAM10000's fourteen body sites, each field with an explicit "unknown". Values outside that vocabulary
are an error naming the image and the value, never silently read as "unknown".
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from qana import head as head_math
from qana.data import CLINICAL_COLUMNS

if TYPE_CHECKING:
    from qana.data import Dataset

PRIOR_FILE = "clinical.npz"

# Age bands (years, lower bound inclusive); chosen by clinical convention, not fitted.
AGE_BANDS: tuple[tuple[float, float], ...] = ((0, 30), (30, 45), (45, 60), (60, 75), (75, math.inf))
SEXES: tuple[str, ...] = ("female", "male")
# HAM10000's `localization` values (Harvard Dataverse metadata), "unknown" listed separately.
SITES: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "upper extremity",
)
MISSING = ("", "unknown", "na", "nan", "none")  # how an unrecorded value is written (case-insensitive)
FEATURE_NAMES: tuple[str, ...] = (
    *(f"age {lo:g}-{hi:g}" if hi != math.inf else f"age {lo:g}+" for lo, hi in AGE_BANDS),
    "age unknown",
    *(f"sex {s}" for s in SEXES),
    "sex unknown",
    *(f"site {s}" for s in SITES),
    "site unknown",
)
WEIGHT_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # prior weights tried on validation; 0 = prior off
# How the metadata model is fitted: unweighted (it must estimate p(class | metadata)), mild L2.
PRIOR_TRAINING = head_math.TrainConfig(epochs=30, learning_rate=0.01, l2=1e-3, class_weighting="none")
MAX_AGE = 120.0


class ClinicalDataError(ValueError):
    """Metadata the prior cannot encode; the message names the image and the value."""


def encode(ages: Sequence, sexes: Sequence, sites: Sequence, image_ids: Sequence[str] | None = None) -> np.ndarray:
    """One-hot rows (N, len(FEATURE_NAMES)) for age band, sex and body site.

    Ages may be numbers or strings ("80.0"); an empty/NA value is "unknown". Raises
    ClinicalDataError naming the first image whose value is not understood.
    """
    n = len(ages)
    if not (len(sexes) == n and len(sites) == n):
        raise ValueError(f"ages, sexes and sites differ in length: {n}, {len(sexes)}, {len(sites)}")
    names = list(image_ids) if image_ids is not None else [f"row {i}" for i in range(n)]
    out = np.zeros((n, len(FEATURE_NAMES)), np.float32)
    n_age = len(AGE_BANDS) + 1
    n_sex = len(SEXES) + 1
    for i, (age, sex, site) in enumerate(zip(ages, sexes, sites)):
        out[i, _age_column(age, names[i])] = 1.0
        out[i, n_age + _vocab_column(sex, SEXES, "sex", names[i])] = 1.0
        out[i, n_age + n_sex + _vocab_column(site, SITES, "body site (localization)", names[i])] = 1.0
    return out


def encode_dataset(dataset: Dataset) -> np.ndarray | None:
    """`encode` for a loaded dataset; None when its metadata has no clinical columns."""
    if not dataset.has_clinical:
        return None
    return encode(dataset.ages, dataset.sexes, dataset.sites, dataset.image_ids)


def _age_column(age, name: str) -> int:
    if age is None or (isinstance(age, str) and age.strip().lower() in MISSING):
        return len(AGE_BANDS)
    try:
        years = float(age)
    except (TypeError, ValueError):
        raise ClinicalDataError(f"{name}: age {str(age)!r} is not a number of years") from None
    if math.isnan(years):
        return len(AGE_BANDS)
    if not 0.0 <= years <= MAX_AGE:
        raise ClinicalDataError(f"{name}: age {years:g} is outside 0-{MAX_AGE:g} years")
    return next(k for k, (lo, hi) in enumerate(AGE_BANDS) if lo <= years < hi)


def _vocab_column(value, vocabulary: tuple[str, ...], what: str, name: str) -> int:
    text = "" if value is None else str(value).strip().lower()
    if text in MISSING:
        return len(vocabulary)
    if text not in vocabulary:
        raise ClinicalDataError(
            f"{name}: {what} {str(value)!r} is not one the clinical prior knows "
            f"({', '.join(vocabulary)}, or empty/unknown)"
        )
    return vocabulary.index(text)


@dataclass(frozen=True)
class ClinicalPrior:
    """Softmax regression on encoded metadata, the class frequencies it saw, and its weight."""

    model: head_math.Head  # logits over classes from encoded metadata (feature_scale 1)
    log_class_frequency: np.ndarray  # (C,) log of the training class frequencies
    weight: float

    def __post_init__(self) -> None:
        if self.model.num_features != len(FEATURE_NAMES):
            raise ValueError(f"clinical prior expects {len(FEATURE_NAMES)} metadata features, has {self.model.num_features}")
        freq = np.asarray(self.log_class_frequency, np.float64)
        if freq.shape != (self.model.num_classes,) or not np.isfinite(freq).all():
            raise ValueError("clinical prior: log class frequencies must be finite, one per class")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"clinical prior weight must be a finite number >= 0, not {self.weight!r}")
        object.__setattr__(self, "log_class_frequency", freq)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes


def classes_without_examples(labels: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Classes with no row in `labels`: p(class | metadata) cannot be estimated for them."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(classes))
    return [c for c, k in zip(classes, counts) if k == 0]


def fit_prior(encoded: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int = 0) -> ClinicalPrior:
    """Fit the metadata model on training rows (unweighted: it must estimate p(class | metadata)).

    The returned prior has weight 1; `choose_weight` sets it from validation.
    """
    absent = classes_without_examples(labels, classes)
    if absent:
        raise ValueError(f"the clinical prior needs training images of every class; none of {', '.join(absent)}")
    model, log_frequency = fit_metadata_model(encoded, labels, classes, len(FEATURE_NAMES), replace(PRIOR_TRAINING, seed=seed))
    return ClinicalPrior(model, log_frequency, 1.0)


def fit_metadata_model(
    encoded: np.ndarray, labels: np.ndarray, classes: Sequence[str], num_features: int, config: head_math.TrainConfig
) -> tuple[head_math.Head, np.ndarray]:
    """Softmax regression p(class | metadata) on `num_features` encoded inputs, started from the
    class frequencies, and the log class frequencies it was fitted on. `fit_prior` uses it on
    the fixed encoding; benchmarks/prior_variants.py on richer ones."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=len(classes)).astype(np.float64)
    log_frequency = np.log(counts / counts.sum())
    start = head_math.Head(np.zeros((num_features, len(classes)), np.float32), log_frequency.astype(np.float32), tuple(classes))
    return head_math.train_head(start, encoded, labels, config), log_frequency


def manifest_entry(prior: ClinicalPrior) -> dict:
    """What a bundle's `bundle.json` records about its prior (`Bundle.load_clinical_prior` reads `file`)."""
    return {
        "file": PRIOR_FILE,
        "weight": prior.weight,
        "inputs": list(CLINICAL_COLUMNS),
        "features": list(FEATURE_NAMES),
        "how": "logits + weight * (log p(class | metadata) - log p(class)), on the host (qana.clinical)",
    }


def log_odds(prior: ClinicalPrior, encoded: np.ndarray) -> np.ndarray:
    """What the metadata adds, unweighted: log p(class | metadata) - log p(class), (N, C)."""
    return metadata_log_odds(prior.model, prior.log_class_frequency, encoded)


def metadata_log_odds(model: head_math.Head, log_class_frequency: np.ndarray, encoded: np.ndarray) -> np.ndarray:
    """`log_odds` for any metadata model (`fit_metadata_model`), whatever its encoding."""
    z = head_math.logits(model, encoded).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return log_p - log_class_frequency


def adjust(prior: ClinicalPrior | None, image_logits: np.ndarray, encoded: np.ndarray | None) -> np.ndarray:
    """Image logits plus the weighted prior term; unchanged without a prior or metadata."""
    z = np.asarray(image_logits, np.float64)
    if prior is None or encoded is None or prior.weight == 0.0:
        return z
    if z.shape[1] != prior.model.num_classes:
        raise ValueError(f"image logits have {z.shape[1]} classes, the clinical prior {prior.model.num_classes}")
    return z + prior.weight * log_odds(prior, encoded)


def choose_weight(
    prior: ClinicalPrior, image_logits: np.ndarray, encoded: np.ndarray, labels: np.ndarray, score
) -> tuple[ClinicalPrior, dict[str, float]]:
    """The candidate weight with the best validation `score(labels, predictions)`; ties go to
    the smaller weight (0 = off). Returns the prior with that weight and every candidate's score."""
    best, scores = best_weight(log_odds(prior, encoded), image_logits, labels, score)
    return ClinicalPrior(prior.model, prior.log_class_frequency, best), scores


def best_weight(term: np.ndarray, image_logits: np.ndarray, labels: np.ndarray, score) -> tuple[float, dict[str, float]]:
    """`choose_weight`'s rule for any unweighted prior term (N, C): the best-scoring weight of
    WEIGHT_CANDIDATES, ties to the smaller, and every candidate's score."""
    z = np.asarray(image_logits, np.float64)
    scores = {f"{w:g}": float(score(labels, (z + w * term).argmax(1))) for w in WEIGHT_CANDIDATES}
    best = max(WEIGHT_CANDIDATES, key=lambda w: (scores[f"{w:g}"], -w))
    return float(best), scores


def prior_to_npz(prior: ClinicalPrior) -> bytes:
    """Serialise a prior (bundle file clinical.npz), with the encoding it expects."""
    buf = io.BytesIO()
    np.savez(
        buf,
        weights=prior.model.weights,
        bias=prior.model.bias,
        classes=np.array(prior.classes),
        log_class_frequency=prior.log_class_frequency,
        weight=np.array(prior.weight, np.float64),
        feature_names=np.array(FEATURE_NAMES),
    )
    return buf.getvalue()


def prior_from_npz(data: bytes) -> ClinicalPrior:
    """Inverse of prior_to_npz; refuses a file made for another metadata encoding."""
    return head_math.read_npz(data, "clinical prior", _prior_in)


def _prior_in(archive: np.lib.npyio.NpzFile) -> ClinicalPrior:
    if head_math.names_in(archive, "feature_names") != FEATURE_NAMES:
        raise ValueError("it was made for another metadata encoding than this version of qana reads")
    weights, bias = head_math.array_in(archive, "weights"), head_math.array_in(archive, "bias")
    model = head_math.Head(weights, bias, head_math.names_in(archive, "classes"))
    frequency, weight = head_math.array_in(archive, "log_class_frequency"), float(head_math.array_in(archive, "weight"))
    return ClinicalPrior(model, frequency, weight)
