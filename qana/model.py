"""The QANA networks for the two Akida targets.

v2 (Akida 2.0): stem conv -> three QANA stages (Ghost module, attention, residual) with
strided convolutions between them -> a last conv with global average pooling (on an 8x8 map,
inside the W*H < 144 hardware limit, stride 1 because a CNP cannot pool and stride at once)
-> the projection head, a Dense layer producing the logits.

v1 (Akida 1.0 / AKD1000): sequential only (no Add, no Concatenate), so the Ghost and attention
blocks are replaced by fused separable convolutions with max-pooling; every ReLU is bounded and
the last one is quantized to 1 bit, so the head sees binary spikes and can also be learned
on-chip with Akida's edge learning.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import tf_keras as keras
from tf_keras import layers

from qana.blocks import conv_bn_act, qana_stage, separable_bn_act

FEATURE_LAYER = "features"  # the last bounded ReLU before the head (after pooling)
HEAD_LAYER = "head"
LAST_CONV_LAYER = "last_conv"  # Akida 2.0 fuses it with the ReLU and the global pooling


@dataclass(frozen=True)
class ModelSpec:
    """What `build_model` makes; recorded in bundles and run directories."""

    target: str = "v2"
    input_size: int = 64
    num_classes: int = 7
    width: int = 32  # channels of the first stage; later stages double
    feature_dim: int = 256
    # v2: "both" (SECA in stages 1-2, SE in stage 3) | "seca" | "se" | "none"; "...-signed": the
    # same with a gate that can also lower a channel's rate (qana.blocks)
    attention: str = "both"
    dropout: float = 0.2
    blocks: int = 1  # v2: QANA blocks per stage (the first sets the width, the rest are residual)


ATTENTION_CHOICES = ("both", "seca", "se", "none", "both-signed", "seca-signed", "se-signed")


def _attention_for_stage(spec: ModelSpec, stage: int) -> str:
    kind, _, sign = spec.attention.partition("-")
    if kind == "both":
        return ("se" if stage == 2 else "seca") + ("-signed" if sign else "")
    return spec.attention


def build_v2(spec: ModelSpec) -> keras.Model:
    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = conv_bn_act(x, spec.width, strides=2, name="stem")  # 32x32
    widths = (spec.width, spec.width * 2, spec.width * 4)
    for stage, channels in enumerate(widths):
        if stage > 0:
            x = conv_bn_act(x, channels, strides=2, name=f"down{stage}")  # 16x16, 8x8
        for block in range(spec.blocks):
            # the first block keeps the names of the one-block model (shipped bundles, ablations)
            name = f"stage{stage + 1}" if block == 0 else f"stage{stage + 1}b{block + 1}"
            x = qana_stage(x, channels, name=name, attention=_attention_for_stage(spec, stage))
    x = layers.Conv2D(spec.feature_dim, 3, padding="same", use_bias=False, name=LAST_CONV_LAYER)(x)
    x = layers.BatchNormalization(name="last_bn")(x)
    x = layers.ReLU(6.0, name="last_relu")(x)
    x = layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    if spec.dropout:
        x = layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = layers.Dense(spec.num_classes, name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name="qana_v2")


def build_v1(spec: ModelSpec) -> keras.Model:
    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = conv_bn_act(x, spec.width, strides=2, name="stem")  # 32x32
    x = separable_bn_act(x, spec.width * 2, name="sep1", pool=True)  # 16x16
    x = separable_bn_act(x, spec.width * 2, name="sep2")
    x = separable_bn_act(x, spec.width * 4, name="sep3", pool=True)  # 8x8
    x = separable_bn_act(x, spec.width * 4, name="sep4")
    x = layers.SeparableConv2D(spec.feature_dim, 3, padding="same", use_bias=False, name="last_sep")(x)
    x = layers.GlobalAveragePooling2D(name="last_pool")(x)
    x = layers.BatchNormalization(name="last_bn")(x)
    x = layers.ReLU(1.0, name=FEATURE_LAYER)(x)  # quantized to 1 bit: binary features
    if spec.dropout:
        x = layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = layers.Dense(spec.num_classes, name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name="qana_v1")


def backbone(model: keras.Model) -> keras.Model:
    """`model` up to its `features` layer, sharing its weights: what the head sees (before dropout)."""
    return keras.Model(model.input, model.get_layer(FEATURE_LAYER).output, name="backbone")


def check_spec(spec: ModelSpec) -> None:
    """ValueError naming the setting a network cannot be built (or mapped onto its Akida) with,
    for every caller, not only `qana train`: otherwise Keras fails on mismatched shapes deep in
    the build, or the v1 network trains for hours and then fails at the hardware mapping."""
    if spec.target not in ("v2", "v1"):
        raise ValueError(f"unknown target {spec.target!r}: expected 'v2' or 'v1'")
    if spec.blocks < 1:
        raise ValueError(f"blocks per stage must be at least 1, got {spec.blocks}")
    if spec.attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {spec.attention!r} (one of {', '.join(ATTENTION_CHOICES)})")
    if spec.target == "v2" and spec.width % 2:
        raise ValueError(f"width must be even on v2 (a Ghost module makes half its channels cheaply and concatenates them), not {spec.width}")
    if spec.target == "v1" and spec.input_size // 8 < 3:
        # AKD1000 pools globally only after a convolution with at least 3 output rows
        raise ValueError(f"the v1 network needs an input of at least 24 pixels (its last map, side/8, must have 3 rows), not {spec.input_size}")


def build_model(spec: ModelSpec) -> keras.Model:
    check_spec(spec)
    return build_v2(spec) if spec.target == "v2" else build_v1(spec)


class ModelFileError(ValueError):
    """A model file that cannot serve as an image model; the message says why (callers add the path)."""


def load_square_rgb_model(path: Path) -> tuple[keras.Model, int]:
    """A tf_keras model file and the side of the fixed-size square RGB images it takes.

    The one loader of every teacher (a --teacher run's float.h5, a --saliency-teacher file), so
    both refuse the same files for the same reasons: not loadable, not square RGB, no fixed size
    (the crops and the student's images need one known size)."""
    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError, zipfile.BadZipFile) as exc:  # KeyError: a zip without a model
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"cannot be loaded as a tf_keras model ({reason})") from None
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] == shape[2] and shape[3] == 3):
        raise ModelFileError(f"takes input {shape}, not square RGB images")
    if not isinstance(shape[1], int):
        raise ModelFileError(f"takes input {shape}: its image size is not fixed")
    return model, shape[1]
