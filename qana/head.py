"""The projection head: the one implementation of its math, shared by client, server and simulation.

The backbone runs on Akida and emits integer features `f` (int8/uint8 activations; 1-bit for
the Akida 1.0 target). The head is a linear classifier on those integers:

    logits = f @ W + b            (float head, `Head`)

It is trained in floating point (softmax regression in numpy, so clinics need no TensorFlow)
and quantized for the chip (`QuantizedHead`):

    potential = f @ W_q + b_q     (integers: exactly what the Akida layer accumulates)
    logits    = potential * scale

with one per-tensor `scale`, so the arg-max of the integer potentials is the arg-max of the
logits (Akida 1.0 has no dequantizer; both targets then decide identically). `b_q` is restricted
to what the target can store: int8 << shift on Akida 2.0 `Dense1D`, an int32 threshold on
Akida 1.0 `FullyConnected`. `quantized_logits` is the reference the chip must agree with.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

TARGET_WEIGHT_BITS = {"v2": 8, "v1": 4}


@dataclass(frozen=True)
class Head:
    """Float head on integer features: logits = features @ weights + bias."""

    weights: np.ndarray  # (D, C) float32
    bias: np.ndarray  # (C,) float32
    classes: tuple[str, ...]
    feature_scale: float = 1.0  # typical magnitude of 1 feature unit, for well-conditioned training

    def __post_init__(self) -> None:
        w = _real_float32(self.weights, "weights")
        b = _real_float32(self.bias, "bias")
        if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[1] != len(self.classes):
            raise ValueError(
                f"inconsistent head: weights {w.shape}, bias {b.shape}, {len(self.classes)} classes"
            )
        if 0 in w.shape:  # quantize_head and grow/align (means over columns) would fail far from here
            raise ValueError(f"a head needs at least one feature and one class, not weights of shape {w.shape}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError("head contains NaN or Inf")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"head lists a class twice: {tuple(self.classes)}")
        odd = [c for c in self.classes if not isinstance(c, str)]
        if odd:  # (1, 2) would come back from head_to_npz as ("1", "2"): names match by string
            raise ValueError(f"class names must be strings, not {type(odd[0]).__name__} ({odd[0]!r})")
        if np.asarray(self.feature_scale).dtype.kind not in NUMBERS:  # float("0.5") would parse it
            raise ValueError(f"head feature_scale must be a real number, not {self.feature_scale!r}")
        scale = float(self.feature_scale)
        if not (np.isfinite(scale) and scale > 0):
            # training divides by it and multiplies features by it: 0, negative or NaN cannot be right
            raise ValueError(f"head feature_scale must be a finite number above 0, not {self.feature_scale}")
        object.__setattr__(self, "feature_scale", scale)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def num_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])


def _real_float32(values: np.ndarray, what: str) -> np.ndarray:
    """`values` as float32 (not copied if they already are); ValueError unless they are real numbers:
    numpy would drop a complex part with only a warning and parse numeric strings."""
    array = np.asarray(values)
    if array.dtype.kind not in NUMBERS:
        raise ValueError(f"head {what} must be real numbers, not {array.dtype}")
    return array.astype(np.float32, copy=False)


@dataclass(frozen=True)
class QuantizedHead:
    """Integer head as the Akida layer stores it."""

    weights: np.ndarray  # (D, C) int8, within +-(2**(bits-1) - 1)
    bias: np.ndarray  # (C,) int64, representable on the target
    scale: float  # logits = potential * scale
    weight_bits: int
    classes: tuple[str, ...]


def init_head(num_features: int, classes: Iterable[str], feature_scale: float = 1.0, seed: int = 0) -> Head:
    """Small random head (used when no trained head exists yet)."""
    classes = tuple(classes)
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.01, (num_features, len(classes))) * feature_scale  # small in scaled-feature units
    return Head(w.astype(np.float32), np.zeros(len(classes), np.float32), classes, feature_scale)


def logits(head: Head, features: np.ndarray) -> np.ndarray:
    """Float logits for integer features of shape (N, D) (any trailing 1x1 dims are flattened)."""
    f = _flatten(features, head.num_features).astype(np.float32)
    return f @ head.weights + head.bias


def _flatten(features: np.ndarray, num_features: int) -> np.ndarray:
    f = np.asarray(features)
    f = f.reshape(f.shape[0], int(np.prod(f.shape[1:])))  # not -1: numpy cannot infer it for 0 rows
    if f.shape[1] != num_features:
        raise ValueError(f"features have {f.shape[1]} dimensions, the head expects {num_features}")
    return f


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise class probabilities from logits (N, C), stable for large logits."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class TrainConfig:
    """Local head training settings (the round config from the server may override them)."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.01
    l2: float = 1e-4
    class_weighting: str = "balanced"  # "balanced" | "none"
    proximal_mu: float = 0.0  # FedProx: pull towards the weights the round started from
    # "train": every class's column learns (a class without local examples is pushed down);
    # "keep": columns of classes absent from these labels stay exactly as given (restricted
    # softmax, as FedRS): a clinic that never sees a class does not unlearn what others taught.
    absent_classes: str = "train"
    seed: int = 0
    extra: dict = field(default_factory=dict)


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "balanced") -> np.ndarray:
    """Per-class loss weights; 'balanced' = n / (k * count) over the classes present."""
    if mode == "none":
        return np.ones(num_classes, np.float32)
    if mode != "balanced":
        raise ValueError(f"unknown class weighting {mode!r} (use 'balanced' or 'none')")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)


