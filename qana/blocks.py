"""QANA building blocks (tf_keras builder functions), each made only of Akida-convertible layers.

Akida has no Multiply and no sigmoid, so the textbook attention blocks (SE, ECA) cannot run on
the chip. The spike-compatible versions here keep what the blocks compute and replace only the
operations the chip lacks:

* sigmoid gate      -> bounded ReLU (a hard, saturating gate: a neuron's firing rate is clipped)
* x * gate          -> x + gate (additive modulation: in an integrate-and-fire neuron, adding an
                       excitation to the membrane potential before the bounded activation raises or
                       lowers its firing rate, which is what multiplicative gating does to rates)
* global pooling    -> depthwise convolutions (a per-channel spatial summary computed on-chip;
                       the squeeze of SE uses a kernel as large as the map at that stage)
* Conv1D on channels-> 1x1 convolution (cross-channel interaction Akida maps natively)

All activations are bounded ReLUs (`max_value`), which is what makes the quantized activations
(and, on Akida 1.0, the spikes) well defined.
"""

from __future__ import annotations

import tf_keras as keras
from tf_keras import layers

ACT_MAX = 6.0


def conv_bn_act(x, filters: int, kernel: int = 3, strides: int = 1, name: str = "", act_max: float = ACT_MAX):
    """Conv2D -> BatchNorm -> bounded ReLU (folds into one Akida convolution)."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(act_max, name=f"{name}_relu")(x)


def dw_bn_act(x, kernel: int = 3, name: str = "", act_max: float = ACT_MAX):
    """DepthwiseConv2D -> BatchNorm -> bounded ReLU."""
    x = layers.DepthwiseConv2D(kernel, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(act_max, name=f"{name}_relu")(x)


def ghost_module(x, filters: int, name: str):
    """Ghost module (Han et al. 2020): half the maps from a 1x1 conv, half from a cheap depthwise
    conv over those, concatenated. Roughly halves MACs of a full 1x1 layer of the same width."""
    primary = conv_bn_act(x, filters // 2, kernel=1, name=f"{name}_primary")
    cheap = dw_bn_act(primary, kernel=3, name=f"{name}_cheap")
    return layers.Concatenate(name=f"{name}_concat")([primary, cheap])


def spatial_eca(x, channels: int, name: str, kernel: int = 5):
    """Spike-compatible, spatially-aware efficient channel attention (SECA).

    ECA computes GAP -> Conv1D over channels -> sigmoid -> multiply. Here a k x k depthwise conv
    gives each position a local per-channel summary (spatially aware instead of global), a 1x1
    conv mixes neighbouring channels' summaries, a bounded ReLU acts as the gate, and the gate is
    added to the input before the next bounded activation.
    """
    context = dw_bn_act(x, kernel=kernel, name=f"{name}_ctx")
    gate = layers.Conv2D(channels, 1, padding="same", use_bias=False, name=f"{name}_mix_conv")(context)
    gate = layers.BatchNormalization(name=f"{name}_mix_bn")(gate)
    gate = layers.ReLU(ACT_MAX, name=f"{name}_gate")(gate)
    out = layers.Add(name=f"{name}_add")([x, gate])
    return layers.ReLU(ACT_MAX, name=f"{name}_out")(out)


def squeeze_excite(x, channels: int, name: str, squeeze_kernel: int = 7, reduction: int = 4):
    """Spike-compatible squeeze-and-excitation.

    Squeeze: a depthwise conv with a kernel as large as the feature map at this stage (7x7 on
    8x8), i.e. a learned near-global pooling per channel. Excitation: 1x1 bottleneck (C/r) and
    1x1 expansion with bounded ReLUs. Recalibration: added to the input (see module docstring).
    """
    squeezed = dw_bn_act(x, kernel=squeeze_kernel, name=f"{name}_squeeze")
    hidden = conv_bn_act(squeezed, max(channels // reduction, 8), kernel=1, name=f"{name}_reduce")
    excite = conv_bn_act(hidden, channels, kernel=1, name=f"{name}_expand")
    out = layers.Add(name=f"{name}_add")([x, excite])
    return layers.ReLU(ACT_MAX, name=f"{name}_out")(out)


def qana_stage(x, channels: int, name: str, attention: str = "seca"):
    """Ghost module + attention + residual connection, then the next stage downsamples."""
    ghost = ghost_module(x, channels, name=f"{name}_ghost")
    if attention == "seca":
        ghost = spatial_eca(ghost, channels, name=f"{name}_seca")
    elif attention == "se":
        ghost = squeeze_excite(ghost, channels, name=f"{name}_se")
    elif attention != "none":
        raise ValueError(f"unknown attention {attention!r}")
    if x.shape[-1] == channels:
        ghost = layers.Add(name=f"{name}_residual")([x, ghost])
        ghost = layers.ReLU(ACT_MAX, name=f"{name}_residual_relu")(ghost)
    return ghost


def separable_bn_act(x, filters: int, name: str, pool: bool = False, act_max: float = ACT_MAX):
    """SeparableConv2D (fused on Akida 1.0) -> optional max-pool -> BatchNorm -> bounded ReLU."""
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep")(x)
    if pool:
        x = layers.MaxPool2D(padding="same", name=f"{name}_pool")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(act_max, name=f"{name}_relu")(x)


__all__ = [
    "conv_bn_act",
    "dw_bn_act",
    "ghost_module",
    "keras",
    "qana_stage",
    "separable_bn_act",
    "spatial_eca",
    "squeeze_excite",
]
