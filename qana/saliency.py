"""Grad-CAM saliency cropping (the paper's preprocessing), used as a training augmentation.

The paper crops every image to the region a frozen CNN's Grad-CAM marks as salient, so the
64x64 input spends its pixels on the lesion instead of surrounding skin. Here:

1. a frozen *teacher* CNN gives a Grad-CAM map per image (gradient of the teacher's predicted
   class score w.r.t. the last spatial feature map, channel weights = spatially averaged
   gradients, ReLU of the weighted sum). The teacher is any local tf_keras model file:
   the project's own float model of an earlier run (`<run>/float.h5`, no download needed) or
   an ImageNet ResNet-50 whose weights file the user supplies (`resnet50:<weights.h5>`);
   nothing is downloaded.
2. the map is thresholded at `threshold` x its maximum; the tightest square around the
   salient pixels, widened by `margin` and at least `min_side` of the image, is the crop;
3. the crop is cut from the decoded centre square at twice the model input size, or at the
   teacher's input size if that is larger (more pixels than the model input, so a crop is not
   just an upscaled thumbnail), and resized to the model input.

Why only for training: the cropping needs the float teacher (TensorFlow) at inference time,
and a clinic runs only the Akida model (no TensorFlow, everything on the chip). Cropping the
test images with a model the deployment cannot run would report an accuracy no clinic gets.
So the crops are added to the training set (each training image also as its salient crop),
the model learns from lesion-centred views, and validation, test and deployment use the same
uncropped preprocessing (`qana.data.decode_image`). `qana train --saliency-teacher` turns it
on; the README's ablation reports the effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESNET_PREFIX = "resnet50:"


class SaliencyError(ValueError):
    """The teacher cannot be loaded or used; the message says why."""


@dataclass(frozen=True)
class Teacher:
    """A frozen CNN and how to feed it (uint8 RGB images of `size` x `size`)."""

    model: object  # tf_keras.Model
    size: int
    layer: str  # the spatial feature map Grad-CAM differentiates to
    preprocess: str  # "none" (the model rescales itself) | "resnet50" (caffe-style ImageNet)
    description: str


def _last_spatial_layer(model) -> str:
    """The last layer whose output is a (H, W, C) map with H, W > 1."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 4 and (shape[1] or 0) > 1 and (shape[2] or 0) > 1:
            return layer.name
    raise SaliencyError(f"teacher {model.name!r} has no spatial feature map for Grad-CAM")


def check_teacher_file(spec: str) -> Path:
    """The file a teacher spec names, refused if it is not there: checked before a run changes
    anything, so a typo costs neither the stages before the saliency stage nor a finished run."""
    if spec.startswith(RESNET_PREFIX):
        weights = Path(spec[len(RESNET_PREFIX) :]).expanduser()
        if not weights.is_file():
            raise SaliencyError(f"ResNet-50 weights file not found: {weights} (no download happens; supply the file)")
        return weights
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SaliencyError(f"saliency teacher not found: {path} (e.g. runs/<earlier run>/float.h5)")
    return path


def load_teacher(spec: str) -> Teacher:
    """`<model file>` (tf_keras .h5/.keras with a Rescaling input) or `resnet50:<weights.h5>`."""
    import tf_keras as keras

    if spec.startswith(RESNET_PREFIX):
        weights = check_teacher_file(spec)
        try:
            # classifier_activation=None: the same weights, but the output is the class score (logit).
            # Grad-CAM of the softmax probability vanishes once the teacher is sure (d p / d logit =
            # p (1 - p) rounds to 0), leaving a flat map and a whole-image "crop".
            model = keras.applications.ResNet50(
                weights=str(weights), include_top=True, input_shape=(224, 224, 3), classifier_activation=None
            )
        except (ValueError, OSError) as exc:
            raise SaliencyError(f"{weights}: not ImageNet ResNet-50 weights ({exc})") from None
        return Teacher(model, 224, "conv5_block3_out", "resnet50", f"ImageNet ResNet-50 ({weights})")
    from qana.model import ModelFileError, load_square_rgb_model

    path = check_teacher_file(spec)
    try:
        model, side = load_square_rgb_model(path)
    except ModelFileError as exc:
        raise SaliencyError(f"{path}: teacher model {exc}") from None
    return Teacher(model, side, _last_spatial_layer(model), "none", f"float model {path}")


