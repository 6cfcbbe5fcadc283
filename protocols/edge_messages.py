"""The `akida-edge` learning mode's messages: only learned neurons cross the wire.

In `--learning akida-edge` runs (v1 bundles only) the head is not a float/int8 matrix but the
neurons of an Akida 1.0 on-chip learning layer (`qana.edge.EdgeHead`). This module defines the
Flower messages of that mode and their validation, with the same rules as `protocols.messages`
(whose helpers it reuses): exact records, exact keys, typed arrays with checked dtype and shape,
and a `ProtocolError` naming the problem for anything else.

What may cross the wire in an akida-edge run (besides query.hello / query.deploy, unchanged):

  coordinator -> clinic
    query.edge_params  config{protocol-version, bundle-id, seed}
                       (round 0, only when some edge setting is `auto`)
    train.edge         edge{<edge head arrays>} + edge-head{<edge head meta>}
                       + config{protocol-version, bundle-id, server-round, head-sha256,
                                edge-num-weights, edge-neurons-per-class,
                                edge-learning-competition, edge-epochs, seed}
    evaluate.edge      edge{...} + edge-head{...}
                       + config{protocol-version, bundle-id, server-round, head-sha256}

  clinic -> coordinator
    query.edge_params  edge-params{num-examples, num-weights, neurons-per-class,
                                   learning-competition, median-active}
                       + clinic{protocol-version, clinic-id, bundle-id}
    train.edge         edge{...} + edge-head{...} + metrics{num-examples, train-top1, device-agreement}
                       + clinic{protocol-version, clinic-id, bundle-id}
    evaluate.edge      metrics{num-examples, top1, macro-f1, balanced-accuracy, device-agreement}
                       + clinic{protocol-version, clinic-id, bundle-id, head-sha256}
                       (exactly the gradient mode's evaluate reply)

An edge head on the wire (N neurons, class-major, D binary features):

  edge (arrays)       weights-packed      uint8  (N, ceil(D/8))  np.packbits of each neuron's 0/1
                                                                  weights; exactly num-weights ones,
                                                                  no bit set past D
                      neuron-classes      int32  (N,)            = repeat(0..C-1, neurons-per-class)
                      threshold           int32  (N,)
                      act-step            float32 (N,)           finite, >= 1/16 (Akida's smallest step)
                      threshold-learning  int32  (N,)            >= 0 (Akida's learning state)
                      thswap              int32  (N,)            in [0, num-weights]
                      usage               int64  (N,)            >= 0; in a clinic's reply the counts sum
                                                                  to its num-examples (each training
                                                                  sample is won by one neuron)
  edge-head (config)  num-features, num-weights, learning-competition, classes (list of names)

Class-incremental rounds: `classes` is the federation's current class list (run config
`initial-classes` may start it with fewer than the bundle's). A train reply lists the round's
classes first, in order, and may append up to MAX_NEW_CLASSES classes the clinic introduces
(node-config `new-classes`), each with the round's neurons per class; the coordinator merges
differing lists by name (`qana.edge.merge_edge_heads`: global order first, new classes appended).

So a clinic sends its binary prototypes, their Akida per-neuron parameters and how many of its
own training samples each prototype won; never images, features, labels or predictions. The
coordinator merges these with `qana.edge.merge_edge_heads` (bits are never averaged).

Why separate message types (`train.edge`, `evaluate.edge`, Flower named actions): a gradient
ClientApp handler never sees an edge head and vice versa, so a clinic or coordinator running the
other mode fails loudly ("no handler") instead of misreading arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocols.messages import (
    K_BUNDLE_ID,
    K_HEAD_ID,
    K_PROTOCOL,
    K_ROUND,
    K_SEED,
    M_DEVICE_AGREEMENT,
    M_NUM_EXAMPLES,
    M_TRAIN_TOP1,
    MAX_NEW_CLASSES,
    PROTOCOL_VERSION,
    REC_CLINIC,
    REC_CONFIG,
    REC_METRICS,
    ClinicInfo,
    ProtocolError,
    _array,
    _bundle_id,
    _clinic,
    _keys,
    _metrics,
    _protocol,
    _records,
    _sha256,
    _typed,
    check_class_list,
    check_round,
    check_round_and_seed,
    clinic_record,
)
from qana.edge import MAX_LEARNING_COMPETITION, MIN_ACT_STEP, EdgeHead

# Flower message types (named actions of Flower's train/evaluate/query categories).
MSG_EDGE_PARAMS = "query.edge_params"
MSG_TRAIN_EDGE = "train.edge"
MSG_EVALUATE_EDGE = "evaluate.edge"

# Record names.
REC_EDGE = "edge"  # the head's arrays
REC_EDGE_META = "edge-head"  # the head's scalars and class names
REC_EDGE_PARAMS = "edge-params"  # a clinic's own choice of learning settings (aggregates only)

# Array names.
ARR_WEIGHTS_PACKED = "weights-packed"
ARR_NEURON_CLASSES = "neuron-classes"
ARR_THRESHOLD = "threshold"
ARR_ACT_STEP = "act-step"
ARR_THRESHOLD_LEARNING = "threshold-learning"
ARR_THSWAP = "thswap"
ARR_USAGE = "usage"
EDGE_ARRAYS: dict[str, np.dtype] = {
    ARR_WEIGHTS_PACKED: np.dtype(np.uint8),
    ARR_NEURON_CLASSES: np.dtype(np.int32),
    ARR_THRESHOLD: np.dtype(np.int32),
    ARR_ACT_STEP: np.dtype(np.float32),
    ARR_THRESHOLD_LEARNING: np.dtype(np.int32),
    ARR_THSWAP: np.dtype(np.int32),
    ARR_USAGE: np.dtype(np.int64),
}

# Head meta keys.
K_NUM_FEATURES = "num-features"
K_NUM_WEIGHTS = "num-weights"
K_COMPETITION = "learning-competition"
K_CLASSES = "classes"
META_KEYS = (K_NUM_FEATURES, K_NUM_WEIGHTS, K_COMPETITION, K_CLASSES)

# Train config keys (the federation's one learning configuration).
K_EDGE_NUM_WEIGHTS = "edge-num-weights"
K_EDGE_NEURONS = "edge-neurons-per-class"
K_EDGE_COMPETITION = "edge-learning-competition"
K_EDGE_EPOCHS = "edge-epochs"
EDGE_TRAIN_SETTINGS = (K_EDGE_NUM_WEIGHTS, K_EDGE_NEURONS, K_EDGE_COMPETITION, K_EDGE_EPOCHS, K_SEED)

# A clinic's reported choice (query.edge-params reply).
M_NUM_WEIGHTS = "num-weights"
M_NEURONS = "neurons-per-class"
M_COMPETITION = "learning-competition"
M_MEDIAN_ACTIVE = "median-active"
EDGE_PARAMS_METRICS = (M_NUM_EXAMPLES, M_NUM_WEIGHTS, M_NEURONS, M_COMPETITION, M_MEDIAN_ACTIVE)

EDGE_TRAIN_METRICS = (M_NUM_EXAMPLES, M_TRAIN_TOP1, M_DEVICE_AGREEMENT)
MAX_NEURONS_PER_CLASS = 1024
MAX_EDGE_EPOCHS = 100
MAX_CLASSES = 1000


@dataclass(frozen=True)
class EdgeSpec:
    """What every edge head of a round must look like: the bundle's features and classes, one setting."""

    num_features: int
    classes: tuple[str, ...]
    num_weights: int
    neurons_per_class: int
    learning_competition: float

    @property
    def num_neurons(self) -> int:
        return len(self.classes) * self.neurons_per_class

    def with_classes(self, classes: tuple[str, ...]) -> EdgeSpec:
        """The same settings for another class list (the run's current one)."""
        return replace(self, classes=tuple(classes))

    def check(self, what: str = "edge settings") -> EdgeSpec:
        """ProtocolError unless the settings are ones Akida's learning accepts for these features."""
        if not 1 <= self.num_weights <= self.num_features:
            raise ProtocolError(f"{what}: num-weights {self.num_weights} must be in [1, {self.num_features}]")
        if not 1 <= self.neurons_per_class <= MAX_NEURONS_PER_CLASS:
            raise ProtocolError(f"{what}: neurons-per-class {self.neurons_per_class} must be in [1, {MAX_NEURONS_PER_CLASS}]")
        if not (math.isfinite(self.learning_competition) and 0 <= self.learning_competition <= MAX_LEARNING_COMPETITION):
            raise ProtocolError(
                f"{what}: learning-competition {self.learning_competition} must be from 0 to {MAX_LEARNING_COMPETITION:g} (Akida's range)"
            )
        return self