def training_inputs(head: Head, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features as (N, D) rows, labels as int64 class indices), checked for training `head`.

    The one check of training data, for `train_head` and for the recipes that resample before it
    (`qana.learning.train_local_head`): it runs before anything casts the labels (1.7 would train
    class 1) or hands them to np.bincount or SMOTE (where -1, a stray 2e8 or a missing label fail
    with numpy's or sklearn's words, or allocate memory in proportion to the label). Features must
    be finite and keep their dtype: callers decide how to convert them.
    """
    x = _flatten(features, head.num_features)
    y = class_indices(labels, x.shape[0], head.num_classes)
    _check_finite(x)
    return x, y


def _check_finite(x: np.ndarray) -> None:
    """ValueError naming the rows with NaN or Inf: trained on, they give a NaN head, which would be
    reported as a broken head (and at a clinic as a too large learning rate) after the whole run."""
    if x.dtype.kind in "fc":  # integer features (the backbone's) are always finite
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if rows.size:
            raise ValueError(
                f"features contain NaN or Inf ({rows.size} row(s), first row {rows[0]}); they cannot train a head"
            )


def class_indices(labels: np.ndarray, num_rows: int, num_classes: int) -> np.ndarray:
    """`labels` as int64, or ValueError naming what makes them unusable as one class index per row
    (the one check every learner uses: gradient head, SMOTE, Akida edge learning)."""
    raw = np.asarray(labels)
    if raw.ndim != 1:  # (N, 1) would pass the row count and fail inside np.bincount
        raise ValueError(f"labels must be a 1-D array of class indices, not shape {raw.shape}")
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, not {raw.dtype}")  # 1.7 would train class 1
    if raw.shape[0] != num_rows:
        raise ValueError(f"{num_rows} feature rows but {raw.shape[0]} labels")
    if raw.size and (raw.min() < 0 or raw.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}); got {raw.min()}..{raw.max()}")
    return raw.astype(np.int64)


def train_head(head: Head, features: np.ndarray, labels: np.ndarray, config: TrainConfig | None = None) -> Head:
    """Softmax regression with Adam, weighted cross-entropy, L2 and an optional proximal term.

    Training runs on features multiplied by `feature_scale` so learning rates do not depend
    on the backbone's integer range; the result is mapped back to integer-feature units.
    """
    cfg = config or TrainConfig()
    if cfg.batch_size < 1 or cfg.epochs < 0:
        raise ValueError(f"batch_size must be at least 1 and epochs at least 0; got {cfg.batch_size} and {cfg.epochs}")
    x, labels = training_inputs(head, features, labels)
    x = x.astype(np.float32) * head.feature_scale
    if x.shape[0] == 0:
        return head
    k = head.feature_scale
    w = head.weights / k  # weights in scaled-feature units: (f * k) @ (W / k) == f @ W
    b = head.bias.copy()
    w0, b0 = w.copy(), b.copy()
    if cfg.absent_classes not in ("train", "keep"):
        raise ValueError(f"absent_classes must be 'train' or 'keep', not {cfg.absent_classes!r}")
    present = np.bincount(labels, minlength=head.num_classes) > 0
    frozen = ~present if cfg.absent_classes == "keep" else np.zeros(head.num_classes, bool)
    mask = np.where(frozen, -np.inf, 0.0).astype(np.float32)  # restricted softmax over the present classes
    cw = class_weights(labels, head.num_classes, cfg.class_weighting)
    onehot = np.eye(head.num_classes, dtype=np.float32)[labels]
    rng = np.random.default_rng(cfg.seed)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    n = x.shape[0]
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x[idx], onehot[idx]
            sw = cw[labels[idx]]
            p = softmax(xb @ w + b + mask)
            g = (p - yb) * sw[:, None] / max(sw.sum(), 1e-12)
            gw = xb.T @ g + cfg.l2 * w + cfg.proximal_mu * (w - w0)
            gb = g.sum(axis=0) + cfg.proximal_mu * (b - b0)
            gw[:, frozen] = 0.0
            gb[frozen] = 0.0
            step += 1
            for i, (param, grad) in enumerate(((w, gw), (b, gb))):
                m[i] = beta1 * m[i] + (1 - beta1) * grad
                v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
                mhat = m[i] / (1 - beta1**step)
                vhat = v[i] / (1 - beta2**step)
                param -= cfg.learning_rate * mhat / (np.sqrt(vhat) + eps)
    return replace(head, weights=(w * k).astype(np.float32), bias=b.astype(np.float32))


def split_bias_v2(bias_acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accumulator-domain biases -> (int8 mantissa, shift): Akida 2.0 Dense1D stores bias << shift.

    The shift is the smallest that brings the mantissa into int8; rounding happens here, so
    `mantissa << shift` is the bias the chip really adds (and what the reference must use).
    """
    bias_acc = np.asarray(bias_acc, dtype=np.int64)
    shift = np.zeros(bias_acc.shape, dtype=np.int64)
    while np.any(np.abs(bias_acc) / (1 << shift) > 127):
        shift += (np.abs(bias_acc) / (1 << shift) > 127).astype(np.int64)
    mantissa = np.clip(np.round(bias_acc / (1 << shift)), -128, 127).astype(np.int64)
    return mantissa.astype(np.int8), shift.astype(np.uint8)


