"""Quantization (quantizeml) and conversion to Akida (cnn2snn), with the checks that make
"runs entirely on Akida" a fact rather than a hope.

cnn2snn can stop at a layer it does not support and return a model that silently lacks the
rest; `convert_checked` therefore refuses any result whose output shape differs from the Keras
model's, whose last layer is not the head, or that does not map onto a virtual device of the
target with `hw_only=True` (which fails if any layer would need the software backend).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from qana.model import FEATURE_LAYER, HEAD_LAYER, LAST_CONV_LAYER
from qana.runtime import MIN_OUTPUT_SHIFT

ACTIVATION_BITS = {"v2": 8, "v1": 4}
FEATURE_BITS = {"v2": 8, "v1": 1}
HEAD_WEIGHT_BITS = {"v2": 8, "v1": 4}


class ConversionError(RuntimeError):
    """The model does not run entirely on Akida; the message says where it breaks."""


@dataclass(frozen=True)
class QuantSpec:
    target: str = "v2"
    # 8 or 4 for the backbone (the first layer always uses 8). On Akida 2.0 hardware 4-bit
    # weights need 4-bit activations while the identity convolutions quantizeml inserts before
    # Add layers need 8-bit outputs, so a 4-bit v2 model quantizes and runs in the quantized
    # Keras model but is refused by the hw_only mapping check; 4-bit is native on Akida 1.0.
    weight_bits: int = 8

    @property
    def activation_bits(self) -> int:
        return ACTIVATION_BITS[self.target]

    @property
    def feature_bits(self) -> int:
        return FEATURE_BITS[self.target]

    def describe(self) -> dict:
        return {
            "weight_bits": self.weight_bits,
            "input_weight_bits": 8,
            "activation_bits": self.activation_bits,
            "feature_bits": self.feature_bits,
            "head_weight_bits": HEAD_WEIGHT_BITS[self.target],
        }


def _check_target(target: str) -> str:
    if target not in ("v2", "v1"):
        raise ValueError(f"unknown target {target!r}: expected 'v2' or 'v1'")
    return target


def _akida_version(target: str):
    from cnn2snn import AkidaVersion

    return {"v2": AkidaVersion.v2, "v1": AkidaVersion.v1}[_check_target(target)]


def virtual_device(target: str):
    """A virtual device of the target IP for hw_only mapping checks."""
    import akida

    return akida.SixNodesIPv2() if _check_target(target) == "v2" else akida.AKD1000()


def quantize_model(model, spec: QuantSpec, samples: np.ndarray):
    """Post-training quantization + calibration; the result can be fine-tuned (QAT) with fit()."""
    from cnn2snn import set_akida_version
    from quantizeml.models import QuantizationParams, dump_config, quantize

    if spec.weight_bits not in (4, 8):
        raise ValueError(f"weight_bits must be 4 or 8, got {spec.weight_bits}")
    if spec.target == "v1" and spec.weight_bits != 4:
        raise ValueError("Akida 1.0 supports 1, 2 or 4-bit weights: use weight_bits=4 for target v1")
    qparams = QuantizationParams(
        input_weight_bits=8,
        weight_bits=spec.weight_bits,
        activation_bits=spec.activation_bits,
        per_tensor_activations=spec.target == "v1",
    )
    samples = samples.astype(np.float32)
    with set_akida_version(_akida_version(spec.target)):
        qmodel = quantize(model, qparams=qparams, samples=samples, num_samples=len(samples), batch_size=64)
        config = dump_config(qmodel)
        changed = False
        head_cfg = config.get(HEAD_LAYER, {})
        if "weight_quantizer" in head_cfg and head_cfg["weight_quantizer"].get("bitwidth") != HEAD_WEIGHT_BITS[spec.target]:
            head_cfg["weight_quantizer"]["bitwidth"] = HEAD_WEIGHT_BITS[spec.target]
            changed = True
        feature_cfg = config.get(FEATURE_LAYER, {})
        if spec.target == "v1" and "output_quantizer" in feature_cfg:
            feature_cfg["output_quantizer"]["bitwidth"] = 1
            changed = True
        feeding_cfg = config.get(_layer_feeding(model, LAST_CONV_LAYER) or "", {}).get("output_quantizer", {})
        if spec.target == "v2" and feeding_cfg.get("axis") == "per-axis":
            # The pooled last conv must see one scale on all its input channels. Per channel,
            # calibration may give some channels one more fractional bit; cnn2snn then aligns them
            # with an input shift, and on Akida the pooled features saturate where quantizeml's
            # do not (session 24: features cut to 1.0, 1.5-1.8 points of macro-F1 lost on two
            # of four splits; benchmarks/feature_saturation.py). Where calibration gives every
            # channel the same scale, per tensor is the same quantizer.
            feeding_cfg["axis"] = "per-tensor"
            changed = True
        if changed:
            qmodel = quantize(model, q_config=config, qparams=qparams, samples=samples, num_samples=len(samples), batch_size=64)
    return qmodel


def _layer_feeding(model, name: str) -> str | None:
    """Name of the one layer whose output is `name`'s input (None if `name` is not in the model)."""
    names = {layer.name for layer in model.layers}
    if name not in names:
        return None
    inbound = model.get_layer(name).inbound_nodes[0].inbound_layers
    return inbound.name if not isinstance(inbound, list) else None