@dataclass(frozen=True)
class EdgeTrainSettings:
    """One edge round's instructions (what the clinic may not choose itself)."""

    server_round: int
    bundle_id: str
    head_id: str
    num_weights: int
    neurons_per_class: int
    learning_competition: float
    epochs: int = 1
    seed: int = 0

    def to_config(self) -> ConfigRecord:
        return ConfigRecord(
            {
                K_PROTOCOL: PROTOCOL_VERSION,
                K_BUNDLE_ID: self.bundle_id,
                K_ROUND: int(self.server_round),
                K_HEAD_ID: self.head_id,
                K_EDGE_NUM_WEIGHTS: int(self.num_weights),
                K_EDGE_NEURONS: int(self.neurons_per_class),
                K_EDGE_COMPETITION: float(self.learning_competition),
                K_EDGE_EPOCHS: int(self.epochs),
                K_SEED: int(self.seed),
            }
        )

    def spec(self, num_features: int, classes: tuple[str, ...]) -> EdgeSpec:
        return EdgeSpec(num_features, tuple(classes), self.num_weights, self.neurons_per_class, self.learning_competition)


@dataclass(frozen=True)
class EdgeEvaluateSettings:
    server_round: int
    bundle_id: str
    head_id: str

    def to_config(self) -> ConfigRecord:
        return ConfigRecord(
            {K_PROTOCOL: PROTOCOL_VERSION, K_BUNDLE_ID: self.bundle_id, K_ROUND: int(self.server_round), K_HEAD_ID: self.head_id}
        )