def _encode_bias_v2(bias_acc: np.ndarray) -> np.ndarray:
    mantissa, shift = split_bias_v2(bias_acc)
    return mantissa.astype(np.int64) << shift.astype(np.int64)


def quantize_head(head: Head, target: str = "v2", weight_bits: int | None = None) -> QuantizedHead:
    """Per-tensor symmetric quantization of the weights; bias in the accumulator domain."""
    if target not in TARGET_WEIGHT_BITS:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGET_WEIGHT_BITS)}")
    bits = weight_bits or TARGET_WEIGHT_BITS[target]
    if not 2 <= bits <= 8:
        raise ValueError(f"head weights are stored in int8: weight_bits must be 2..8, not {bits}")
    qmax = 2 ** (bits - 1) - 1
    max_abs = float(np.abs(head.weights).max())
    if max_abs == 0:  # all-zero weights: let the bias set the scale, so biases stay distinct
        max_abs = float(np.abs(head.bias).max()) / 2**20 or float(qmax)
    scale = max_abs / qmax
    w_q = np.clip(np.round(head.weights / scale), -qmax, qmax).astype(np.int8)
    bias_acc = np.round(head.bias.astype(np.float64) / scale)
    limit = 2**31 - 1  # v1 stores an int32 threshold; v2's bias << shift is read back as int32 too
    # Checked on the stored value: v2's int8 << shift rounds (2**31 - 1 becomes 64 << 25 == 2**31).
    # Clipping just past the range first keeps the int64 cast from wrapping what is out of range.
    stored = np.clip(bias_acc, -(2**31), 2**31).astype(np.int64)
    stored = _encode_bias_v2(stored) if target == "v2" else stored
    if not np.all(np.abs(stored) <= limit):
        raise ValueError(
            f"head bias too large for its weights: bias/scale reaches {np.abs(bias_acc).max():.3g}, above the "
            f"chip's 32-bit range (weights at most {float(np.abs(head.weights).max()):.3g}, bias up to "
            f"{float(np.abs(head.bias).max()):.3g})"
        )
    return QuantizedHead(w_q, stored, float(scale), bits, head.classes)