def convert_checked(qmodel, target: str):
    """cnn2snn.convert, then prove the result is complete and maps onto hardware."""
    from cnn2snn import convert, set_akida_version

    with warnings.catch_warnings(record=True) as caught, set_akida_version(_akida_version(target)):
        warnings.simplefilter("always")
        akida_model = convert(qmodel)
    # "Conversion stops at layer X ... The end of the model is ignored" is how cnn2snn says it
    # dropped layers: "conver" catches it as well as "cannot convert"
    suspicious = [str(w.message) for w in caught if any(word in str(w.message).lower() for word in ("conver", "ignored", "not supported"))]
    if suspicious:
        raise ConversionError("cnn2snn warned during conversion: " + " | ".join(suspicious))
    keras_out = tuple(int(d) for d in qmodel.output_shape[1:])
    akida_out = tuple(int(d) for d in akida_model.output_shape)
    if int(np.prod(keras_out)) != int(np.prod(akida_out)):
        raise ConversionError(f"conversion stopped early: Akida output {akida_out} vs Keras output {keras_out}")
    # the head must END both models (a trailing dequantizer only turns integers back into floats):
    # a layer after it that cnn2snn dropped can leave the output size unchanged
    keras_last = [layer.name for layer in qmodel.layers if type(layer).__name__ != "Dequantizer"][-1:]
    akida_last = [layer.name for layer in akida_model.layers if not str(layer.parameters.layer_type).endswith("Dequantizer")][-1:]
    if keras_last != [HEAD_LAYER] or akida_last != [HEAD_LAYER]:
        raise ConversionError(
            f"the head layer {HEAD_LAYER!r} must be the last layer of both models: the quantized model ends with "
            f"{keras_last}, the Akida model with {akida_last}"
        )
    keep_output_headroom(akida_model)
    check_hardware_mapping(akida_model, target)
    return akida_model


# Akida (2.19.3, software backend) rescales a layer's integer outputs per channel by
# output_scales (an 8-bit mantissa) x 2**output_shift, but where output_shift is below -24 the
# result saturates at 128 >> (-24 - output_shift) instead of 127: 64 at -25, 32 at -26.
# cnn2snn does not know this and gives the pooled last conv shifts of -25 and -24 (its pooled
# sum over 8 x 8 positions adds 6 bits; -27 to -25 where it also shifts the inputs), so features
# stop at 1.0 (or 0.5, 0.25) on the chip while the quantized Keras model lets them reach 2.0
# (session 25: 141 of the shipped v2 model's 256 features; benchmarks/feature_saturation.py).
# qana.runtime.early_saturating_channels finds them in a converted model (`qana info`).


def keep_output_headroom(akida_model) -> dict[str, int]:
    """Rewrite every output rescale with a shift below -24 as the same scale at shift -24.

    mantissa x 2**shift == (mantissa / 2**k) x 2**-24 with k = -24 - shift: the mantissa is
    rounded to 8 - k bits (at k = 1, a gain error of at most 0.8 %; each further k doubles it),
    and the channel keeps the full 8-bit output range. Returns {layer name: channels rewritten}; a scale too
    small to keep at shift -24 (mantissa rounds to 0) is a ConversionError.
    """
    changed: dict[str, int] = {}
    for layer in akida_model.layers:
        if not {"output_scales", "output_shift"} <= set(layer.get_variable_names()):
            continue
        recorded_shifts = np.asarray(layer.get_variable("output_shift"))
        shifts = recorded_shifts.astype(np.int64)
        low = shifts < MIN_OUTPUT_SHIFT
        if not low.any():
            continue
        scales = np.asarray(layer.get_variable("output_scales"))
        if scales.shape != shifts.shape:
            raise ConversionError(f"{layer.name}: output_scales {scales.shape} and output_shift {shifts.shape} differ in shape")
        k = MIN_OUTPUT_SHIFT - shifts[low]
        # half to even: an odd mantissa halved is always x.5, and rounding those all up would
        # raise every such feature's gain by up to 0.8 % (a measurable 64.08 instead of 64)
        rounded = np.round(scales[low].astype(np.int64) / 2.0**k).astype(np.int64)
        if (rounded < 1).any():
            raise ConversionError(f"{layer.name}: an output scale is too small for Akida's output range (shift {int(shifts.min())})")
        new_scales, new_shifts = scales.astype(np.int64), shifts.copy()
        new_scales[low], new_shifts[low] = rounded, MIN_OUTPUT_SHIFT
        layer.set_variable("output_scales", new_scales.astype(scales.dtype))
        layer.set_variable("output_shift", new_shifts.astype(recorded_shifts.dtype))
        changed[layer.name] = int(low.sum())
    return changed


def check_hardware_mapping(akida_model, target: str) -> list[str]:
    """Map onto a virtual device with hw_only=True; every sequence must land on hardware."""
    try:
        akida_model.map(virtual_device(target), hw_only=True)
        backends = [str(seq.backend) for seq in akida_model.sequences]
    except RuntimeError as exc:
        raise ConversionError(f"the model does not map onto Akida {target} hardware: {exc}") from None
    finally:
        akida_model.map(None)
    if any("Hardware" not in b for b in backends):
        raise ConversionError(f"part of the model would run in software: sequences {backends}")
    return backends