def gradcam(teacher: Teacher, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps (N, h, w) in [0, 1] for the teacher's predicted class of each image."""
    import tensorflow as tf
    import tf_keras as keras

    model = teacher.model
    probe = keras.Model(model.inputs, [model.get_layer(teacher.layer).output, model.output])
    maps = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(np.asarray(images[start : start + batch_size], dtype=np.float32))
        if teacher.preprocess == "resnet50":
            x = keras.applications.resnet50.preprocess_input(x)
        with tf.GradientTape() as tape:
            feature_map, scores = probe(x, training=False)
            top = tf.reduce_max(scores, axis=1)
        grads = tape.gradient(top, feature_map)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
        maps.append(np.where(peak > 0, cam / np.maximum(peak, 1e-12), 1.0))  # flat map: everything salient
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)


def saliency_boxes(cams: np.ndarray, threshold: float = 0.5, margin: float = 0.15, min_side: float = 0.5) -> np.ndarray:
    """Square crop boxes (top, left, side) as fractions of the image, one per map.

    The tightest square around pixels >= threshold x peak, widened by `margin` of its side on
    each edge, at least `min_side` of the image (a tiny hot spot must not zoom onto texture),
    moved (not shrunk) to stay inside the image.
    """
    if not 0 < threshold <= 1 or margin < 0 or not 0 < min_side <= 1:
        raise SaliencyError("threshold must be in (0, 1], margin >= 0, min_side in (0, 1]")
    cams = np.asarray(cams)
    if cams.ndim != 3 or 0 in cams.shape[1:]:
        raise SaliencyError(f"saliency maps must be a batch of 2-D maps (N, h, w), not of shape {cams.shape}")
    boxes = np.zeros((len(cams), 3), np.float64)
    for i, cam in enumerate(cams):
        h, w = cam.shape
        ys, xs = np.nonzero(cam >= threshold * cam.max()) if cam.max() > 0 else (np.arange(h), np.arange(w))
        top, bottom = ys.min() / h, (ys.max() + 1) / h
        left, right = xs.min() / w, (xs.max() + 1) / w
        side = max(bottom - top, right - left)
        side = min(1.0, max(min_side, side * (1 + 2 * margin)))
        cy, cx = (top + bottom) / 2, (left + right) / 2
        top = float(np.clip(cy - side / 2, 0.0, 1.0 - side))
        left = float(np.clip(cx - side / 2, 0.0, 1.0 - side))
        boxes[i] = (top, left, side)
    return boxes


def crop_images(sources: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut each box from its source image (N, S, S, 3 uint8) and resize to size x size (area).

    Sources and boxes that do not fit are refused rather than cropped wrongly: a missing box
    would leave a black training image, a non-square source a stretched one."""
    from PIL import Image

    check_crop_inputs(sources, boxes, size)
    out = np.zeros((len(sources), size, size, 3), np.uint8)
    for i, (img, (top, left, side)) in enumerate(zip(sources, boxes)):
        s = img.shape[0]
        y0, x0 = int(round(top * s)), int(round(left * s))
        n = max(1, int(round(side * s)))
        n = min(n, s - y0, s - x0)
        patch = Image.fromarray(np.ascontiguousarray(img[y0 : y0 + n, x0 : x0 + n]))
        out[i] = np.asarray(patch.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    return out


def check_crop_inputs(sources: np.ndarray, boxes: np.ndarray, size: int) -> None:
    """Refuse crop inputs `crop_images` would turn into wrong pixels, naming the shapes."""
    if not isinstance(sources, np.ndarray) or sources.dtype != np.uint8:
        raise SaliencyError(f"source images must be a uint8 array, not {getattr(sources, 'dtype', type(sources).__name__)}")
    if sources.ndim != 4 or sources.shape[1] != sources.shape[2] or sources.shape[3] != 3:
        raise SaliencyError(f"source images must be square RGB (N, S, S, 3), not of shape {sources.shape}")
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 3:
        raise SaliencyError(f"boxes must be (N, 3) rows of (top, left, side), not of shape {boxes.shape}")
    if len(boxes) != len(sources):
        raise SaliencyError(f"{len(sources)} source images but {len(boxes)} boxes: one box per image")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise SaliencyError(f"the crop size must be a positive whole number of pixels, not {size!r}")