# --------------------------------------------------------------------------- the head on the wire


def edge_head_records(head: EdgeHead) -> dict[str, ArrayRecord | ConfigRecord]:
    """The head as two records: typed arrays and a config of its scalars and class names."""
    arrays = ArrayRecord(
        {
            ARR_WEIGHTS_PACKED: Array(np.ascontiguousarray(head.weights_packed, dtype=np.uint8)),
            ARR_NEURON_CLASSES: Array(np.ascontiguousarray(head.neuron_classes, dtype=np.int32)),
            ARR_THRESHOLD: Array(np.ascontiguousarray(head.threshold, dtype=np.int32)),
            ARR_ACT_STEP: Array(np.ascontiguousarray(head.act_step, dtype=np.float32)),
            ARR_THRESHOLD_LEARNING: Array(np.ascontiguousarray(head.threshold_learning, dtype=np.int32)),
            ARR_THSWAP: Array(np.ascontiguousarray(head.thswap, dtype=np.int32)),
            ARR_USAGE: Array(np.ascontiguousarray(head.usage, dtype=np.int64)),
        }
    )
    meta = ConfigRecord(
        {
            K_NUM_FEATURES: int(head.num_features),
            K_NUM_WEIGHTS: int(head.num_weights),
            K_COMPETITION: float(head.learning_competition),
            K_CLASSES: list(head.classes),
        }
    )
    return {REC_EDGE: arrays, REC_EDGE_META: meta}


def _head_meta(meta: Mapping[str, Any], what: str) -> tuple[int, int, float, tuple[str, ...]]:
    _keys(meta, what + " edge-head record", META_KEYS)
    d = _typed(meta, K_NUM_FEATURES, int, what)
    nw = _typed(meta, K_NUM_WEIGHTS, int, what)
    comp = float(_typed(meta, K_COMPETITION, (int, float), what))
    # the gradient mode's rule for class names, so a class can move between the two modes' heads
    classes = check_class_list(meta[K_CLASSES], what)
    if d < 1:
        raise ProtocolError(f"{what}: num-features must be positive, got {d}")
    return d, nw, comp, classes