def quantized_potentials(qhead: QuantizedHead, features: np.ndarray) -> np.ndarray:
    """Exact integer potentials the chip computes: features @ W_q + b_q."""
    f = _flatten(features, qhead.weights.shape[0]).astype(np.int64)
    return f @ qhead.weights.astype(np.int64) + qhead.bias


def quantized_logits(qhead: QuantizedHead, features: np.ndarray) -> np.ndarray:
    """Reference logits of the quantized head (what on-device predictions must agree with)."""
    return quantized_potentials(qhead, features).astype(np.float64) * qhead.scale


def dequantize(qhead: QuantizedHead, feature_scale: float = 1.0) -> Head:
    """The float head that the quantized one represents exactly."""
    return Head(
        qhead.weights.astype(np.float32) * qhead.scale,
        (qhead.bias.astype(np.float64) * qhead.scale).astype(np.float32),
        qhead.classes,
        feature_scale,
    )


def predict(head: Head | QuantizedHead, features: np.ndarray) -> np.ndarray:
    """Class indices."""
    z = quantized_potentials(head, features) if isinstance(head, QuantizedHead) else logits(head, features)
    return np.argmax(z, axis=1)


def grow_head(head: Head, classes: Iterable[str], seed: int = 0) -> Head:
    """Class-incremental growth: keep existing columns, append new classes in the given order.

    New columns start from the mean of the old ones (so a new class is not favoured before it
    has been learned) with a small random perturbation.
    """
    classes = tuple(classes)
    if classes[: head.num_classes] != head.classes:
        raise ValueError(f"new class list {classes} must start with the existing classes {head.classes}")
    extra = len(classes) - head.num_classes
    if extra == 0:
        return head
    rng = np.random.default_rng(seed)
    base_w = head.weights.mean(axis=1, keepdims=True)
    new_w = base_w + rng.normal(0, 1e-3, (head.num_features, extra)) * head.feature_scale
    new_b = np.full(extra, float(head.bias.mean()) - 1.0)
    return Head(
        np.concatenate([head.weights, new_w.astype(np.float32)], axis=1),
        np.concatenate([head.bias, new_b.astype(np.float32)]),
        classes,
        head.feature_scale,
    )


def select_classes(head: Head, classes: Sequence[str]) -> Head:
    """The head's columns of `classes`, in that order (every one must be a class of the head)."""
    classes = tuple(classes)  # iterated three times: a generator would leave an empty head
    missing = [c for c in classes if c not in head.classes]
    if missing:
        raise ValueError(f"the head has no class(es) {missing}; it has {head.classes}")
    idx = [head.classes.index(c) for c in classes]
    return Head(head.weights[:, idx], head.bias[idx], classes, head.feature_scale)


