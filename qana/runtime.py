"""Running a bundle's Akida model: features from the backbone, and the head written on-chip.

The converted model is backbone + head layer (+ a Dequantizer on Akida 2.0). For head learning
the clinic needs the backbone's integer features, so a second copy of the model is loaded with
the head layers popped off. Writing a new head sets the Akida layer's integer variables from a
`QuantizedHead`, so the chip's predictions are exactly those of `qana.head.quantized_logits`.

Uses only the `akida` runtime: clinics never import TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qana.bundle import Bundle
from qana.head import QuantizedHead, split_bias_v2

log = logging.getLogger(__name__)

HEAD_LAYER_TYPES = ("Dense1D", "FullyConnected", "Dequantizer")


class RuntimeErrorQana(RuntimeError):
    """The Akida model cannot be run as asked; the message says why."""


@dataclass
class DeviceChoice:
    device: object | None  # akida.Device, or None for the software backend
    description: str


def choose_device(mode: str = "auto") -> DeviceChoice:
    """'auto': the first Akida hardware device if one is present, else the software backend."""
    import akida

    if mode not in ("auto", "software"):
        raise RuntimeErrorQana(f"unknown device mode {mode!r}: use 'auto' or 'software'")
    if mode == "auto":
        devices = akida.devices()
        if devices:
            dev = devices[0]
            return DeviceChoice(dev, f"Akida hardware device {dev.desc} (IP {dev.version})")
    return DeviceChoice(None, "Akida software backend (CPU; no Akida device found)" if mode == "auto" else "Akida software backend (CPU)")


def _layer_type(layer) -> str:
    return str(layer.parameters.layer_type).split(".")[-1]


class AkidaRuntime:
    """A bundle's model on a device (or the software backend)."""

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        import akida

        self.bundle = bundle
        self.choice = choose_device(device)
        self.model = akida.Model(str(bundle.model_path))
        self.backbone = akida.Model(str(bundle.model_path))
        while self.backbone.layers and _layer_type(self.backbone.layers[-1]) in HEAD_LAYER_TYPES:
            self.backbone.pop_layer()
        head_layers = [l for l in self.model.layers if _layer_type(l) in ("Dense1D", "FullyConnected")]
        if not head_layers:
            raise RuntimeErrorQana(f"{bundle.model_path}: the model has no Dense1D/FullyConnected head layer")
        self.head_layer = head_layers[-1]
        # Akida 2.0 Dense1D shifts each input channel left by input_shift to align per-channel
        # activation scales; the features handed to the head math include that shift so the
        # integer reference is exactly what the layer accumulates.
        names = self.head_layer.variables.names
        self._input_shift = self.head_layer.get_variable("input_shift").astype(np.int64) if "input_shift" in names else None
        deq = [l for l in self.model.layers if _layer_type(l) == "Dequantizer"]
        self.dequantizer = deq[-1] if deq else None
        if self.choice.device is not None:
            self.backbone.map(self.choice.device)
            self.model.map(self.choice.device)

    @property
    def device_description(self) -> str:
        return self.choice.description

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.bundle.input_shape:
            raise RuntimeErrorQana(f"images must be (N, {', '.join(map(str, self.bundle.input_shape))}); got {images.shape}")
        if images.dtype != np.uint8:
            raise RuntimeErrorQana(f"images must be uint8, got {images.dtype}")
        return images

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Integer backbone features, shape (N, D)."""
        images = self._check_images(images)
        out = [self.backbone.forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros((0, self.bundle.feature_dim), np.int32)
        feats = np.concatenate(out).reshape(len(images), -1).astype(np.int32)
        if self._input_shift is not None and np.any(self._input_shift):
            feats = feats << self._input_shift[None, :]
        return feats

    def write_head(self, qhead: QuantizedHead) -> None:
        """Store a quantized head in the Akida head layer (so on-chip predictions use it)."""
        layer = self.head_layer
        kind = _layer_type(layer)
        current = layer.get_variable("weights")
        w = qhead.weights
        if current.size != w.size or current.shape[-1] != w.shape[1]:
            raise RuntimeErrorQana(
                f"head shape {w.shape} does not fit the model's head layer {current.shape}; "
                "a grown head needs a model rebuilt for the new class count"
            )
        layer.set_variable("weights", w.reshape(current.shape).astype(current.dtype))
        if kind == "Dense1D":
            b_int, shift = split_bias_v2(qhead.bias)
            if not np.array_equal(b_int.astype(np.int64) << shift.astype(np.int64), qhead.bias):
                raise RuntimeErrorQana("bias not representable as int8 << shift; quantize the head for target 'v2'")
            layer.set_variable("bias", b_int.astype(np.int8))
            layer.set_variable("bias_shift", shift)
            if self.dequantizer is not None:
                self.dequantizer.set_variable("scales", np.full(w.shape[1], qhead.scale, np.float32))
        else:  # FullyConnected (Akida 1.0): potential = f @ W - threshold; output / act_step
            layer.set_variable("threshold", (-qhead.bias).astype(np.int32))
            layer.set_variable("act_step", np.full(w.shape[1], 1.0 / qhead.scale, np.float32))

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits of the whole model as run by Akida, shape (N, C)."""
        images = self._check_images(images)
        out = [self.model.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(out).reshape(len(images), -1)

    def head_logits(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Logits of the model's head layers run by Akida on backbone features, shape (N, C).

        `features` as `features()` returns them (cached per image by the clinic). For the
        images they came from, the result is exactly `logits(images)`: the head layers
        (Dense1D/FullyConnected, Dequantizer), copied with their current variables into a
        model of their own, run on what the backbone already produced on the device. So a
        clinic checks the chip's decisions for every new head without running the backbone
        over its images again (measured with a 42M-MAC v2 model on the software backend:
        0.006 ms instead of 10-20 ms per image). tests/test_runtime.py checks the equality.
        """
        import akida

        feats = np.asarray(features).reshape(len(features), -1).astype(np.int64)
        if feats.shape[1] != self.bundle.feature_dim:
            raise RuntimeErrorQana(f"features must be (N, {self.bundle.feature_dim}); got {np.asarray(features).shape}")
        if self._input_shift is not None and np.any(self._input_shift):
            feats = feats >> self._input_shift[None, :]  # features() shifted them left; the layer shifts itself
        head = akida.Model(layers=[l for l in self.model.layers if _layer_type(l) in HEAD_LAYER_TYPES])
        if self.choice.device is not None:
            head.map(self.choice.device)
        params = head.layers[0].parameters
        signed = bool(getattr(params, "input_signed", False))
        bits = int(getattr(params, "input_bits", 8))
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if len(feats) and (feats.min() < low or feats.max() > high):
            raise RuntimeErrorQana(f"features outside the head input's {bits}-bit {'signed' if signed else 'unsigned'} range")
        x = feats.astype(np.int8 if signed else np.uint8).reshape(len(feats), 1, 1, -1)
        if not len(x):
            return np.zeros((0, len(self.bundle.classes)), np.float32)
        out = [head.predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(out).reshape(len(x), -1)


_SHARED: dict[tuple[str, str], AkidaRuntime] = {}


def shared_runtime(bundle: Bundle, device: str = "auto") -> AkidaRuntime:
    """One runtime per bundle id and device mode in this process, reused by later callers.

    akida 2.19.3 does not free a model loaded from a file: every `akida.Model(path)` keeps
    about the file's size (measured: +114 MB after 200 loads of the 594 kB v2 model;
    `gc.collect()` does not help). A process that handles many messages — a Ray worker of
    Flower's simulation engine handles thousands — would grow by gigabytes, while a
    SuperNode's ClientApp process handles one message and is not affected. Callers write
    their head before predicting (the head is the only state that changes) and must not use
    one runtime from two threads at once.
    """
    key = (bundle.bundle_id, device)
    runtime = _SHARED.get(key)
    if runtime is None:
        runtime = _SHARED[key] = AkidaRuntime(bundle, device)
    return runtime
