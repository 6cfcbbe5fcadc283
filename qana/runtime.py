"""Running a bundle's Akida model: features from the backbone, and the head written on-chip.

The converted model is backbone + head layer (+ a Dequantizer on Akida 2.0). For head learning
the clinic needs the backbone's integer features, so a second copy of the model is loaded with
the head layers popped off. Writing a new head sets the Akida layer's integer variables from a
`QuantizedHead`, so the chip's predictions are exactly those of `qana.head.quantized_logits`.

Uses only the `akida` runtime: clinics never import TensorFlow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np

from qana.bundle import MANIFEST, Bundle, BundleError, sha256_file
from qana.head import QuantizedHead, split_bias_v2
from qana.preprocess import preprocess
from qana.views import averaged_features

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


# Reads a model file in a child process (see `probe_model_file`); exit 3 = akida raised an error.
_PROBE = """
import sys
import akida
try:
    akida.Model(sys.argv[1])
except Exception as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""
PROBE_TIMEOUT = 120.0  # seconds; reading a model takes well under one
_PROBED: set[str] = set()  # sha256 of the model files a child process has read without dying


def probe_model_file(path, digest: str) -> None:
    """Have a child process read the model file once before this process does.

    akida 2.19.3 kills the process (SIGSEGV) on some damaged files instead of raising: a
    model.fbz cut short by an interrupted copy, then written into a bundle with its (matching)
    hash, would take a clinic's process down with no message. The child dies instead and the
    caller gets a BundleError naming the file. About 0.3 s, once per file content per process.
    """
    if digest in _PROBED:
        return
    try:
        # -P: the working directory is not put on the child's import path (a statistics.py there
        # would shadow the standard library's and break `import akida`)
        done = subprocess.run([sys.executable, "-P", "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{path}: akida did not finish reading the model within {PROBE_TIMEOUT:.0f} s") from None
    if done.returncode < 0:
        raise BundleError(
            f"{path} is not a readable Akida model (akida crashed reading it, signal {-done.returncode}): "
            "the file is damaged or cut short; copy or unpack the bundle again"
        )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise BundleError(f"{path} is not a readable Akida model ({reason})")
    _PROBED.add(digest)


def load_akida_model(bundle: Bundle):
    """The bundle's Akida model; BundleError naming the file when akida cannot read it (the
    sha256 check passes for a file replaced together with its recorded hash), probed in a
    child process first because akida crashes on some damaged files (`probe_model_file`)."""
    import akida

    try:
        os.fsencode(bundle.model_path).decode("utf-8")
    except UnicodeDecodeError:  # akida takes the path as UTF-8 text and refuses it, as if the file were damaged
        raise BundleError(
            f"{os.fsdecode(bundle.model_path)!r}: akida can only open files whose path is valid UTF-8; "
            "rename the bundle's folder (or a folder above it)"
        ) from None
    # the hash load_bundle verified; a run's own folder (qana.train) has no manifest of files
    recorded = bundle.manifest.get("files", {}).get(bundle.model_path.name)
    probe_model_file(bundle.model_path, recorded or sha256_file(bundle.model_path))
    try:
        model = akida.Model(str(bundle.model_path))
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{bundle.model_path} is not a readable Akida model ({exc})") from None
    check_model_matches_manifest(model, bundle)
    return model


def check_model_matches_manifest(model, bundle: Bundle) -> None:
    """The input shape and feature count bundle.json declares are the model's own; otherwise a
    BundleError naming the field, not a failure deep inside a clinic's first round."""
    manifest_path = bundle.path / MANIFEST
    made_for = str(getattr(model, "ip_version", ""))
    target = bundle.manifest.get("target")  # a run's own folder (qana.train) records none
    if target is not None and made_for.startswith("IpVersion.") and made_for != f"IpVersion.{target}":
        raise BundleError(f"{manifest_path}: 'target' is {target} but {bundle.model_path.name} is an Akida {made_for.split('.')[-1]} model")
    declared = list(bundle.manifest["input_shape"])
    actual = [int(d) for d in model.input_shape]
    if actual != declared:
        raise BundleError(f"{manifest_path}: 'input_shape' is {declared} but {bundle.model_path.name} takes {actual}")
    depth = backbone_depth(model)
    if 0 < depth < len(model.layers):
        features = int(np.prod(model.layers[depth - 1].output_dims))
        if features != bundle.feature_dim:
            raise BundleError(f"{manifest_path}: 'feature_dim' is {bundle.feature_dim} but {bundle.model_path.name} gives {features} features")


# Akida saturates an output channel whose rescale shift (output_scales x 2**output_shift) is
# below this at 128 >> (-24 - shift) instead of 127; qana.convert.keep_output_headroom rewrites
# such rescales at conversion (session 25), so only bundles converted before that have them.
MIN_OUTPUT_SHIFT = -24


def early_saturating_channels(model) -> dict[str, int]:
    """{layer name: output channels Akida cuts early} for an Akida model (empty when none).

    Read from each layer's `output_shift` (no TensorFlow needed): a bundle converted before
    session 25 has them in its pooled `last_conv`, whose features then stop at 1.0 on the chip.
    """
    found: dict[str, int] = {}
    for layer in model.layers:
        if "output_shift" in layer.get_variable_names():
            low = int((np.asarray(layer.get_variable("output_shift")).astype(np.int64) < MIN_OUTPUT_SHIFT).sum())
            if low:
                found[layer.name] = low
    return found


def _layer_type(layer) -> str:
    return str(layer.parameters.layer_type).split(".")[-1]


def head_layers(model) -> tuple[object | None, object | None]:
    """The model's last Dense1D/FullyConnected layer and its last Dequantizer (None where absent)."""
    heads = [l for l in model.layers if _layer_type(l) in ("Dense1D", "FullyConnected")]
    deq = [l for l in model.layers if _layer_type(l) == "Dequantizer"]
    return (heads[-1] if heads else None), (deq[-1] if deq else None)


def backbone_depth(model) -> int:
    """How many layers come before the model's trailing head layers (HEAD_LAYER_TYPES)."""
    depth = len(model.layers)
    while depth and _layer_type(model.layers[depth - 1]) in HEAD_LAYER_TYPES:
        depth -= 1
    return depth


class AkidaRuntime:
    """A bundle's model on a device (or the software backend)."""

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        import akida

        self.bundle = bundle
        self.choice = choose_device(device)
        self.model = load_akida_model(bundle)
        # The backbone is the model's layers up to the head, built from the loaded model rather
        # than from a second read of the file (akida keeps every file-loaded model's memory).
        self.backbone = akida.Model(layers=self.model.layers[: backbone_depth(self.model)])
        self.head_layer, self.dequantizer = head_layers(self.model)
        if self.head_layer is None:
            raise RuntimeErrorQana(f"{bundle.model_path}: the model has no Dense1D/FullyConnected head layer")
        # Akida 2.0 Dense1D shifts each input channel left by input_shift to align per-channel
        # activation scales; the features handed to the head math include that shift so the
        # integer reference is exactly what the layer accumulates.
        names = self.head_layer.variables.names
        self._input_shift = self.head_layer.get_variable("input_shift").astype(np.int64) if "input_shift" in names else None
        if self.choice.device is not None:
            self.backbone.map(self.choice.device)
            self.model.map(self.choice.device)
        # class count -> (model, head layer, Dequantizer): see write_head
        self._models_by_classes: dict[int, tuple] = {self.num_classes: (self.model, self.head_layer, self.dequantizer)}

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

    def _prepared(self, images: np.ndarray) -> np.ndarray:
        """Checked images with the bundle's pixel preprocessing applied (qana.preprocess): the
        chip must see what the model was trained on, whoever decoded the images."""
        return preprocess(self._check_images(images), self.bundle.colour_constancy)

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Integer backbone features, shape (N, D): with a bundle's `test_time_views` > 1, the
        rounded mean over that many orientations of each image (qana.views)."""
        images = self._prepared(images)

        def one_view(batch: np.ndarray) -> np.ndarray:
            out = [self.backbone.forward(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)]
            return np.concatenate(out).reshape(len(batch), -1).astype(np.int32)

        if not len(images):
            return np.zeros((0, self.bundle.feature_dim), np.int32)
        feats = averaged_features(images, self.bundle.test_time_views, one_view)
        if self._input_shift is not None and np.any(self._input_shift):
            feats = feats << self._input_shift[None, :]
        return feats

    @property
    def num_classes(self) -> int:
        """Classes the model's head layer has now (more than the bundle's after class growth)."""
        return int(self.head_layer.get_variable("weights").shape[-1])

    def _grown_model(self, num_classes: int):
        """A new model: the backbone's layers and a head layer with `num_classes` outputs
        (class-incremental learning). `self` is not changed; `write_head` swaps it in once the
        new head's variables are all set.

        An Akida layer's output count is fixed, so a head that grew (or shrank) by a class
        needs a new layer of the same kind and bit widths (plus a new Dequantizer on Akida
        2.0). Per-input settings (Akida 2.0's `input_shift`) and the output rescaling are
        copied from the old layer, so the quantized head is stored exactly as before and
        `qana.head.quantized_logits` stays the reference.
        """
        import akida

        old = self.head_layer
        kind = _layer_type(old)
        params = old.parameters
        # From the backbone already loaded and checked, not a new read of model.fbz, which could
        # have changed on disk since. Each build keeps ~0.6 MB that akida never frees, so write_head
        # builds one per class count and reuses it.
        model = akida.Model(layers=self.backbone.layers)
        if kind == "Dense1D":
            for name in ("output_scales", "output_shift"):
                values = old.get_variable(name)
                if len(np.unique(values)) > 1:
                    raise RuntimeErrorQana(f"head layer {old.name}: per-class {name} cannot be carried over to a grown head")
            model.add(
                akida.Dense1D(
                    units=num_classes, output_bits=params.output_bits, buffer_bits=params.buffer_bits,
                    post_op_buffer_bits=params.post_op_buffer_bits, activation=params.activation,
                    weights_bits=params.weights_bits, name=old.name,
                )
            )
            new = model.layers[-1]
            new.set_variable("input_shift", old.get_variable("input_shift"))
            for name in ("output_scales", "output_shift"):
                template = new.get_variable(name)
                new.set_variable(name, np.full(template.shape, old.get_variable(name)[0], template.dtype))
            if self.dequantizer is not None:
                model.add(akida.Dequantizer(name=self.dequantizer.name))
        elif kind == "FullyConnected":
            model.add(
                akida.FullyConnected(
                    units=num_classes, name=old.name, weights_bits=params.weights_bits,
                    activation=params.activation, act_bits=params.act_bits,
                )
            )
        else:  # pragma: no cover - __init__ accepts only these two kinds
            raise RuntimeErrorQana(f"cannot rebuild a head layer of type {kind}")
        if self.choice.device is not None:
            model.map(self.choice.device)
        return model

    def _head_values(self, qhead: QuantizedHead) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Every value the head layer (and the Dequantizer's scales) will hold for `qhead`,
        checked before anything is written: a refused head leaves the chip's head as it was.

        The checks are the layer's own limits. akida stores a value before refusing it, numpy
        wraps a weight of 200 to -56 in int8, and a zero scale would make every logit 0; each of
        these used to surface after part of the head had been overwritten.
        """
        layer = self.head_layer
        layer_bits = int(layer.parameters.weights_bits)
        w = np.asarray(qhead.weights)
        if w.ndim != 2 or w.shape[0] != self.bundle.feature_dim or w.shape[1] < 1:
            raise RuntimeErrorQana(f"head weights {w.shape} do not fit the backbone's {self.bundle.feature_dim} features")
        classes = int(w.shape[1])
        if int(qhead.weight_bits) > layer_bits:
            raise RuntimeErrorQana(
                f"the head was quantized to {qhead.weight_bits}-bit weights but head layer {layer.name} takes {layer_bits} bits: "
                f"quantize it with weight_bits={layer_bits}"
            )
        if not (np.all(np.isfinite(w)) and np.array_equal(w, np.round(w))):
            raise RuntimeErrorQana("head weights must be integers (quantize the head with qana.head.quantize_head)")
        limit = (1 << (layer_bits - 1)) - 1
        if np.abs(w).max() > limit:
            raise RuntimeErrorQana(f"head weights reach {int(np.abs(w).max())}; the {layer_bits}-bit head layer {layer.name} holds at most +-{limit}")
        bias = np.asarray(qhead.bias)
        if bias.shape != (classes,):
            raise RuntimeErrorQana(f"head bias has shape {bias.shape}; {classes} classes need ({classes},)")
        if not (np.all(np.isfinite(bias)) and np.array_equal(bias, np.round(bias))):
            raise RuntimeErrorQana("head bias must be integers (quantize the head with qana.head.quantize_head)")
        scale = float(qhead.scale)
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(np.float32(1.0 / scale))):
            raise RuntimeErrorQana(f"head scale must be a finite number > 0, not {qhead.scale!r}")
        bias = bias.astype(np.int64)
        w = w.astype(np.int64)
        if _layer_type(layer) == "Dense1D":
            b_int, shift = split_bias_v2(bias)
            if not np.array_equal(b_int.astype(np.int64) << shift.astype(np.int64), bias):
                raise RuntimeErrorQana("head bias not representable as int8 << shift; quantize the head for target 'v2'")
            values = {"weights": w, "bias": b_int.astype(np.int8), "bias_shift": shift}
            return values, (np.full(classes, scale, np.float32) if self.dequantizer is not None else None)
        # FullyConnected (Akida 1.0): potential = f @ W - threshold; output / act_step
        low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max
        if np.any(-bias < low) or np.any(-bias > high):
            raise RuntimeErrorQana("head bias outside the int32 threshold range of the Akida 1.0 head layer; quantize the head for target 'v1'")
        return {"weights": w, "threshold": (-bias).astype(np.int32), "act_step": np.full(classes, 1.0 / scale, np.float32)}, None

    @staticmethod
    def _set_head(layer, dequantizer, values: dict[str, np.ndarray], scales: np.ndarray | None) -> None:
        for name, value in values.items():
            current = layer.get_variable(name)
            layer.set_variable(name, value.reshape(current.shape).astype(current.dtype))
        if scales is not None:
            dequantizer.set_variable("scales", scales)

    def write_head(self, qhead: QuantizedHead) -> None:
        """Store a quantized head in the Akida head layer (so on-chip predictions use it).

        A head with a different class count than the layer (a class was added) is written into
        a model whose head layer has that many outputs (`_grown_model`), swapped in only once it
        holds the whole head; the backbone is untouched. Each class count's model is built once
        and kept: akida never frees a model, so a shared runtime serving clinics with 7- and
        8-class heads in turn would otherwise grow with every switch. A head the layer cannot
        hold is refused (RuntimeErrorQana naming the field) and the previous head stays in place.
        """
        values, scales = self._head_values(qhead)
        classes = int(values["weights"].shape[1])
        known = self._models_by_classes.get(classes)
        if known is None:
            model = self._grown_model(classes)
            layer, dequantizer = head_layers(model)
            saved = None  # a new model: on failure it is simply not swapped in
        else:
            model, layer, dequantizer = known
            saved = {name: layer.get_variable(name) for name in values}, (dequantizer.get_variable("scales") if scales is not None else None)
        try:
            self._set_head(layer, dequantizer, values, scales)
        except (ValueError, RuntimeError) as exc:
            if saved is not None:
                self._set_head(layer, dequantizer, *saved)
            raise RuntimeErrorQana(f"akida refused the head ({exc}); the previous head is kept") from None
        self._models_by_classes[classes] = (model, layer, dequantizer)
        self.model, self.head_layer, self.dequantizer = model, layer, dequantizer

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits of the whole model as run by Akida, shape (N, C).

        With several test-time views the backbone runs once per view, the host averages the
        features and the head layer runs on the mean (`head_logits(features(images))`).
        """
        if self.bundle.test_time_views > 1:
            return self.head_logits(self.features(images, batch_size))  # features() prepares the images
        images = self._prepared(images)
        if not len(images):
            return np.zeros((0, self.num_classes), np.float32)
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

        features = np.asarray(features)
        feats = features.reshape(len(features), int(np.prod(features.shape[1:]))).astype(np.int64)  # not -1: 0 rows
        if feats.shape[1] != self.bundle.feature_dim:
            raise RuntimeErrorQana(f"features must be (N, {self.bundle.feature_dim}); got {features.shape}")
        if not len(feats):
            return np.zeros((0, self.num_classes), np.float32)
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
        x = feats.astype(np.int8 if signed else np.uint8).reshape(len(feats), 1, 1, feats.shape[1])
        out = [head.predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(out).reshape(len(x), -1)


_SHARED: dict[tuple[str, str], AkidaRuntime] = {}
_SHARED_LOCK = threading.Lock()


def shared_runtime(bundle: Bundle, device: str = "auto") -> AkidaRuntime:
    """One runtime per bundle id and device mode in this process, reused by later callers.

    akida 2.19.3 does not free a model loaded from a file: every `akida.Model(path)` keeps
    about the file's size (measured: +114 MB after 200 loads of the 594 kB v2 model;
    `gc.collect()` does not help). A process that handles many messages — a Ray worker of
    Flower's simulation engine handles thousands — would grow by gigabytes, while a
    SuperNode's ClientApp process handles one message and is not affected. Callers write
    their head before predicting (the head is the only state that changes) and must not use
    one runtime from two threads at once. Concurrent first calls wait for one load (a lock),
    so they share one runtime instead of each loading the model.
    """
    key = (bundle.bundle_id, device)
    with _SHARED_LOCK:
        runtime = _SHARED.get(key)
        if runtime is None:
            runtime = _SHARED[key] = AkidaRuntime(bundle, device)
    return runtime