def align_heads(heads: Sequence[Head], base: Sequence[str] = ()) -> tuple[tuple[str, ...], list[Head]]:
    """Class-incremental alignment: every head re-laid onto one class list, columns matched by name.

    The class list is `base` (the federation's global order) followed by every class some head
    has and `base` lacks, in first-seen order (head by head, each head's own order). So a clinic
    that grew its head with `grow_head` keeps the global classes where they were and its new
    class lands after them, and every clinic receives the same order and shape.

    A head lacking a class gets that column as `grow_head` would start it (mean of the head's
    own columns, bias one below their mean, no noise): what a clinic that has never seen the
    class would predict with. `merge_aligned` does not average such filled columns in; a
    clinic without a class contributes no weight to it.

    Heads must agree on the feature dimension and feature scale (one backbone); a head with
    duplicate class names is refused (columns could not be matched by name).
    """
    if not heads:
        raise ValueError("no heads to align")
    first = heads[0]
    base = tuple(base)  # iterated twice: an iterator would look like a list of duplicates
    classes: list[str] = list(dict.fromkeys(base))
    if len(classes) != len(base):
        raise ValueError(f"duplicate class names in the global order {base}")
    for i, head in enumerate(heads):
        if len(set(head.classes)) != head.num_classes:
            raise ValueError(f"head {i} lists a class twice: {head.classes}")
        if head.num_features != first.num_features or head.feature_scale != first.feature_scale:
            raise ValueError(
                f"head {i} has {head.num_features} features (scale {head.feature_scale}), head 0 has "
                f"{first.num_features} (scale {first.feature_scale}): heads of different backbones cannot be merged"
            )
        classes.extend(c for c in head.classes if c not in classes)
    order = tuple(classes)
    aligned = []
    for head in heads:
        column = {c: j for j, c in enumerate(head.classes)}
        fill_w = head.weights.mean(axis=1)
        fill_b = float(head.bias.mean()) - 1.0
        w = np.stack([head.weights[:, column[c]] if c in column else fill_w for c in order], axis=1)
        b = np.array([head.bias[column[c]] if c in column else fill_b for c in order], dtype=np.float32)
        aligned.append(Head(w, b, order, head.feature_scale))
    return order, aligned


def merge_aligned(heads: Sequence[Head], weights: Sequence[float], base: Sequence[str] = ()) -> Head:
    """Weighted average of heads whose class sets may differ, per class column.

    Column c is the average over the heads that have class c, weighted by `weights` (their
    number of training examples, as in FedAvg) renormalised over those heads. With equal class
    sets this is exactly FedAvg of the heads. Caveat: softmax columns are only defined up to a
    shift common to all columns of one head; columns averaged over different sets of clinics
    mix those shifts. L2 regularisation keeps every head near the same (zero-mean) gauge, so
    the effect is small, but a new class known to one clinic carries that clinic's offset.
    """
    if len(heads) != len(weights):
        raise ValueError(f"{len(heads)} heads but {len(weights)} weights")
    weight = np.asarray(weights, dtype=np.float64)
    # a sum of inf (1e308 + 1e308) would make every share 0: an all-zero head, silently
    if not np.all(np.isfinite(weight)) or np.any(weight < 0) or not 0 < weight.sum() < np.inf:
        raise ValueError(f"weights must be non-negative, finite, with a finite sum and not all zero: {list(weights)}")
    classes, aligned = align_heads(heads, base)
    has = np.array([[c in head.classes for c in classes] for head in heads], dtype=np.float64)  # (H, C)
    per_column = has * weight[:, None]
    total = per_column.sum(axis=0)
    if np.any(total <= 0):
        missing = [c for c, t in zip(classes, total) if t <= 0]
        raise ValueError(f"no head with positive weight has class(es) {missing}")
    share = per_column / total  # (H, C), columns sum to 1
    w = sum(share[i][None, :] * aligned[i].weights.astype(np.float64) for i in range(len(heads)))
    b = sum(share[i] * aligned[i].bias.astype(np.float64) for i in range(len(heads)))
    return Head(np.asarray(w, np.float32), np.asarray(b, np.float32), classes, heads[0].feature_scale)


