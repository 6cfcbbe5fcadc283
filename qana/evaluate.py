"""Evaluating a bundle on a folder of images, on the Akida model or the Keras models it ships."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from qana import clinical
from qana.bundle import Bundle
from qana.clinical import ClinicalPrior
from qana.data import Dataset
from qana.fusion import fuse_by_lesion
from qana.metrics import classification_metrics
from qana.preprocess import preprocess
from qana.views import keras_logits

BACKENDS = ("akida", "quantized", "float")


def bundle_logits(bundle: Bundle, images: np.ndarray, backend: str = "akida") -> np.ndarray:
    """Image logits (N, C) for uint8 images with the chosen backend (no clinical prior)."""
    if backend == "akida":
        from qana.runtime import AkidaRuntime

        return AkidaRuntime(bundle, device="auto").logits(images)
    if backend in ("quantized", "float"):
        path = bundle.path / f"{backend}.h5"
        if not path.is_file():
            raise ValueError(f"this bundle does not carry the {backend} Keras model ({path.name}); use --backend akida")
        if path.name not in bundle.manifest["files"]:  # load_bundle checked every file with a recorded hash
            raise ValueError(f"{path} has no sha256 in the bundle's bundle.json 'files'; refusing an unchecked model")
        if backend == "float":
            import tf_keras as keras

            model = keras.models.load_model(path, compile=False)
        else:
            from quantizeml import load_model

            model = load_model(str(path), compile_model=False)
        return keras_logits(model, preprocess(images, bundle.colour_constancy), bundle.test_time_views)
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def clinical_inputs(bundle: Bundle, dataset: Dataset, use_prior: bool = True) -> tuple[ClinicalPrior | None, np.ndarray | None, str]:
    """The bundle's clinical prior and the dataset's encoded metadata, if both exist and are
    wanted, with a sentence saying what is used (printed by `qana evaluate`)."""
    prior = bundle.load_clinical_prior()
    if prior is None:
        return None, None, "clinical prior: none in this bundle (images only)"
    if not use_prior:
        return None, None, "clinical prior: off (--no-clinical-prior; images only)"
    if not dataset.has_clinical:
        return None, None, "clinical prior: not used, the metadata has no age/sex/localization columns (images only)"
    encoded = clinical.encode_dataset(dataset)
    return prior, encoded, f"clinical prior: used (age, sex, body site; weight {prior.weight:g})"


def evaluate_bundle(
    bundle: Bundle, dataset: Dataset, backend: str = "akida", use_prior: bool = True, lesion_fusion: bool = False
) -> dict[str, Any]:
    """The metrics JSON of `qana evaluate` (keys: top1, macro_f1, balanced_accuracy, per_class,
    confusion, n, backend).

    With the bundle's clinical prior when it has one and the data has age/sex/localization
    (`use_prior=False` scores the images alone); `clinical_inputs` says which. With
    `lesion_fusion`, the images of one lesion share the mean of their logits (`qana.fusion`), so
    each lesion gets one decision; metrics are still counted per image.
    """
    if tuple(dataset.class_names) != bundle.classes[: len(dataset.class_names)]:
        raise ValueError(f"dataset classes {dataset.class_names} do not match the bundle's {bundle.classes}")
    prior, encoded, _ = clinical_inputs(bundle, dataset, use_prior)  # before the slow part: bad metadata fails at once
    logits = clinical.adjust(prior, bundle_logits(bundle, dataset.images, backend), encoded)
    if lesion_fusion:
        logits = fuse_by_lesion(logits, dataset.lesion_ids)
    result = classification_metrics(dataset.labels, logits.argmax(1), bundle.classes)
    result["backend"] = backend
    return result


PLOT_NEEDS = "matplotlib is not installed (a clinic's core install leaves it out; pip install the [train] extra, or matplotlib alone)"


def can_plot() -> bool:
    """Whether the confusion-matrix PNG can be drawn: matplotlib comes with the training,
    server and simulation extras, not with a clinic's core install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def confusion_png(confusion: list[list[int]], classes: tuple[str, ...], title: str = "") -> bytes:
    """Row-normalised confusion matrix with counts, as the bytes of a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
