"""Everything that crosses the wire between coordinator and clinics, and its validation.

One module defines every Flower message QANA-FL sends: message types, record names, array
names with dtype and shape, config keys, metric keys and the protocol version. The ServerApp
builds and checks messages with it, the ClientApp does the same, so a mismatch is a
`ProtocolError` with a one-line reason instead of a silent mis-aggregation.

What may cross the wire (and nothing else; `validate_*` refuse unknown records and keys):

  coordinator -> clinic
    query.hello   config{protocol-version, bundle-id}
    query.deploy  config{protocol-version, bundle-id} + bundle{bundle-id, data=<packed bundle>}
                  (only to clinics whose hello said they lack that bundle id)
    train         arrays{weights f32 (D,C), bias f32 (C,)} + config{round settings, classes}
    evaluate      arrays{weights, bias} + config{protocol-version, bundle-id, server-round, head-sha256, classes}

  clinic -> coordinator
    query.hello   clinic{protocol-version, clinic-id, cached-bundles, device}
    query.deploy  clinic{protocol-version, clinic-id, bundle-id, device}
    train         head{weights-q int8 (D,C'), bias-q int32 (C',), scale f32 (1,)}
                  + metrics{num-examples, ...} + clinic{protocol-version, clinic-id, bundle-id, classes}
    evaluate      metrics{num-examples, top1, ...} + clinic{protocol-version, clinic-id, bundle-id, head-sha256}

Classes. The global head's class list travels with every train and evaluate instruction
(`classes`, in column order), so the class set is the run's state, not the bundle's: a
federation may start with fewer classes than the backbone was trained on and grow. A train
reply names its head's classes: the instruction's list, in the same order, optionally
followed by classes the clinic introduces (class-incremental learning, `--new-class`); the
coordinator merges heads whose class lists differ by class name
(`server.class_incremental`).

Clinics never send images, features, per-sample labels or predictions: the only arrays a
clinic sends are the quantized head, and metrics are aggregates.

Units. The global head travels as floats in *scaled-feature units* (the head on features x
feature_scale, i.e. weights / feature_scale; see `qana.head.Head.feature_scale`), the space
local training works in, so server-side
optimisers (FedAdam's eta, ...) see well-conditioned numbers. A clinic's update travels as
the head the Akida chip stores: int8 weights, integer bias and one float scale
(`qana.head.QuantizedHead`), which is the tight encoding (weight bits / 8 bytes per weight
for the v2 target). The coordinator dequantizes each update back to scaled-feature floats
before Flower's strategy aggregates it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from qana.head import TARGET_WEIGHT_BITS, Head, QuantizedHead

PROTOCOL_VERSION = 2  # 2: class lists travel with heads (class-incremental rounds)

# Flower message types ("<category>.<action>"; categories train/evaluate/query are Flower's).
MSG_HELLO = "query.hello"
MSG_DEPLOY = "query.deploy"
MSG_TRAIN = "train"
MSG_EVALUATE = "evaluate"

# Record names.
REC_ARRAYS = "arrays"  # global head (Flower strategies' default `arrayrecord_key`)
REC_CONFIG = "config"  # instructions (Flower strategies' default `configrecord_key`)
REC_BUNDLE = "bundle"  # packed bundle, deploy only
REC_HEAD = "head"  # a clinic's quantized head update
REC_METRICS = "metrics"
REC_CLINIC = "clinic"  # who answered, for which bundle

# Array names.
ARR_WEIGHTS = "weights"
ARR_BIAS = "bias"
ARR_WEIGHTS_Q = "weights-q"
ARR_BIAS_Q = "bias-q"
ARR_SCALE = "scale"

# Config keys.
K_PROTOCOL = "protocol-version"
K_BUNDLE_ID = "bundle-id"
K_BUNDLE_DATA = "data"
K_ROUND = "server-round"  # injected by Flower's strategies
K_HEAD_ID = "head-sha256"
K_EPOCHS = "local-epochs"
K_LR = "learning-rate"
K_BATCH = "batch-size"
K_L2 = "l2"
K_SMOTE = "smote"
K_SEED = "seed"
K_ABSENT = "absent-classes"  # keep | train: how local training treats classes without local images
K_PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx
K_CLINIC_ID = "clinic-id"
K_CACHED = "cached-bundles"
K_DEVICE = "device"
K_CLASSES = "classes"  # the head's class names in column order

# Metric keys.
M_NUM_EXAMPLES = "num-examples"  # Flower strategies' default `weighted_by_key`
M_TRAIN_TOP1 = "train-top1"
M_NUM_SYNTHETIC = "num-synthetic"
M_DEVICE_AGREEMENT = "device-agreement"
M_TOP1 = "top1"
M_MACRO_F1 = "macro-f1"
M_BALANCED_ACCURACY = "balanced-accuracy"

TRAIN_METRICS = (M_NUM_EXAMPLES, M_TRAIN_TOP1, M_NUM_SYNTHETIC, M_DEVICE_AGREEMENT)
EVALUATE_METRICS = (M_NUM_EXAMPLES, M_TOP1, M_MACRO_F1, M_BALANCED_ACCURACY, M_DEVICE_AGREEMENT)
TRAIN_SETTINGS = (K_EPOCHS, K_LR, K_BATCH, K_L2, K_SMOTE, K_SEED, K_ABSENT)
ABSENT_CLASSES = ("keep", "train")

BIAS_Q_DTYPE = np.dtype(np.int32)
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
MAX_CLASSES = 1000
MAX_NEW_CLASSES = 16  # classes one reply may add in one round
# Most labelled images one clinic may report. The strategies weight each head by this self-reported
# count, so it is bounded: the whole HAM10000 release is 10,015 images and the ISIC archive under
# half a million. A clinic lying below the cap can still outweigh others: `--strategy fedmedian`,
# `fedtrimmedavg` and `krum` combine heads without the counts.
MAX_NUM_EXAMPLES = 1_000_000
# Largest |value| a dequantized head may hold (weights per unit of scaled feature, and bias). Learned
# heads stay below 1 (the shipped v2 and v1 heads: 0.57 and 0.44); anything near this bound only
# saturates the softmax, and weighting it by MAX_NUM_EXAMPLES still stays finite in float32.
MAX_HEAD_VALUE = 1e3
MAX_ROUND = 1_000_000
MAX_SEED = 2**31 - 1
MAX_LEARNING_RATE = 10.0  # the coordinator's --learning-rate range ends here too
MIN_LEARNING_RATE = 1e-9  # the coordinator's and qana-sim's lower end (the protocol takes any rate > 0)
MAX_LOCAL_EPOCHS = 1000
MAX_BATCH_SIZE = 1 << 16
# Largest l2 and proximal-mu a train instruction may carry. Local training takes Adam steps,
# whose size does not grow with these strengths, so anything above ~1 already just holds the
# head at zero (l2) or at the global head (proximal-mu). Far larger values make the float32
# gradient or its square overflow (from about 1e16 for a head near MAX_HEAD_VALUE; 1e300 does
# it for any head) and the trained head comes out NaN: the bound is generous but far from that.
MAX_REGULARISATION = 1e6
CLASS_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+")


class ProtocolError(ValueError):
    """A message does not match the QANA-FL protocol; the message says exactly how."""


@dataclass(frozen=True)
class HeadSpec:
    """The shape every head in a run must have: D features, C classes, target bit width."""

    num_features: int
    num_classes: int
    target: str
    feature_scale: float
    classes: tuple[str, ...]

    @property
    def weight_bits(self) -> int:
        return TARGET_WEIGHT_BITS[self.target]

    @property
    def num_parameters(self) -> int:
        return self.num_features * self.num_classes + self.num_classes

    @property
    def lower_bound_bytes(self) -> float:
        """Information lower bound of one update: parameters x weight bits / 8."""
        return self.num_parameters * self.weight_bits / 8

    def with_classes(self, classes: tuple[str, ...]) -> HeadSpec:
        """The same backbone's head with another class list (the run's current one)."""
        return HeadSpec(self.num_features, len(classes), self.target, self.feature_scale, tuple(classes))

    @classmethod
    def from_head(cls, head: Head, target: str) -> HeadSpec:
        if target not in TARGET_WEIGHT_BITS:
            raise ProtocolError(f"unknown target {target!r}")
        return cls(head.num_features, head.num_classes, target, float(head.feature_scale), head.classes)


@dataclass(frozen=True)
class ClinicInfo:
    """The `clinic` record of a reply."""

    clinic_id: str
    protocol_version: int
    bundle_id: str | None = None
    cached_bundles: tuple[str, ...] = ()
    device: str = ""
    head_id: str | None = None
    classes: tuple[str, ...] = ()  # train replies: the classes of the head sent


@dataclass(frozen=True)
class TrainSettings:
    """Local-training instructions of one round (what the clinic may not choose itself)."""

    server_round: int
    bundle_id: str
    head_id: str
    local_epochs: int = 20
    learning_rate: float = 0.01
    batch_size: int = 64
    l2: float = 1e-4
    smote: bool = True
    seed: int = 0
    proximal_mu: float = 0.0
    classes: tuple[str, ...] = ()  # the global head's classes (column order)
    absent_classes: str = "keep"  # qana.head.TrainConfig.absent_classes

    def to_config(self) -> ConfigRecord:
        """The round config (without server-round and proximal-mu, which Flower's strategies add)."""
        return ConfigRecord(
            {
                K_PROTOCOL: PROTOCOL_VERSION,
                K_BUNDLE_ID: self.bundle_id,
                K_HEAD_ID: self.head_id,
                K_CLASSES: list(check_class_list(self.classes, "train settings")),
                K_EPOCHS: int(self.local_epochs),
                K_LR: float(self.learning_rate),
                K_BATCH: int(self.batch_size),
                K_L2: float(self.l2),
                K_SMOTE: bool(self.smote),
                K_SEED: int(self.seed),
                K_ABSENT: str(self.absent_classes),
            }
        )


@dataclass(frozen=True)
class EvaluateSettings:
    server_round: int
    bundle_id: str
    head_id: str
    classes: tuple[str, ...] = ()

    def to_config(self) -> ConfigRecord:
        return ConfigRecord(
            {
                K_PROTOCOL: PROTOCOL_VERSION,
                K_BUNDLE_ID: self.bundle_id,
                K_HEAD_ID: self.head_id,
                K_CLASSES: list(check_class_list(self.classes, "evaluate settings")),
            }
        )


# --------------------------------------------------------------------------- helpers


def check_class_list(classes: Any, what: str) -> tuple[str, ...]:
    """A head's class list: 1..MAX_CLASSES distinct short names of letters, digits and _.-+"""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
        raise ProtocolError(f"{what}: classes must be a list of class names, got {type(classes).__name__}")
    if not 0 < len(classes) <= MAX_CLASSES:
        raise ProtocolError(f"{what}: {len(classes)} classes; a head has 1 to {MAX_CLASSES}")
    for name in classes:
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= CLASS_NAME_CHARS:
            raise ProtocolError(
                f"{what}: class name {name!r} must be 1-64 letters, digits or _.-+ (as in the metadata's dx column)"
            )
    if len(set(classes)) != len(classes):
        dupes = sorted({c for c in classes if list(classes).count(c) > 1})
        raise ProtocolError(f"{what}: class(es) listed twice: {', '.join(dupes)}")
    return tuple(classes)


def _records(content: RecordDict, what: str, expected: Mapping[str, type]) -> None:
    """Exactly the expected records, each of the expected kind."""
    names = set(content.keys())
    unknown = sorted(names - set(expected))
    if unknown:
        raise ProtocolError(f"{what} carries record(s) the protocol does not allow: {', '.join(unknown)}")
    missing = sorted(set(expected) - names)
    if missing:
        raise ProtocolError(f"{what} lacks record(s) {', '.join(missing)}")
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            raise ProtocolError(f"{what}: record {name!r} must be a {kind.__name__}, got {type(content[name]).__name__}")


def _keys(record: Mapping[str, Any], what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    keys = set(record.keys())
    unknown = sorted(keys - set(required) - set(optional))
    if unknown:
        raise ProtocolError(f"{what} has key(s) the protocol does not allow: {', '.join(unknown)}")
    missing = [k for k in required if k not in keys]
    if missing:
        raise ProtocolError(f"{what} lacks key(s) {', '.join(missing)}")


def _typed(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = record[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError(f"{what}: {key!r} must be a number, got a bool")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(f"{what}: {key!r} must be {name}, got {type(value).__name__}")
    return value


def _protocol(record: Mapping[str, Any], what: str) -> int:
    version = _typed(record, K_PROTOCOL, int, what)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol version {version}, this side speaks {PROTOCOL_VERSION}; upgrade qana-fl")
    return version


def _array(record: ArrayRecord, name: str, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = record[name]
    if not isinstance(arr, Array):
        raise ProtocolError(f"{what}: {name!r} is not an Array")
    if arr.stype != "numpy.ndarray":
        raise ProtocolError(f"{what}: {name!r} has serialisation {arr.stype!r}, expected numpy.ndarray")
    try:
        declared = np.dtype(arr.dtype)
    except (TypeError, ValueError):  # a free string from the wire, e.g. "int9"
        raise ProtocolError(f"{what}: {name!r} has unknown dtype {arr.dtype!r}, expected {dtype.name}") from None
    if declared != dtype:
        raise ProtocolError(f"{what}: {name!r} has dtype {arr.dtype}, expected {dtype.name}")
    if tuple(arr.shape) != shape:
        raise ProtocolError(f"{what}: {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    try:
        value = arr.numpy()
    except Exception as exc:  # noqa: BLE001  numpy's .npy reader fails on untrusted bytes in many ways
        # (ValueError, EOFError for no data, tokenize.TokenError for a broken header, ...): every one
        # is one clinic's bad update, which is rejected; it must never stop the round for the others.
        reason = str(exc) or type(exc).__name__
        raise ProtocolError(f"{what}: {name!r} cannot be decoded ({reason})") from None
    if value.dtype != dtype or value.shape != shape:
        raise ProtocolError(f"{what}: {name!r} decodes to {value.dtype} {value.shape}, not its declared {dtype.name} {shape}")
    return value


def _finite(value: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise ProtocolError(f"{what}: {name!r} contains {bad} NaN/Inf value(s)")


def _within_head_bound(values: np.ndarray, name: str, what: str, how: str = "") -> None:
    """Every head that enters or leaves aggregation is held to MAX_HEAD_VALUE (finite values only)."""
    largest = float(np.abs(values).max(initial=0.0))
    if largest > MAX_HEAD_VALUE:
        raise ProtocolError(f"{what}: {name!r} reaches {largest:.3g}{how}; a head's values must stay within {MAX_HEAD_VALUE:g}")


def _clinic_id(record: Mapping[str, Any], what: str) -> str:
    clinic = _typed(record, K_CLINIC_ID, str, what)
    if not clinic.strip() or len(clinic) > 200:
        raise ProtocolError(f"{what}: clinic-id must be a non-empty name of at most 200 characters")
    return clinic


def _metrics(record: MetricRecord, what: str, required: tuple[str, ...]) -> dict[str, float]:
    # every key is required: Flower's strategies refuse to aggregate replies whose metric keys
    # differ, so one reply with fewer metrics would stop the round for every clinic
    _keys(record, what, required)
    out: dict[str, float] = {}
    for key in record.keys():
        value = record[key]
        if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{what}: metric {key!r} must be a single number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ProtocolError(f"{what}: metric {key!r} is {value}")
        out[key] = value
    n = record[M_NUM_EXAMPLES]
    if not isinstance(n, int) or n <= 0:
        raise ProtocolError(f"{what}: num-examples must be a positive integer, got {n!r}")
    if n > MAX_NUM_EXAMPLES:
        raise ProtocolError(f"{what}: num-examples={n} is more than the {MAX_NUM_EXAMPLES:,} images one clinic may report")
    for key in (M_TOP1, M_MACRO_F1, M_BALANCED_ACCURACY, M_DEVICE_AGREEMENT, M_TRAIN_TOP1):
        if key in out and not 0.0 <= out[key] <= 1.0:
            raise ProtocolError(f"{what}: metric {key!r}={out[key]} is outside [0, 1]")
    return out


# --------------------------------------------------------------------------- head encodings


def global_head_record(head: Head) -> ArrayRecord:
    """The global head as it travels to clinics and through Flower's strategies."""
    return ArrayRecord(
        {
            ARR_WEIGHTS: Array(np.ascontiguousarray(head.weights / np.float32(head.feature_scale), dtype=np.float32)),
            ARR_BIAS: Array(np.ascontiguousarray(head.bias, dtype=np.float32)),
        }
    )


def head_from_global_record(record: ArrayRecord, spec: HeadSpec, what: str = "global head") -> Head:
    """Inverse of `global_head_record`, checked against the run's head shape."""
    _keys(record, what, (ARR_WEIGHTS, ARR_BIAS))
    weights = _array(record, ARR_WEIGHTS, np.dtype(np.float32), (spec.num_features, spec.num_classes), what)
    bias = _array(record, ARR_BIAS, np.dtype(np.float32), (spec.num_classes,), what)
    return _head_from_scaled(weights, bias, spec, what)


def head_from_aggregate(record: ArrayRecord, spec: HeadSpec) -> Head:
    """The head a Flower strategy aggregated (some return float64, e.g. FedAdam), checked."""
    what = "aggregated head"
    _keys(record, what, (ARR_WEIGHTS, ARR_BIAS))
    arrays = {}
    for name, shape in ((ARR_WEIGHTS, (spec.num_features, spec.num_classes)), (ARR_BIAS, (spec.num_classes,))):
        dtype = np.dtype(record[name].dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ProtocolError(f"{what}: {name!r} has dtype {dtype}, expected a float")
        arrays[name] = _array(record, name, dtype, shape, what).astype(np.float32)
    return _head_from_scaled(arrays[ARR_WEIGHTS], arrays[ARR_BIAS], spec, what)


def _head_from_scaled(weights: np.ndarray, bias: np.ndarray, spec: HeadSpec, what: str) -> Head:
    # the bound every clinic's update is held to (dequantized_record), in the same units: a
    # finite but huge head would otherwise train into NaN and fail without naming the message
    for name, values in ((ARR_WEIGHTS, weights), (ARR_BIAS, bias)):
        _finite(values, name, what)
        _within_head_bound(values, name, what)
    return Head(weights * np.float32(spec.feature_scale), bias, spec.classes, spec.feature_scale)


def update_record(qhead: QuantizedHead) -> ArrayRecord:
    """A clinic's update: the quantized head exactly as the Akida layer stores it."""
    if np.abs(qhead.bias).max(initial=0) > np.iinfo(BIAS_Q_DTYPE).max:
        raise ProtocolError("quantized bias does not fit int32")
    return ArrayRecord(
        {
            ARR_WEIGHTS_Q: Array(np.ascontiguousarray(qhead.weights, dtype=np.int8)),
            ARR_BIAS_Q: Array(np.ascontiguousarray(qhead.bias, dtype=BIAS_Q_DTYPE)),
            ARR_SCALE: Array(np.array([qhead.scale], dtype=np.float32)),
        }
    )


def quantized_from_update(record: ArrayRecord, spec: HeadSpec, what: str = "update") -> QuantizedHead:
    """Decode and check a clinic's update (shape, dtype, range, finiteness)."""
    _keys(record, what, (ARR_WEIGHTS_Q, ARR_BIAS_Q, ARR_SCALE))
    d, c = spec.num_features, spec.num_classes
    w = _array(record, ARR_WEIGHTS_Q, np.dtype(np.int8), (d, c), what)
    b = _array(record, ARR_BIAS_Q, BIAS_Q_DTYPE, (c,), what)
    s = _array(record, ARR_SCALE, np.dtype(np.float32), (1,), what)
    _finite(s, ARR_SCALE, what)
    scale = float(s[0])
    if not scale > 0:
        raise ProtocolError(f"{what}: scale must be positive, got {scale}")
    qmax = 2 ** (spec.weight_bits - 1) - 1
    if np.abs(w.astype(np.int16)).max(initial=0) > qmax:
        raise ProtocolError(f"{what}: weights exceed the {spec.weight_bits}-bit range of target {spec.target}")
    return QuantizedHead(w, b.astype(np.int64), scale, spec.weight_bits, spec.classes)


def dequantized_record(qhead: QuantizedHead, spec: HeadSpec) -> ArrayRecord:
    """What Flower's strategy aggregates for one update: scaled-feature float32 arrays.

    Refuses values beyond MAX_HEAD_VALUE (checked in float64, before the float32 cast could turn
    a large finite scale into Inf), so one clinic's reply cannot break the aggregate or the run.
    """
    weights = qhead.weights.astype(np.float64) * qhead.scale / spec.feature_scale
    bias = qhead.bias.astype(np.float64) * qhead.scale
    for name, values in ((ARR_WEIGHTS, weights), (ARR_BIAS, bias)):
        if not np.isfinite(values).all():
            raise ProtocolError(f"update: {name!r} overflows when dequantized (scale {qhead.scale:g} too large)")
        _within_head_bound(values, name, "update", f" when dequantized (scale {qhead.scale:g})")
    return ArrayRecord(
        {ARR_WEIGHTS: Array(weights.astype(np.float32)), ARR_BIAS: Array(bias.astype(np.float32))}
    )


# --------------------------------------------------------------------------- server -> clinic


def hello_content(bundle_id: str) -> RecordDict:
    return RecordDict({REC_CONFIG: ConfigRecord({K_PROTOCOL: PROTOCOL_VERSION, K_BUNDLE_ID: bundle_id})})


def deploy_content(bundle_id: str, packed: bytes) -> RecordDict:
    return RecordDict(
        {
            REC_CONFIG: ConfigRecord({K_PROTOCOL: PROTOCOL_VERSION, K_BUNDLE_ID: bundle_id}),
            REC_BUNDLE: ConfigRecord({K_BUNDLE_ID: bundle_id, K_BUNDLE_DATA: packed}),
        }
    )


def validate_hello_ins(content: RecordDict) -> str:
    """Clinic side: the bundle id the coordinator will use."""
    what = "hello instruction"
    _records(content, what, {REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID))
    _protocol(cfg, what)
    return _bundle_id(cfg, what)


def _sha256(cfg: Mapping[str, Any], key: str, what: str) -> str:
    value = _typed(cfg, key, str, what)
    if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise ProtocolError(f"{what}: {key} must be a sha256 hex digest, got {value[:20]!r}")
    return value


def _bundle_id(cfg: Mapping[str, Any], what: str) -> str:
    return _sha256(cfg, K_BUNDLE_ID, what)


def validate_deploy_ins(content: RecordDict) -> tuple[str, bytes]:
    """Clinic side: (bundle id, packed bundle bytes)."""
    what = "deploy instruction"
    _records(content, what, {REC_CONFIG: ConfigRecord, REC_BUNDLE: ConfigRecord})
    cfg, bundle = content[REC_CONFIG], content[REC_BUNDLE]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID))
    _protocol(cfg, what)
    _keys(bundle, what + " bundle", (K_BUNDLE_ID, K_BUNDLE_DATA))
    bundle_id = _bundle_id(cfg, what)
    if _bundle_id(bundle, what) != bundle_id:
        raise ProtocolError(f"{what}: the bundle record and the config name different bundles")
    data = _typed(bundle, K_BUNDLE_DATA, bytes, what)
    if not data or len(data) > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"{what}: packed bundle of {len(data)} bytes is empty or too large")
    return bundle_id, data


def _with_classes_of(head: Head, settings: Any) -> Any:
    """Settings naming the head's classes (filled in when the caller left them empty)."""
    if not settings.classes:
        return replace(settings, classes=tuple(head.classes))
    if tuple(settings.classes) != tuple(head.classes):
        raise ProtocolError(f"settings name classes {list(settings.classes)}, the head has {list(head.classes)}")
    return settings


def train_content(head: Head, settings: TrainSettings) -> RecordDict:
    """What Flower's strategies would build, for tests and tools that bypass a strategy."""
    settings = _with_classes_of(head, settings)
    config = settings.to_config()
    config[K_ROUND] = settings.server_round
    if settings.proximal_mu:
        config[K_PROXIMAL_MU] = settings.proximal_mu
    return RecordDict({REC_ARRAYS: global_head_record(head), REC_CONFIG: config})


def check_round(server_round: int, what: str) -> None:
    """Rounds count from 1, as Flower's do; 0 is the set-up before the first round (the
    akida-edge mode's edge-params query is sent as round 0). A clinic also stores the round
    with its deployed head, so a negative or absurd one is refused here, by name."""
    if not 0 <= server_round <= MAX_ROUND:
        raise ProtocolError(f"{what}: {K_ROUND}={server_round} must be from 0 to {MAX_ROUND}")


def check_round_and_seed(server_round: int, seed: int, what: str) -> None:
    """Clinics seed their local learning with seed + round: both bounded so the sum stays a
    valid 32-bit seed (the coordinator sends seeds below 2**31 and at most 10,000 rounds),
    instead of failing deep inside SMOTE or PCA."""
    check_round(server_round, what)
    if not 0 <= seed <= MAX_SEED:
        raise ProtocolError(f"{what}: {K_SEED}={seed} must be from 0 to {MAX_SEED}")


def validate_train_ins(content: RecordDict, spec: HeadSpec) -> tuple[Head, TrainSettings]:
    """Clinic side: the global head and this round's local-training settings.

    `spec` is the bundle's (features, target, scale); the class list comes with the message.
    """
    what = "train instruction"
    _records(content, what, {REC_ARRAYS: ArrayRecord, REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID, K_ROUND, K_HEAD_ID, K_CLASSES, *TRAIN_SETTINGS), (K_PROXIMAL_MU,))
    _protocol(cfg, what)
    classes = check_class_list(cfg[K_CLASSES], what)
    settings = TrainSettings(
        server_round=_typed(cfg, K_ROUND, int, what),
        bundle_id=_bundle_id(cfg, what),
        head_id=_sha256(cfg, K_HEAD_ID, what),
        local_epochs=_typed(cfg, K_EPOCHS, int, what),
        learning_rate=float(_typed(cfg, K_LR, (int, float), what)),
        batch_size=_typed(cfg, K_BATCH, int, what),
        l2=float(_typed(cfg, K_L2, (int, float), what)),
        smote=_typed(cfg, K_SMOTE, bool, what),
        seed=_typed(cfg, K_SEED, int, what),
        proximal_mu=float(_typed(cfg, K_PROXIMAL_MU, (int, float), what)) if K_PROXIMAL_MU in cfg else 0.0,
        classes=classes,
        absent_classes=_typed(cfg, K_ABSENT, str, what),
    )
    if settings.absent_classes not in ABSENT_CLASSES:
        raise ProtocolError(f"{what}: absent-classes={settings.absent_classes!r}: use {' or '.join(ABSENT_CLASSES)}")
    if not (0 < settings.local_epochs <= MAX_LOCAL_EPOCHS and 0 < settings.batch_size <= MAX_BATCH_SIZE):
        raise ProtocolError(f"{what}: local-epochs/batch-size out of range")
    check_round_and_seed(settings.server_round, settings.seed, what)
    if not (math.isfinite(settings.learning_rate) and 0 < settings.learning_rate <= MAX_LEARNING_RATE):
        raise ProtocolError(f"{what}: {K_LR}={settings.learning_rate} must be > 0 and at most {MAX_LEARNING_RATE:g}")
    for key, value in ((K_L2, settings.l2), (K_PROXIMAL_MU, settings.proximal_mu)):
        if not (math.isfinite(value) and 0 <= value <= MAX_REGULARISATION):
            raise ProtocolError(f"{what}: {key}={value} must be a finite number from 0 to {MAX_REGULARISATION:g}")
    return head_from_global_record(content[REC_ARRAYS], spec.with_classes(classes), what), settings


def evaluate_content(head: Head, settings: EvaluateSettings) -> RecordDict:
    settings = _with_classes_of(head, settings)
    config = settings.to_config()
    config[K_ROUND] = settings.server_round
    return RecordDict({REC_ARRAYS: global_head_record(head), REC_CONFIG: config})


def validate_evaluate_ins(content: RecordDict, spec: HeadSpec) -> tuple[Head, EvaluateSettings]:
    what = "evaluate instruction"
    _records(content, what, {REC_ARRAYS: ArrayRecord, REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID, K_ROUND, K_HEAD_ID, K_CLASSES))
    _protocol(cfg, what)
    classes = check_class_list(cfg[K_CLASSES], what)
    settings = EvaluateSettings(
        _typed(cfg, K_ROUND, int, what), _bundle_id(cfg, what), _sha256(cfg, K_HEAD_ID, what), classes
    )
    check_round(settings.server_round, what)
    return head_from_global_record(content[REC_ARRAYS], spec.with_classes(classes), what), settings


def peek_bundle_id(content: RecordDict) -> str:
    """The bundle id an instruction refers to, before the head shape is known (clinic side)."""
    cfg = content.get(REC_CONFIG)
    if not isinstance(cfg, ConfigRecord) or K_BUNDLE_ID not in cfg:
        raise ProtocolError("instruction has no config record with a bundle-id")
    if K_PROTOCOL in cfg:
        _protocol(cfg, "instruction")
    return _bundle_id(cfg, "instruction")


# --------------------------------------------------------------------------- clinic -> server


def clinic_record(info: ClinicInfo) -> ConfigRecord:
    record = ConfigRecord({K_PROTOCOL: PROTOCOL_VERSION, K_CLINIC_ID: info.clinic_id})
    if info.bundle_id is not None:
        record[K_BUNDLE_ID] = info.bundle_id
    if info.cached_bundles:
        record[K_CACHED] = list(info.cached_bundles)
    if info.device:
        record[K_DEVICE] = info.device
    if info.head_id is not None:
        record[K_HEAD_ID] = info.head_id
    if info.classes:
        record[K_CLASSES] = list(info.classes)
    return record


def hello_reply_content(info: ClinicInfo) -> RecordDict:
    return RecordDict({REC_CLINIC: clinic_record(info)})


def deploy_reply_content(info: ClinicInfo) -> RecordDict:
    return RecordDict({REC_CLINIC: clinic_record(info)})


def train_reply_content(qhead: QuantizedHead, metrics: Mapping[str, int | float], info: ClinicInfo) -> RecordDict:
    info = replace(info, classes=tuple(qhead.classes))
    return RecordDict(
        {REC_HEAD: update_record(qhead), REC_METRICS: MetricRecord(dict(metrics)), REC_CLINIC: clinic_record(info)}
    )


def evaluate_reply_content(metrics: Mapping[str, int | float], info: ClinicInfo) -> RecordDict:
    return RecordDict({REC_METRICS: MetricRecord(dict(metrics)), REC_CLINIC: clinic_record(info)})


def _clinic(content: RecordDict, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> ClinicInfo:
    cfg = content[REC_CLINIC]
    _keys(cfg, what + " clinic record", (K_PROTOCOL, K_CLINIC_ID, *required), optional)
    _protocol(cfg, what)
    cached: tuple[str, ...] = ()
    if K_CACHED in cfg:
        value = cfg[K_CACHED]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{what}: cached-bundles must be a list of bundle ids")
        cached = tuple(value)
    return ClinicInfo(
        clinic_id=_clinic_id(cfg, what),
        protocol_version=PROTOCOL_VERSION,
        bundle_id=_bundle_id(cfg, what) if K_BUNDLE_ID in cfg else None,
        cached_bundles=cached,
        device=str(_typed(cfg, K_DEVICE, str, what)) if K_DEVICE in cfg else "",
        head_id=_sha256(cfg, K_HEAD_ID, what) if K_HEAD_ID in cfg else None,
        classes=check_class_list(cfg[K_CLASSES], what) if K_CLASSES in cfg else (),
    )


def validate_hello_reply(content: RecordDict) -> ClinicInfo:
    what = "hello reply"
    _records(content, what, {REC_CLINIC: ConfigRecord})
    return _clinic(content, what, (), (K_CACHED, K_DEVICE))


def validate_deploy_reply(content: RecordDict, bundle_id: str) -> ClinicInfo:
    what = "deploy reply"
    _records(content, what, {REC_CLINIC: ConfigRecord})
    info = _clinic(content, what, (K_BUNDLE_ID,), (K_DEVICE,))
    if info.bundle_id != bundle_id:
        raise ProtocolError(f"{what}: clinic installed bundle {str(info.bundle_id)[:12]}…, not {bundle_id[:12]}…")
    return info


@dataclass(frozen=True)
class TrainReply:
    clinic: ClinicInfo
    qhead: QuantizedHead
    metrics: dict[str, float]

    @property
    def num_examples(self) -> int:
        return int(self.metrics[M_NUM_EXAMPLES])


def validate_train_reply(content: RecordDict, spec: HeadSpec, bundle_id: str) -> TrainReply:
    """Server side: refuse anything but a well-formed quantized head for the current backbone.

    `spec` holds the round's global classes; the reply's head must list them first, in the
    same order, and may append at most MAX_NEW_CLASSES classes the clinic introduces.
    """
    what = "train reply"
    _records(content, what, {REC_HEAD: ArrayRecord, REC_METRICS: MetricRecord, REC_CLINIC: ConfigRecord})
    info = _clinic(content, what, (K_BUNDLE_ID, K_CLASSES))
    if info.bundle_id != bundle_id:
        raise ProtocolError(
            f"{what}: update was trained on backbone {str(info.bundle_id)[:12]}…, the run uses {bundle_id[:12]}…"
        )
    if info.classes[: spec.num_classes] != spec.classes:
        raise ProtocolError(
            f"{what}: head classes {list(info.classes)} do not start with the round's classes {list(spec.classes)}"
        )
    if len(info.classes) - spec.num_classes > MAX_NEW_CLASSES:
        raise ProtocolError(f"{what}: adds {len(info.classes) - spec.num_classes} classes at once (at most {MAX_NEW_CLASSES})")
    qhead = quantized_from_update(content[REC_HEAD], spec.with_classes(info.classes), what)
    metrics = _metrics(content[REC_METRICS], what + " metrics", TRAIN_METRICS)
    return TrainReply(info, qhead, metrics)


@dataclass(frozen=True)
class EvaluateReply:
    clinic: ClinicInfo
    metrics: dict[str, float]


def validate_evaluate_reply(content: RecordDict, bundle_id: str, head_id: str) -> EvaluateReply:
    what = "evaluate reply"
    _records(content, what, {REC_METRICS: MetricRecord, REC_CLINIC: ConfigRecord})
    info = _clinic(content, what, (K_BUNDLE_ID, K_HEAD_ID))
    if info.bundle_id != bundle_id:
        raise ProtocolError(f"{what}: evaluated on backbone {str(info.bundle_id)[:12]}…, the run uses {bundle_id[:12]}…")
    if info.head_id != head_id:
        raise ProtocolError(f"{what}: evaluated head {str(info.head_id)[:12]}…, expected {head_id[:12]}…")
    metrics = _metrics(content[REC_METRICS], what + " metrics", EVALUATE_METRICS)
    return EvaluateReply(info, metrics)


def describe_content(content: RecordDict) -> dict[str, Any]:
    """A structural description of a message's content (record kinds, keys, dtypes, shapes, sizes).

    Used for the coordinator's wire log and by tests that check what really crossed the wire.
    """
    out: dict[str, Any] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {
                "kind": "arrays",
                "items": {
                    key: {"dtype": str(arr.dtype), "shape": list(arr.shape), "stype": arr.stype, "nbytes": len(arr.data)}
                    for key, arr in record.items()
                },
            }
        elif isinstance(record, MetricRecord):
            out[name] = {"kind": "metrics", "items": {k: type(v).__name__ for k, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            out[name] = {
                "kind": "config",
                "items": {
                    k: (f"bytes[{len(v)}]" if isinstance(v, bytes) else type(v).__name__) for k, v in record.items()
                },
            }
        else:  # pragma: no cover - Flower has only these three record kinds
            out[name] = {"kind": type(record).__name__}
    return out