def head_to_npz(head: Head) -> bytes:
    """Serialise a head (for bundles and the audit log's artefact store)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        weights=head.weights,
        bias=head.bias,
        classes=np.array(head.classes),
        feature_scale=np.array(head.feature_scale, dtype=np.float64),
    )
    return buf.getvalue()


def head_from_npz(data: bytes) -> Head:
    """Inverse of head_to_npz, with a clear error for a file that is not a head."""
    return read_npz(data, "head", _head_in)


def _head_in(archive: np.lib.npyio.NpzFile) -> Head:
    weights, bias, classes = array_in(archive, "weights"), array_in(archive, "bias"), names_in(archive, "classes")
    return Head(weights, bias, classes, float(array_in(archive, "feature_scale")))


# What reading a damaged or foreign .npz raises: EOFError when empty, BadZipFile when truncated,
# KeyError for a member the archive lacks, TypeError for float() of an array of several values,
# zipfile's RuntimeError for an encrypted member and NotImplementedError (a RuntimeError) for an
# unknown version or flag, zlib.error for a broken deflate stream. MemoryError and OverflowError
# stay as a last guard behind the size checks of open_npz and array_in.
NPZ_ERRORS = (
    KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile,
    RuntimeError, zlib.error, MemoryError, OverflowError,
)
NUMBERS = "fiu"  # dtype kinds of real numbers: complex would lose its imaginary part, strings would be parsed
NAMES = "U"  # unicode strings: bytes ('S') would be read as "b'nv'", numbers as "1"
_MEANING = {NUMBERS: "real numbers", NAMES: "names (strings)"}
_NPY_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data further: a larger uncompressed size is a lie

_Read = TypeVar("_Read")


def read_npz(data: bytes, what: str, build: Callable[[np.lib.npyio.NpzFile], _Read]) -> _Read:
    """`build(archive)` on the .npz archive in `data`, with every way a damaged or foreign file fails
    turned into ValueError("not a valid <what> file: <reason>"): callers catch ValueError to name the
    file (a deployed head, a bundle's files), anything else stopped a clinic or server with a traceback.
    `build` reads arrays with `array_in` / `names_in`, which check them before numpy allocates them."""
    try:
        with open_npz(data) as archive:
            return build(archive)
    except NPZ_ERRORS as exc:  # str(): an exception is always true, zipfile raises a bare EOFError()
        raise ValueError(f"not a valid {what} file: {str(exc) or type(exc).__name__}") from None


def open_npz(data: bytes) -> np.lib.npyio.NpzFile:
    """The .npz archive in `data`; ValueError for a single array (.npy), which np.load would read in
    full, and for a member whose claimed sizes the file cannot hold (checked before anything is read)."""
    single = ValueError("a single array (.npy), not an .npz archive")
    if data.startswith(np.lib.format.MAGIC_PREFIX):  # before np.load allocates what its header claims
        raise single
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise single
    try:
        for info in loaded.zip.infolist():
            _check_member(info, len(data))
    except ValueError:
        loaded.close()
        raise
    return loaded


def _check_member(info: zipfile.ZipInfo, archive_size: int) -> None:
    """ValueError unless the member's sizes can be true of an `archive_size`-byte file written as numpy
    writes (stored or deflated): its uncompressed size then bounds what `array_in` lets numpy allocate."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = info.compress_type
        raise ValueError(f"{info.filename!r} uses compression method {method}, not stored or deflated as numpy writes")
    most = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO)
    if info.header_offset + info.compress_size > archive_size or info.file_size > most:
        raise ValueError(
            f"{info.filename!r} claims {info.file_size} bytes ({info.compress_size} compressed), "
            f"more than a {archive_size}-byte file can hold"
        )


def array_in(archive: np.lib.npyio.NpzFile, key: str, kinds: str = NUMBERS) -> np.ndarray:
    """Array `key` of an .npz archive, read only once its .npy header has passed two checks: a dtype
    of `kinds` (NUMBERS or NAMES), and no more data than the member holds, so a damaged header in a
    1 KB file cannot make numpy allocate the terabytes it claims."""
    name = f"{key}.npy"
    if name not in archive.zip.namelist():
        raise ValueError(f"it has no array {key!r}")
    info = archive.zip.getinfo(name)
    with archive.zip.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version not in _NPY_HEADER:
            raise ValueError(f"{key!r} is in .npy format {version[0]}.{version[1]}, not 1.0 or 2.0 as numpy writes arrays")
        shape, _, dtype = _NPY_HEADER[version](member)
        if dtype.kind not in kinds:
            raise ValueError(f"{key!r} must be {_MEANING[kinds]}, not {dtype}")
        size, held = math.prod(shape) * dtype.itemsize, info.file_size - member.tell()
    if size > held:
        raise ValueError(f"{key!r} claims shape {shape} of {dtype}: {size} bytes, but its file holds {held}")
    return archive[name]  # by member name: a member called plain `key` would be read instead


def names_in(archive: np.lib.npyio.NpzFile, key: str) -> tuple[str, ...]:
    """A list of names stored in an .npz archive; ValueError unless it is a one-dimensional array of strings."""
    names = array_in(archive, key, NAMES)
    if names.ndim != 1:
        raise ValueError(f"{key!r} must be a list of names, not an array of shape {names.shape}")
    return tuple(str(n) for n in names)
