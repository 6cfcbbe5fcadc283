"""QANA building blocks (tf_keras builder functions), each made only of Akida-convertible layers.

Akida has no Multiply and no sigmoid, so the textbook attention blocks (SE, ECA) cannot run on
the chip. The spike-compatible versions here keep what the blocks compute and replace only the
operations the chip lacks:

* sigmoid gate      -> bounded ReLU (a hard, saturating gate: a neuron's firing rate is clipped)
* x * gate          -> x + gate (additive modulation of the membrane potential before the bounded
                       activation)
* global pooling    -> depthwise convolutions (a per-channel spatial summary computed on-chip;
                       the squeeze of SE uses a 7x7 kernel, Akida's largest: near-global on the
                       8x8 map of the last stage at 64x64 input, local on larger maps)
* Conv1D on channels-> 1x1 convolution (cross-channel interaction Akida maps natively)

What the additive form can do depends on the gate's sign. The bounded-ReLU gate (`signed=False`,
every shipped bundle) is never negative and the block's input is a ReLU output already, so
`min(x + gate, 6) >= x`: it can only *excite* (raise or saturate) a channel, never attenuate it,
whereas a sigmoid gate can only attenuate. The signed gate (`signed=True`, attention "...-signed")
leaves out the ReLU before the Add, so the batch-normalised gate can be negative and the block
can lower a channel's rate too, which is what recalibration is for; it converts and maps on Akida
2.0 exactly like the other (tests/test_conversion_tail.py). Which one trains better is an open
question (README, "Spike-compatible attention").

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


def _gate(x, channels: int, name: str, relu_name: str, signed: bool):
    """1x1 conv -> BatchNorm, then a bounded ReLU unless the gate is `signed` (module docstring).
    The layer names are those of the blocks in every shipped bundle."""
    gate = layers.Conv2D(channels, 1, padding="same", use_bias=False, name=f"{name}_conv")(x)
    gate = layers.BatchNormalization(name=f"{name}_bn")(gate)
    return gate if signed else layers.ReLU(ACT_MAX, name=relu_name)(gate)


def spatial_eca(x, channels: int, name: str, kernel: int = 5, signed: bool = False):
    """Spike-compatible, spatially-aware efficient channel attention (SECA).

    ECA computes GAP -> Conv1D over channels -> sigmoid -> multiply. Here a k x k depthwise conv
    gives each position a local per-channel summary (spatially aware instead of global), a 1x1
    conv mixes neighbouring channels' summaries into the gate (a bounded ReLU, or signed), and the
    gate is added to the input before the next bounded activation.
    """
    context = dw_bn_act(x, kernel=kernel, name=f"{name}_ctx")
    gate = _gate(context, channels, name=f"{name}_mix", relu_name=f"{name}_gate", signed=signed)
    out = layers.Add(name=f"{name}_add")([x, gate])
    return layers.ReLU(ACT_MAX, name=f"{name}_out")(out)


def squeeze_excite(x, channels: int, name: str, squeeze_kernel: int = 7, reduction: int = 4, signed: bool = False):
    """Spike-compatible squeeze-and-excitation.

    Squeeze: a 7x7 depthwise conv (Akida's largest kernel), a learned near-global pooling per
    channel on the 8x8 map of the last stage, a local one on larger maps. Excitation: 1x1
    bottleneck (C/r) with a bounded ReLU and a 1x1 expansion (bounded ReLU, or signed).
    Recalibration: added to the input (see module docstring).
    """
    squeezed = dw_bn_act(x, kernel=squeeze_kernel, name=f"{name}_squeeze")
    hidden = conv_bn_act(squeezed, max(channels // reduction, 8), kernel=1, name=f"{name}_reduce")
    excite = _gate(hidden, channels, name=f"{name}_expand", relu_name=f"{name}_expand_relu", signed=signed)
    out = layers.Add(name=f"{name}_add")([x, excite])
    return layers.ReLU(ACT_MAX, name=f"{name}_out")(out)


STAGE_ATTENTION = ("seca", "se", "seca-signed", "se-signed", "none")


def qana_stage(x, channels: int, name: str, attention: str = "seca"):
    """Ghost module + attention + residual connection, then the next stage downsamples."""
    ghost = ghost_module(x, channels, name=f"{name}_ghost")
    kind, _, sign = attention.partition("-")
    if attention not in STAGE_ATTENTION:
        raise ValueError(f"unknown attention {attention!r} (one of {', '.join(STAGE_ATTENTION)})")
    if kind == "seca":
        ghost = spatial_eca(ghost, channels, name=f"{name}_seca", signed=sign == "signed")
    elif kind == "se":
        ghost = squeeze_excite(ghost, channels, name=f"{name}_se", signed=sign == "signed")
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
    "STAGE_ATTENTION",
]