def check_reply_classes(reply_classes: tuple[str, ...], round_classes: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A reply's class list: the round's classes first, in order, then at most MAX_NEW_CLASSES new ones.

    The same rule as the gradient mode's `validate_train_reply`, so that the merge can keep the
    global order (kept neurons stay under their class) and only append what a clinic introduces.
    """
    n = len(round_classes)
    if tuple(reply_classes[:n]) != tuple(round_classes):
        raise ProtocolError(f"{what}: head classes {list(reply_classes)} do not start with the round's classes {list(round_classes)}")
    if len(reply_classes) - n > MAX_NEW_CLASSES:
        raise ProtocolError(f"{what}: adds {len(reply_classes) - n} classes at once (at most {MAX_NEW_CLASSES})")
    return tuple(reply_classes)


def edge_head_from_records(
    content: RecordDict,
    what: str,
    num_features: int,
    classes: tuple[str, ...] | None = None,
    spec: EdgeSpec | None = None,
) -> EdgeHead:
    """Decode and check a head against the bundle's features, `classes` (exactly, if given) and the round's settings.

    `classes=None` takes the head's own class list (checked as names): instructions carry the
    federation's current classes, which may differ from the bundle's in class-incremental runs.

    Checks: dtypes and shapes of every array, no bit past D, exactly num-weights ones per neuron,
    the class-major uniform layout (`neuron-classes` = 0..C-1 each repeated neurons-per-class
    times, so the head can be written back into an Akida learning layer), finite
    act-step of at least 1/16 (Akida's smallest), non-negative learning state and usage, thswap within
    [0, num-weights].
    """
    arrays, meta = content[REC_EDGE], content[REC_EDGE_META]
    d, nw, comp, head_classes = _head_meta(meta, what)
    if d != num_features:
        raise ProtocolError(f"{what}: edge head has {d} features, the bundle's backbone emits {num_features}")
    if classes is not None and head_classes != tuple(classes):
        raise ProtocolError(f"{what}: edge head classes {list(head_classes)} are not the run's classes {list(classes)}")
    if spec is not None:
        if nw != spec.num_weights:
            raise ProtocolError(f"{what}: edge head has num-weights {nw}, the round uses {spec.num_weights}")
        if comp != spec.learning_competition:
            raise ProtocolError(f"{what}: edge head has learning-competition {comp}, the round uses {spec.learning_competition}")
    _keys(arrays, what + " edge record", tuple(EDGE_ARRAYS))
    n_packed = arrays[ARR_WEIGHTS_PACKED]
    if not isinstance(n_packed, Array) or len(n_packed.shape) != 2:
        raise ProtocolError(f"{what}: {ARR_WEIGHTS_PACKED!r} must be a 2-D array")
    n = int(n_packed.shape[0])
    c = len(head_classes)
    if n < c or n % c:
        raise ProtocolError(f"{what}: {n} neurons for {c} classes is not a uniform class-major layout")
    npc = n // c
    if spec is not None and npc != spec.neurons_per_class:
        raise ProtocolError(f"{what}: edge head has {npc} neurons per class, the round uses {spec.neurons_per_class}")
    if npc > MAX_NEURONS_PER_CLASS:
        raise ProtocolError(f"{what}: {npc} neurons per class exceeds {MAX_NEURONS_PER_CLASS}")
    values = {
        name: _array(arrays, name, dtype, (n, (d + 7) // 8) if name == ARR_WEIGHTS_PACKED else (n,), what)
        for name, dtype in EDGE_ARRAYS.items()
    }
    if not np.array_equal(values[ARR_NEURON_CLASSES], np.repeat(np.arange(c, dtype=np.int32), npc)):
        raise ProtocolError(f"{what}: neuron-classes must be 0..{c - 1}, each repeated {npc} times (class-major layout)")
    act = values[ARR_ACT_STEP]
    if not (np.isfinite(act).all() and (act >= MIN_ACT_STEP).all()):
        raise ProtocolError(f"{what}: act-step must be finite and at least {MIN_ACT_STEP} (Akida refuses smaller steps)")
    for name in (ARR_THRESHOLD_LEARNING, ARR_USAGE):
        if (values[name] < 0).any():
            raise ProtocolError(f"{what}: {name} cannot be negative")
    if not 1 <= nw <= d:
        raise ProtocolError(f"{what}: num-weights {nw} must be in [1, {d}]")
    if ((values[ARR_THSWAP] < 0) | (values[ARR_THSWAP] > nw)).any():
        raise ProtocolError(f"{what}: thswap must be in [0, num-weights={nw}]")
    bits = np.unpackbits(values[ARR_WEIGHTS_PACKED], axis=1)
    if bits[:, d:].any():
        raise ProtocolError(f"{what}: weights-packed has bits set beyond the {d} features")
    ones = bits[:, :d].sum(axis=1)
    if not np.all(ones == nw):
        bad = np.flatnonzero(ones != nw)[:5].tolist()
        raise ProtocolError(f"{what}: every neuron must have exactly num-weights={nw} ones; neurons {bad} do not")
    try:
        return EdgeHead(
            weights_packed=values[ARR_WEIGHTS_PACKED],
            num_features=d,
            neuron_classes=values[ARR_NEURON_CLASSES],
            threshold=values[ARR_THRESHOLD],
            act_step=act,
            threshold_learning=values[ARR_THRESHOLD_LEARNING],
            thswap=values[ARR_THSWAP],
            usage=values[ARR_USAGE],
            classes=head_classes,
            num_weights=nw,
            learning_competition=comp,
        )
    except ValueError as exc:  # anything EdgeHead refuses that the checks above missed
        raise ProtocolError(f"{what}: not a valid edge head ({exc})") from None


# --------------------------------------------------------------------------- server -> clinic


def edge_params_content(bundle_id: str, seed: int) -> RecordDict:
    return RecordDict({REC_CONFIG: ConfigRecord({K_PROTOCOL: PROTOCOL_VERSION, K_BUNDLE_ID: bundle_id, K_SEED: int(seed)})})


def validate_edge_params_ins(content: RecordDict) -> tuple[str, int]:
    """Clinic side: (bundle id, seed) for choosing its own edge settings."""
    what = "edge-params instruction"
    _records(content, what, {REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID, K_SEED))
    _protocol(cfg, what)
    seed = _typed(cfg, K_SEED, int, what)
    check_round_and_seed(0, seed, what)
    return _bundle_id(cfg, what), seed


def train_edge_content(head: EdgeHead, settings: EdgeTrainSettings) -> RecordDict:
    return RecordDict({**edge_head_records(head), REC_CONFIG: settings.to_config()})


def validate_train_edge_ins(
    content: RecordDict, num_features: int, classes: tuple[str, ...] | None = None
) -> tuple[EdgeHead, EdgeTrainSettings]:
    """Clinic side: the global edge head and this round's settings, checked against its bundle.

    The head's class list is the federation's current one (it may lack bundle classes or hold
    classes a clinic introduced); pass `classes` only to require an exact list.
    """
    what = "edge train instruction"
    _records(content, what, {REC_EDGE: ArrayRecord, REC_EDGE_META: ConfigRecord, REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID, K_ROUND, K_HEAD_ID, *EDGE_TRAIN_SETTINGS))
    _protocol(cfg, what)
    settings = EdgeTrainSettings(
        server_round=_typed(cfg, K_ROUND, int, what),
        bundle_id=_bundle_id(cfg, what),
        head_id=_sha256(cfg, K_HEAD_ID, what),
        num_weights=_typed(cfg, K_EDGE_NUM_WEIGHTS, int, what),
        neurons_per_class=_typed(cfg, K_EDGE_NEURONS, int, what),
        learning_competition=float(_typed(cfg, K_EDGE_COMPETITION, (int, float), what)),
        epochs=_typed(cfg, K_EDGE_EPOCHS, int, what),
        seed=_typed(cfg, K_SEED, int, what),
    )
    check_round_and_seed(settings.server_round, settings.seed, what)
    if not 1 <= settings.epochs <= MAX_EDGE_EPOCHS:
        raise ProtocolError(f"{what}: edge-epochs {settings.epochs} must be in [1, {MAX_EDGE_EPOCHS}]")
    head_classes = _head_meta(content[REC_EDGE_META], what)[3]
    spec = settings.spec(num_features, head_classes).check(what)
    return edge_head_from_records(content, what, num_features, classes, spec), settings


def evaluate_edge_content(head: EdgeHead, settings: EdgeEvaluateSettings) -> RecordDict:
    return RecordDict({**edge_head_records(head), REC_CONFIG: settings.to_config()})


def validate_evaluate_edge_ins(
    content: RecordDict, num_features: int, classes: tuple[str, ...] | None = None
) -> tuple[EdgeHead, EdgeEvaluateSettings]:
    """Clinic side: the head to evaluate (with the federation's current class list) and the round."""
    what = "edge evaluate instruction"
    _records(content, what, {REC_EDGE: ArrayRecord, REC_EDGE_META: ConfigRecord, REC_CONFIG: ConfigRecord})
    cfg = content[REC_CONFIG]
    _keys(cfg, what, (K_PROTOCOL, K_BUNDLE_ID, K_ROUND, K_HEAD_ID))
    _protocol(cfg, what)
    settings = EdgeEvaluateSettings(_typed(cfg, K_ROUND, int, what), _bundle_id(cfg, what), _sha256(cfg, K_HEAD_ID, what))
    check_round(settings.server_round, what)
    return edge_head_from_records(content, what, num_features, classes), settings


# --------------------------------------------------------------------------- clinic -> server


@dataclass(frozen=True)
class EdgeParamsReply:
    clinic: ClinicInfo
    num_examples: int
    num_weights: int
    neurons_per_class: int
    learning_competition: float
    median_active: float


def edge_params_reply_content(
    num_examples: int, num_weights: int, neurons_per_class: int, learning_competition: float, median_active: float, info: ClinicInfo
) -> RecordDict:
    metrics = MetricRecord(
        {
            M_NUM_EXAMPLES: int(num_examples),
            M_NUM_WEIGHTS: int(num_weights),
            M_NEURONS: int(neurons_per_class),
            M_COMPETITION: float(learning_competition),
            M_MEDIAN_ACTIVE: float(median_active),
        }
    )
    return RecordDict({REC_EDGE_PARAMS: metrics, REC_CLINIC: clinic_record(info)})


def validate_edge_params_reply(content: RecordDict, bundle_id: str, num_features: int) -> EdgeParamsReply:
    what = "edge-params reply"
    _records(content, what, {REC_EDGE_PARAMS: MetricRecord, REC_CLINIC: ConfigRecord})
    info = _clinic(content, what, (K_BUNDLE_ID,))
    if info.bundle_id != bundle_id:
        raise ProtocolError(f"{what}: chosen on backbone {str(info.bundle_id)[:12]}…, the run uses {bundle_id[:12]}…")
    values = _metrics(content[REC_EDGE_PARAMS], what, EDGE_PARAMS_METRICS)
    missing = [k for k in EDGE_PARAMS_METRICS if k not in values]
    if missing:
        raise ProtocolError(f"{what} lacks {', '.join(missing)}")
    for key in (M_NUM_WEIGHTS, M_NEURONS):
        if not isinstance(values[key], int):
            raise ProtocolError(f"{what}: {key} must be an integer, got {values[key]!r}")
    spec = EdgeSpec(num_features, ("?",), int(values[M_NUM_WEIGHTS]), int(values[M_NEURONS]), float(values[M_COMPETITION]))
    spec.check(what)
    median = float(values[M_MEDIAN_ACTIVE])
    if not 0 < median <= num_features:
        raise ProtocolError(f"{what}: median-active {median} must be in (0, {num_features}]")
    return EdgeParamsReply(
        info, int(values[M_NUM_EXAMPLES]), spec.num_weights, spec.neurons_per_class, spec.learning_competition, median
    )


def train_edge_reply_content(head: EdgeHead, metrics: Mapping[str, int | float], info: ClinicInfo) -> RecordDict:
    return RecordDict({**edge_head_records(head), REC_METRICS: MetricRecord(dict(metrics)), REC_CLINIC: clinic_record(info)})


@dataclass(frozen=True)
class EdgeTrainReply:
    clinic: ClinicInfo
    head: EdgeHead
    metrics: dict[str, float]

    @property
    def num_examples(self) -> int:
        return int(self.metrics[M_NUM_EXAMPLES])


def validate_train_edge_reply(content: RecordDict, spec: EdgeSpec, bundle_id: str) -> EdgeTrainReply:
    """Server side: only a well-formed head in the round's layout, learned on the run's backbone.

    `spec.classes` are the round's classes: the reply's head must list them first, in the same
    order, and may append at most MAX_NEW_CLASSES classes the clinic introduces (each with
    the round's neurons per class, as Akida's `add_classes` grows the layer).
    The usage counts must add up to num-examples: usage is the merge's weight, so a clinic
    cannot claim more samples for its neurons than it trained on (and reported).
    """
    what = "edge train reply"
    _records(
        content, what, {REC_EDGE: ArrayRecord, REC_EDGE_META: ConfigRecord, REC_METRICS: MetricRecord, REC_CLINIC: ConfigRecord}
    )
    info = _clinic(content, what, (K_BUNDLE_ID,))
    if info.bundle_id != bundle_id:
        raise ProtocolError(f"{what}: head was learned on backbone {str(info.bundle_id)[:12]}…, the run uses {bundle_id[:12]}…")
    metrics = _metrics(content[REC_METRICS], what + " metrics", EDGE_TRAIN_METRICS)
    classes = check_reply_classes(_head_meta(content[REC_EDGE_META], what)[3], spec.classes, what)
    head = edge_head_from_records(content, what, spec.num_features, classes, spec)
    total = sum(int(u) for u in head.usage)  # Python ints: an int64 sum can wrap back to a small number
    if total != int(metrics[M_NUM_EXAMPLES]):
        raise ProtocolError(f"{what}: neuron usage sums to {total}, but the clinic reports {int(metrics[M_NUM_EXAMPLES])} training examples")
    return EdgeTrainReply(info, head, metrics)
