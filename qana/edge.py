"""Native Akida 1.0 edge learning of the head, and a federated merge that keeps it useful.

The `akida-edge` learning mode is the gradient head's (qana.head) sibling for the v1 target.
An Akida 1.0 backbone emits binary spikes f in {0,1}^D. On-chip learning (`AkidaUnsupervised`)
trains a last `FullyConnected` layer with 1-bit weights and several neurons per class:

    potential_j = (f . w_j - threshold_j) / act_step_j      w_j in {0,1}^D, exactly
                                                              `num_weights` ones per neuron
    class       = class of the neuron with the highest potential (first one on ties)

Learning is labelled and one-shot per sample: a sample of class c is offered only to c's
neurons; the best-matching one moves some of its ones onto the sample's active inputs. So each
neuron is a binary prototype (a centroid of a cluster of c's spikes); `num_weights` fixes how many
inputs a prototype connects to. Everything the chip needs to reproduce predictions and go on
learning lives in the layer's variables, which this module reads and writes:

    weights             (1, 1, D, N) int8 in {0, 1}    the prototypes
    threshold, act_step (N,)                           inference: (f.w - threshold) / act_step
    threshold_learning  (N,) int32                     learning state: 0 until a neuron has learned
    thswap              (N,) int32                     learning state: how many weights it may still
                                                        swap (its decaying plasticity)

(measured on akida 2.19.3's software backend: `forward` on a compiled layer returns f.w, `predict`
returns (f.w - threshold) / act_step, fit is sequential and deterministic given these variables;
the initial random weights drawn by `compile`/`add_classes` are not seeded, so this module
replaces them with weights drawn from its own seeded generator).

Learning runs on cached features with a 1-layer model (InputData of the binary feature map +
the FullyConnected layer): it gives bit-for-bit the same layer state as fitting the whole
bundle model on the images (tests/test_edge.py checks this), costs a fraction of the time, and
lets a federation extract features once per bundle.

Why a special merge: neuron j of one clinic and neuron j of another are unrelated prototypes
(which neuron learns which mode depends on the random start and the order of the samples), and
the mean of two binary prototypes is no prototype at all. `merge_edge_heads` therefore never
averages bits: it pools every clinic's learned neurons per class and keeps a fixed budget of
them by usage-weighted k-medoids in Hamming distance (the kept neurons are real neurons a clinic
learned, with their own learning state). Usage = how many local training samples of its class a
neuron wins, counted by running the learned layer on the clinic's training features.

Only akida and numpy are used: clinics never import TensorFlow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qana.bundle import Bundle
from qana.head import NUMBERS, array_in, class_indices, names_in, read_npz

FORMAT_VERSION = 1
EDGE_LAYER_NAME = "qana_edge"
LEARNING_VARIABLES = ("threshold_learning", "thswap")
# Akida refuses a smaller act_step ("Unsupported act_step, it should be equal or greater than 1/16")
# and a learning competition outside [0, 1] (akida 2.19.3): a head Akida would refuse is refused here,
# so the reference and the chip agree on which heads are valid.
MIN_ACT_STEP = 1.0 / 16
MAX_LEARNING_COMPETITION = 1.0
# Per-neuron state of a neuron that has not learned yet, exactly as `compile` and `add_classes`
# create it (checked against akida by tests/test_edge.py): these are what padding neurons get.
FRESH_THRESHOLD = 0
FRESH_ACT_STEP = 1.0
FRESH_THRESHOLD_LEARNING = 0
# BrainChip's rule of thumb ("Tips to set Akida edge learning parameters"): a sample with N
# spikes is represented perfectly by a neuron with N weights; take ~1.2 x the median count.
NUM_WEIGHTS_FACTOR = 1.2
DEFAULT_NEURONS_GRID = (1, 2, 4, 8, 16, 32)
DEFAULT_COMPETITION_GRID = (0.0, 0.1, 0.3)


# --------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class EdgeHead:
    """The learned neurons of an Akida 1.0 edge-learning layer: what crosses the wire.

    Neurons are stored class-major (all neurons of class 0, then class 1, ...), the layout in
    which Akida's learning assigns neuron j to class j // neurons_per_class. A head with the
    same number of neurons for every class (`is_uniform`) can be written back into a compiled
    layer and go on learning on-chip; any head can be used for prediction.
    """

    weights_packed: np.ndarray  # (N, ceil(D/8)) uint8: np.packbits of each neuron's binary weights
    num_features: int  # D
    neuron_classes: np.ndarray  # (N,) int32, index into `classes`, non-decreasing
    threshold: np.ndarray  # (N,) int32
    act_step: np.ndarray  # (N,) float32
    threshold_learning: np.ndarray  # (N,) int32; 0 = the neuron has not learned
    thswap: np.ndarray  # (N,) int32
    usage: np.ndarray  # (N,) int64: local training samples of its class the neuron won
    classes: tuple[str, ...]
    num_weights: int
    learning_competition: float

    def __post_init__(self) -> None:
        classes = _check_classes(self.classes, "an edge head's classes")
        d = _integer(self.num_features, "num_features")
        if d < 1:
            raise ValueError(f"num_features must be positive, got {d}")
        packed = np.array(self.weights_packed, copy=True)  # a copy: the caller's buffer cannot change a validated head
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (d + 7) // 8 or packed.shape[0] < 1:
            raise ValueError(f"weights_packed must be (N, {(d + 7) // 8}) uint8 for {d} features, got {packed.shape} {packed.dtype}")
        n = packed.shape[0]
        unpacked = np.unpackbits(packed, axis=1)
        if unpacked[:, d:].any():
            raise ValueError("weights_packed has bits set beyond num_features")
        nw = _integer(self.num_weights, "num_weights")
        if not 1 <= nw <= d:
            raise ValueError(f"num_weights must be in [1, {d}], got {nw}")
        ones = unpacked[:, :d].sum(axis=1)
        if not np.all(ones == nw):
            bad = np.flatnonzero(ones != nw)[:5].tolist()
            raise ValueError(
                f"every Akida learning neuron has exactly num_weights={nw} ones; neurons {bad} have "
                f"{ones[bad].tolist()} (averaged or corrupted weights?)"
            )
        # integer fields: (dtype, smallest, largest) checked on the values as given, before any cast
        # (a cast would wrap 2**32 + 1 to 1 and the range checks would pass on the wrapped value)
        bounds = {
            "neuron_classes": (np.int32, 0, len(classes) - 1),
            "threshold": (np.int32, np.iinfo(np.int32).min, np.iinfo(np.int32).max),
            "threshold_learning": (np.int32, 0, np.iinfo(np.int32).max),
            "thswap": (np.int32, 0, nw),
            "usage": (np.int64, 0, np.iinfo(np.int64).max),
        }
        arrays: dict[str, np.ndarray] = {}
        for name, (dtype, low, high) in bounds.items():
            raw = np.asarray(getattr(self, name))
            if raw.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {raw.shape}")
            if not np.issubdtype(raw.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got {raw.dtype}")
            if n and (int(raw.min()) < low or int(raw.max()) > high):
                raise ValueError(f"{name} must be in [{low}, {high}], got {int(raw.min())}..{int(raw.max())}")
            arrays[name] = raw.astype(dtype)
        raw_step = np.asarray(self.act_step)
        if raw_step.shape != (n,):
            raise ValueError(f"act_step must have shape ({n},), got {raw_step.shape}")
        if raw_step.dtype.kind not in NUMBERS:
            raise ValueError(f"act_step must be real numbers, got {raw_step.dtype}")
        arrays["act_step"] = raw_step.astype(np.float32)
        if not (np.isfinite(arrays["act_step"]).all() and (arrays["act_step"] >= MIN_ACT_STEP).all()):
            raise ValueError(f"act_step must be finite and at least {MIN_ACT_STEP} (Akida's smallest step)")
        nc = arrays["neuron_classes"]
        if np.any(np.diff(nc) < 0):
            raise ValueError("neurons must be stored class-major (neuron_classes non-decreasing)")
        lc = _real(self.learning_competition, "learning_competition")
        if not 0 <= lc <= MAX_LEARNING_COMPETITION:
            raise ValueError(f"learning_competition must be from 0 to {MAX_LEARNING_COMPETITION:g} (Akida's range), got {lc}")
        packed.flags.writeable = False
        object.__setattr__(self, "weights_packed", packed)
        object.__setattr__(self, "num_features", d)
        object.__setattr__(self, "num_weights", nw)
        object.__setattr__(self, "learning_competition", lc)
        object.__setattr__(self, "classes", classes)
        for name, value in arrays.items():
            value.flags.writeable = False  # frozen means frozen: a validated head stays valid
            object.__setattr__(self, name, value)

    @property
    def weights(self) -> np.ndarray:
        """(N, D) uint8 binary weights, one row per neuron."""
        return np.unpackbits(self.weights_packed, axis=1)[:, : self.num_features]

    @property
    def num_neurons(self) -> int:
        return int(self.weights_packed.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        """Neurons per class, (C,)."""
        return np.bincount(self.neuron_classes, minlength=self.num_classes)

    @property
    def is_uniform(self) -> bool:
        """Same number of neurons for every class: the layout Akida's learning needs."""
        counts = self.class_counts()
        return bool(counts.min() == counts.max() > 0)

    @property
    def neurons_per_class(self) -> int:
        if not self.is_uniform:
            raise ValueError(f"head has {self.class_counts().tolist()} neurons per class, not a uniform layout")
        return int(self.class_counts()[0])

    @property
    def learned(self) -> np.ndarray:
        """(N,) bool: neurons that have learned at least once.

        Akida marks a neuron that learned with threshold_learning > 0, except at a learning
        competition of about 0.99 or more, where it moves the weights and spends plasticity
        (thswap) but leaves threshold_learning at 0 (akida 2.19.3). A fresh neuron has
        thswap == num_weights, so a spent swap counts as learning too.
        """
        return (self.threshold_learning > 0) | (self.thswap < self.num_weights)

    def to_npz(self) -> bytes:
        """Serialise (for the wire and the audit log). Only the neurons and their parameters."""
        buf = io.BytesIO()
        np.savez(
            buf,
            format_version=np.array(FORMAT_VERSION),
            weights_packed=self.weights_packed,
            num_features=np.array(self.num_features),
            neuron_classes=self.neuron_classes,
            threshold=self.threshold,
            act_step=self.act_step,
            threshold_learning=self.threshold_learning,
            thswap=self.thswap,
            usage=self.usage,
            classes=np.array(self.classes, dtype=np.str_),
            num_weights=np.array(self.num_weights),
            learning_competition=np.array(self.learning_competition, dtype=np.float64),
        )
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> EdgeHead:
        """Inverse of to_npz; anything that is not a valid edge head is a ValueError naming why.

        Read with qana.head's npz reader: member and array sizes are checked before numpy
        allocates anything, so a small damaged file cannot claim gigabytes (the coordinator
        reads audited heads back when it resumes a run).
        """
        return read_npz(data, "edge head", cls._from_archive)

    @classmethod
    def _from_archive(cls, archive: np.lib.npyio.NpzFile) -> EdgeHead:
        members = {name.removesuffix(".npy") for name in archive.zip.namelist()}
        if members != NPZ_MEMBERS:
            odd = sorted(members ^ NPZ_MEMBERS)
            raise ValueError(f"its arrays are not those of an edge head (differ in {odd})")
        version = _integer(array_in(archive, "format_version"), "format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version} is not supported (expected {FORMAT_VERSION})")
        return cls(
            weights_packed=array_in(archive, "weights_packed"),
            num_features=_integer(array_in(archive, "num_features"), "num_features"),
            neuron_classes=array_in(archive, "neuron_classes"),
            threshold=array_in(archive, "threshold"),
            act_step=array_in(archive, "act_step"),
            threshold_learning=array_in(archive, "threshold_learning"),
            thswap=array_in(archive, "thswap"),
            usage=array_in(archive, "usage"),
            classes=names_in(archive, "classes"),
            num_weights=_integer(array_in(archive, "num_weights"), "num_weights"),
            learning_competition=_real(array_in(archive, "learning_competition"), "learning_competition"),
        )


# the arrays to_npz writes, and all that from_npz accepts
NPZ_MEMBERS = frozenset((
    "format_version", "weights_packed", "num_features", "neuron_classes", "threshold", "act_step",
    "threshold_learning", "thswap", "usage", "classes", "num_weights", "learning_competition",
))


def _head_from_rows(
    weights: np.ndarray,
    neuron_classes: np.ndarray,
    state: dict[str, np.ndarray],
    usage: np.ndarray,
    classes: tuple[str, ...],
    num_weights: int,
    learning_competition: float,
) -> EdgeHead:
    return EdgeHead(
        weights_packed=np.packbits(weights.astype(np.uint8), axis=1),
        num_features=int(weights.shape[1]),
        neuron_classes=neuron_classes,
        threshold=state["threshold"],
        act_step=state["act_step"],
        threshold_learning=state["threshold_learning"],
        thswap=state["thswap"],
        usage=usage,
        classes=classes,
        num_weights=num_weights,
        learning_competition=learning_competition,
    )


# --------------------------------------------------------------------------- input checks


def as_binary_features(features: np.ndarray, num_features: int | None = None, what: str = "features") -> np.ndarray:
    """(N, D) uint8 0/1 features; trailing (1, 1, D) dims are flattened. Anything else is a ValueError.

    Akida 1.0 learning takes 1-bit inputs only: a multi-bit feature (a v2 bundle's int8
    activations) would be silently clipped by the chip, so it is refused here instead.
    """
    f = np.asarray(features)
    if not (f.ndim == 2 or (f.ndim == 4 and f.shape[1:3] == (1, 1))):
        raise ValueError(f"{what} must be (N, D) or (N, 1, 1, D), got shape {f.shape}")
    f = f.reshape(f.shape[0], int(np.prod(f.shape[1:])))  # not -1: numpy cannot infer it for 0 rows
    if num_features is not None and f.shape[1] != num_features:
        raise ValueError(f"{what} have {f.shape[1]} dimensions, the edge head expects {num_features}")
    if f.dtype == np.bool_:
        return f.astype(np.uint8)
    if f.dtype.kind not in NUMBERS:
        raise ValueError(f"{what} must be numeric 0/1 spikes, got dtype {f.dtype}")
    if f.size and not np.isin(f, (0, 1)).all():
        bad = np.unique(f[~np.isin(f, (0, 1))])[:5]
        raise ValueError(
            f"{what} must be binary (0/1) spikes from an Akida 1.0 (v1) backbone; found values {bad.tolist()}"
            " (akida-edge learning needs the v1 bundle)"
        )
    return f.astype(np.uint8)


def _check_classes(classes: Iterable[str], what: str = "classes") -> tuple[str, ...]:
    """Class names as a tuple of strings (numbers or bytes are refused: they would be turned into
    names like "1" or "b'nv'" that never match the federation's classes)."""
    out = tuple(classes)
    if not out:
        raise ValueError("at least one class is needed")
    bad = [c for c in out if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[:3]!r}")
    out = tuple(str(c) for c in out)  # numpy str_ -> str
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate class names in {out}")
    return out


def _integer(value: Any, name: str) -> int:
    """An integral number as int; 16.7, True or "16" is an error, not 16, 1 or 16."""
    v = np.asarray(value)
    if v.ndim != 0 or not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(v)


def _real(value: Any, name: str) -> float:
    v = np.asarray(value)
    if v.ndim != 0 or v.dtype.kind not in NUMBERS or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(v)


def _check_settings(num_features: int, neurons_per_class: int, num_weights: int, learning_competition: float) -> None:
    if int(neurons_per_class) < 1:
        raise ValueError(f"neurons_per_class must be at least 1, got {neurons_per_class}")
    if not 1 <= int(num_weights) <= num_features:
        raise ValueError(f"num_weights must be in [1, {num_features}] (the feature dimension), got {num_weights}")
    if not math.isfinite(learning_competition) or not 0 <= learning_competition <= MAX_LEARNING_COMPETITION:
        raise ValueError(f"learning_competition must be from 0 to {MAX_LEARNING_COMPETITION:g} (Akida's range), got {learning_competition}")


def random_neurons(count: int, num_features: int, num_weights: int, rng: np.random.Generator) -> np.ndarray:
    """(count, D) uint8: fresh neurons, each connected to `num_weights` random inputs (as Akida does)."""
    keys = rng.random((count, num_features))
    idx = np.argpartition(keys, num_weights - 1, axis=1)[:, :num_weights] if count else np.zeros((0, num_weights), int)
    out = np.zeros((count, num_features), np.uint8)
    np.put_along_axis(out, idx, 1, axis=1)
    return out


# --------------------------------------------------------------------------- Akida models


def _edge_layer(units: int):
    import akida

    return akida.FullyConnected(units=int(units), name=EDGE_LAYER_NAME, weights_bits=1, activation=False)


def _compile(model, num_weights: int, num_classes: int, learning_competition: float) -> None:
    import akida

    model.compile(
        optimizer=akida.AkidaUnsupervised(
            num_weights=int(num_weights), num_classes=int(num_classes), learning_competition=float(learning_competition)
        )
    )


def feature_model(num_features: int, units: int, learning: tuple[int, int, float] | None = None):
    """A 1-layer Akida 1.0 model on the binary feature map: InputData(1, 1, D; 1 bit) + FullyConnected.

    `learning` = (num_weights, num_classes, learning_competition) compiles it for on-chip learning;
    None leaves it as an inference-only model.
    """
    import akida

    model = akida.Model()
    model.add(akida.InputData(input_shape=(1, 1, int(num_features)), input_bits=1, name="qana_edge_input"))
    model.add(_edge_layer(units))
    if learning is not None:
        _compile(model, *learning)
    return model


def bundle_edge_model(bundle: Bundle, units: int, learning: tuple[int, int, float] | None = None):
    """The bundle's backbone (its head popped) + a new 1-bit FullyConnected learning layer.

    This is the model that learns and predicts on images on the chip. It needs the v1 bundle:
    only Akida 1.0 learns on-chip, and only from binary (1-bit) spikes.
    """
    import akida

    from qana.runtime import HEAD_LAYER_TYPES, _layer_type, load_akida_model

    if bundle.target != "v1":
        raise ValueError(
            f"akida-edge learning needs the v1 bundle (Akida 1.0 learns on-chip); {bundle.path} targets {bundle.target!r}"
        )
    if bundle.test_time_views != 1:
        raise ValueError(
            f"{bundle.path} averages {bundle.test_time_views} test-time views per image; a model that learns on images "
            "sees one view, so learn from the runtime's features instead (qana.edge.learn_edge_head)"
        )
    model = load_akida_model(bundle)
    while model.layers and _layer_type(model.layers[-1]) in HEAD_LAYER_TYPES:
        model.pop_layer()
    if model.ip_version != akida.IpVersion.v1:
        raise ValueError(f"{bundle.model_path}: backbone is {model.ip_version}, edge learning needs IpVersion.v1")
    last = model.layers[-1]
    if int(last.parameters.act_bits) != 1:
        raise ValueError(f"{bundle.model_path}: backbone emits {last.parameters.act_bits}-bit activations; edge learning needs 1-bit spikes")
    if int(np.prod(last.output_dims)) != bundle.feature_dim:
        raise ValueError(f"{bundle.model_path}: backbone output {last.output_dims} does not match feature_dim {bundle.feature_dim}")
    model.add(_edge_layer(units))
    if learning is not None:
        _compile(model, *learning)
    return model


def _layer(model):
    layer = model.layers[-1]
    if layer.name != EDGE_LAYER_NAME:
        raise ValueError(f"the model's last layer is {layer.name!r}, not the edge learning layer")
    return layer


def read_layer_state(model) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(N, D) uint8 weights and the per-neuron variables of the model's edge layer."""
    layer = _layer(model)
    w = layer.get_variable("weights")
    weights = w.reshape(-1, w.shape[-1]).T.astype(np.uint8)
    names = set(layer.variables.names)
    n = weights.shape[0]
    state = {
        "threshold": layer.get_variable("threshold").astype(np.int32),
        "act_step": layer.get_variable("act_step").astype(np.float32),
        "threshold_learning": layer.get_variable("threshold_learning").astype(np.int32)
        if "threshold_learning" in names
        else np.full(n, FRESH_THRESHOLD_LEARNING, np.int32),
        "thswap": layer.get_variable("thswap").astype(np.int32) if "thswap" in names else np.zeros(n, np.int32),
    }
    return weights, state


def _fitting_layer(model, head: EdgeHead):
    """The model's edge layer, if it has one unit per neuron of `head` on its features (else ValueError)."""
    layer = _layer(model)
    shape = layer.get_variable("weights").shape
    if shape[-1] != head.num_neurons or shape[-2] != head.num_features:
        raise ValueError(
            f"edge head with {head.num_neurons} neurons on {head.num_features} features does not fit "
            f"a layer of {shape[-1]} units on {shape[-2]} inputs"
        )
    return layer


def write_edge_head(model, head: EdgeHead) -> None:
    """Store a head's neurons in the model's edge layer (learning state too, when it is compiled)."""
    layer = _fitting_layer(model, head)
    current = layer.get_variable("weights")
    layer.set_variable("weights", head.weights.T.reshape(current.shape).astype(current.dtype))
    layer.set_variable("threshold", head.threshold)
    layer.set_variable("act_step", head.act_step)
    names = set(layer.variables.names)
    for name in LEARNING_VARIABLES:
        if name in names:
            layer.set_variable(name, getattr(head, name))


def _set_weights(model, weights: np.ndarray) -> None:
    layer = _layer(model)
    current = layer.get_variable("weights")
    layer.set_variable("weights", weights.T.reshape(current.shape).astype(current.dtype))


def _potentials(weights: np.ndarray, state: dict[str, np.ndarray] | EdgeHead, x: np.ndarray) -> np.ndarray:
    get = state.__getitem__ if isinstance(state, dict) else lambda k: getattr(state, k)
    raw = x.astype(np.int32) @ weights.T.astype(np.int32) - get("threshold")[None, :]
    return raw.astype(np.float32) / get("act_step")[None, :]


def neuron_usage(potentials: np.ndarray, labels: np.ndarray, neuron_classes: np.ndarray) -> np.ndarray:
    """For each sample, the best-matching neuron of its own class wins one count (first on ties).

    The count is of inference wins among the class's neurons: how much of the class's local
    data the neuron represents. It is usually, not always, the neuron Akida's learning updates
    for that sample: learning also skips a learned neuron whose overlap does not exceed its
    threshold_learning.
    """
    usage = np.zeros(potentials.shape[1], np.int64)
    for c in np.unique(labels):
        cols = np.flatnonzero(neuron_classes == c)
        if cols.size == 0:
            continue
        rows = labels == c
        winners = cols[np.argmax(potentials[np.ix_(rows, cols)], axis=1)]
        np.add.at(usage, winners, 1)
    return usage


# --------------------------------------------------------------------------- learning


def _check_init(init: EdgeHead, classes: tuple[str, ...], neurons_per_class: int, num_weights: int, num_features: int) -> None:
    if init.num_features != num_features:
        raise ValueError(f"init head has {init.num_features} features, the inputs have {num_features}")
    if init.num_weights != int(num_weights):
        raise ValueError(f"init head has num_weights={init.num_weights}, asked for {num_weights}")
    if classes[: init.num_classes] != init.classes:
        raise ValueError(f"classes {classes} must start with the init head's classes {init.classes} (new classes are appended)")
    if not init.is_uniform or init.neurons_per_class != int(neurons_per_class):
        raise ValueError(
            f"init head has {init.class_counts().tolist()} neurons per class; continuing on-chip learning "
            f"needs exactly {neurons_per_class} for every class"
        )


def _learn(
    build,
    inputs: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    npc: int,
    num_weights: int,
    learning_competition: float,
    seed: int,
    init: EdgeHead | None,
    epochs: int,
    num_features: int,
) -> EdgeHead:
    """The one learning procedure, on whatever model `build(units, learning)` makes for `inputs`.

    The random draws (new neurons' weights, then one sample order per epoch) are the same
    whichever model is built, so learning on images through the whole bundle model and on their
    cached features through a 1-layer model give the same head. The arguments both entry points
    share are checked here, once, before anything is built.
    """
    y = class_indices(labels, len(inputs), len(classes)).astype(np.int32)
    _check_settings(num_features, npc, num_weights, learning_competition)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if init is not None:
        _check_init(init, classes, npc, num_weights, num_features)
    npc = int(npc)
    rng = np.random.default_rng(seed)
    d, nw, comp = num_features, int(num_weights), float(learning_competition)
    if init is not None:
        model = build(init.num_neurons, (nw, init.num_classes, comp))
        write_edge_head(model, init)
        extra = len(classes) - init.num_classes
        if extra:
            model.add_classes(extra)  # Akida's own class-incremental growth; then seed the new neurons
            weights, _ = read_layer_state(model)
            weights[init.num_neurons :] = random_neurons(extra * npc, d, nw, rng)
            _set_weights(model, weights)
    else:
        model = build(len(classes) * npc, (nw, len(classes), comp))
        _set_weights(model, random_neurons(len(classes) * npc, d, nw, rng))
    n = len(inputs)
    for _ in range(int(epochs)):
        order = rng.permutation(n)
        if n:
            model.fit(inputs[order], input_labels=y[order])
    weights, state = read_layer_state(model)
    neuron_classes = np.repeat(np.arange(len(classes), dtype=np.int32), npc)
    pot = model.predict(inputs).reshape(n, -1) if n else np.zeros((0, len(neuron_classes)), np.float32)
    usage = neuron_usage(pot, y, neuron_classes)
    return _head_from_rows(weights, neuron_classes, state, usage, classes, nw, comp)


def learn_edge_head(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Iterable[str],
    neurons_per_class: int,
    num_weights: int,
    learning_competition: float = 0.1,
    seed: int = 0,
    init: EdgeHead | None = None,
    epochs: int = 1,
) -> EdgeHead:
    """Learn an edge head with Akida's own algorithm (software backend) on cached binary features.

    `init` continues from a previous (e.g. merged global) head: its neurons and learning state
    are written into the layer; classes it lacks (`classes` must start with `init.classes`) are
    added with Akida's `add_classes`, as on the chip. New neurons' random weights come from
    `seed`, so a run is reproducible. Samples are presented in a seeded random order, `epochs`
    times (one pass is Akida's usual regime: plasticity decays as neurons learn). Usage counts
    are measured on the same features after learning.
    """
    classes = _check_classes(classes)
    x = as_binary_features(features, init.num_features if init is not None else None)
    n, d = x.shape

    def build(units: int, learning: tuple[int, int, float]):
        return feature_model(d, units, learning)

    return _learn(build, x.reshape(n, 1, 1, d), labels, classes, neurons_per_class, num_weights, learning_competition, seed, init, epochs, d)


def learn_edge_head_images(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Iterable[str],
    neurons_per_class: int,
    num_weights: int,
    learning_competition: float = 0.1,
    seed: int = 0,
    init: EdgeHead | None = None,
    epochs: int = 1,
) -> EdgeHead:
    """The same learning, on uint8 images through the whole bundle model (backbone + edge layer).

    This is literally on-chip learning (what a clinic with an Akida 1.0 device runs); with cached
    features `learn_edge_head` gives the identical head much faster.
    """
    classes = _check_classes(classes)
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or tuple(images.shape[1:]) != bundle.input_shape:
        raise ValueError(f"images must be (N, {', '.join(map(str, bundle.input_shape))}) uint8, got {images.shape} {images.dtype}")

    def build(units: int, learning: tuple[int, int, float]):
        return bundle_edge_model(bundle, units, learning)

    return _learn(build, images, labels, classes, neurons_per_class, num_weights, learning_competition, seed, init, epochs, bundle.feature_dim)


# --------------------------------------------------------------------------- prediction


def edge_potentials(head: EdgeHead, features: np.ndarray) -> np.ndarray:
    """Numpy reference of the chip: (f . w - threshold) / act_step per neuron, (N, neurons) float32."""
    x = as_binary_features(features, head.num_features)
    return _potentials(head.weights, head, x)


def edge_scores(head: EdgeHead, features: np.ndarray) -> np.ndarray:
    """Per-class scores (N, C): the best potential among each class's neurons (-inf if it has none)."""
    pot = edge_potentials(head, features)
    scores = np.full((pot.shape[0], head.num_classes), -np.inf, np.float32)
    for c in range(head.num_classes):
        cols = head.neuron_classes == c
        if cols.any():
            scores[:, c] = pot[:, cols].max(axis=1)
    return scores


def predict_edge_reference(head: EdgeHead, features: np.ndarray) -> np.ndarray:
    """Class indices by the numpy reference (the winning neuron's class; first neuron on ties)."""
    pot = edge_potentials(head, features)
    if pot.shape[0] == 0:
        return np.zeros(0, np.int64)
    return head.neuron_classes[np.argmax(pot, axis=1)].astype(np.int64)


def edge_inference_model(head: EdgeHead):
    """A 1-layer Akida model holding the head, for predicting from cached features."""
    model = feature_model(head.num_features, head.num_neurons)
    write_edge_head(model, head)
    return model


def predict_edge(head: EdgeHead, features: np.ndarray, model: Any = None, batch_size: int = 1024) -> np.ndarray:
    """Class indices as Akida computes them (software backend, or a mapped device via `model`)."""
    x = as_binary_features(features, head.num_features)
    if model is None:
        model = edge_inference_model(head)
    else:
        _fitting_layer(model, head)  # another head's model would answer with the wrong neurons
    n, d = x.shape
    if n == 0:
        return np.zeros(0, np.int64)
    out = [model.predict(x[i : i + batch_size].reshape(-1, 1, 1, d)) for i in range(0, n, batch_size)]
    pot = np.concatenate(out).reshape(n, -1)
    return head.neuron_classes[np.argmax(pot, axis=1)].astype(np.int64)


def edge_bundle_model(bundle: Bundle, head: EdgeHead, learning: bool = True):
    """The deployable model: bundle backbone + the head's neurons, compiled to keep learning when possible.

    Run `model.predict(images)`, take the arg-max neuron and map it with `head.neuron_classes`
    (`predict_edge_images`). A uniform head is compiled with its learning settings so the clinic
    can call `model.fit(images, input_labels=...)` on new patients directly on the chip.
    """
    if bundle.feature_dim != head.num_features:
        raise ValueError(f"edge head has {head.num_features} features, the bundle's backbone emits {bundle.feature_dim}")
    if bundle.colour_constancy != "none":  # the chip takes images here directly, past AkidaRuntime's preprocessing
        raise ValueError(f"this bundle's images need {bundle.colour_constancy} colour constancy, which the edge-learning model cannot apply")
    settings = (head.num_weights, head.num_classes, head.learning_competition) if learning and head.is_uniform else None
    model = bundle_edge_model(bundle, head.num_neurons, settings)
    write_edge_head(model, head)
    return model


def predict_edge_images(model, head: EdgeHead, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class indices for uint8 images run through an `edge_bundle_model`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    _fitting_layer(model, head)
    if len(images) == 0:
        return np.zeros(0, np.int64)
    out = [model.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    pot = np.concatenate(out).reshape(len(images), -1)
    return head.neuron_classes[np.argmax(pot, axis=1)].astype(np.int64)


# --------------------------------------------------------------------------- choosing settings


@dataclass(frozen=True)
class EdgeParams:
    """Learning settings chosen from data, with the evidence they were chosen on."""

    num_weights: int
    neurons_per_class: int
    learning_competition: float
    median_active: float  # median number of spikes per sample
    sweep: tuple[dict[str, float], ...] = field(default_factory=tuple)  # {neurons_per_class, learning_competition, score}


def choose_edge_params(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Iterable[str],
    groups: np.ndarray | None = None,
    neurons_grid: Sequence[int] = DEFAULT_NEURONS_GRID,
    competition_grid: Sequence[float] = DEFAULT_COMPETITION_GRID,
    val_fraction: float = 0.25,
    tolerance: float = 0.01,
    seed: int = 0,
) -> EdgeParams:
    """Choose num_weights, neurons per class and learning_competition from a clinic's own data.

    - num_weights: 1.2 x the median number of active bits (spikes) per sample, clipped to
      [1, D]. A neuron's potential is the overlap of its ones with the sample's spikes, so a
      neuron with about as many weights as a typical sample has spikes can match it fully;
      BrainChip's edge-learning tips recommend this estimate. No spikes at all is an error (a
      dead backbone cannot learn anything).
    - neurons per class and learning_competition: a small validation sweep. The data are split
      into train/validation (whole lesions when `groups` is given, stratified by class, as in
      qana.splits); every (neurons, competition) pair on the grids is learned on the train part
      and scored by balanced accuracy on the validation part (HAM10000 is dominated by `nv`,
      so plain accuracy would reward ignoring rare lesions). Grid values above the largest
      class's training count are skipped: only one neuron learns per sample, so extra neurons
      stay unused (if that skips the whole grid, that training count itself is tried). The
      chosen pair is the one with the fewest neurons whose score is within `tolerance` of the
      best (the start of the plateau: more neurons cost memory and time on the chip and dilute
      usage counts in the merge without helping).
    """
    from qana.metrics import classification_metrics
    from qana.splits import grouped_split

    classes = _check_classes(classes)
    x = as_binary_features(features)
    n, d = x.shape
    y = class_indices(labels, n, len(classes)).astype(np.int32)
    if n < 2:
        raise ValueError(f"at least 2 samples are needed to choose edge parameters, got {n}")
    active = x.sum(axis=1)
    median_active = float(np.median(active))
    if median_active <= 0:
        raise ValueError(
            "the features have no spikes in most samples (median 0 active bits): the backbone emits "
            "nothing for these inputs, so edge learning cannot learn from them"
        )
    num_weights = int(min(d, max(1, round(NUM_WEIGHTS_FACTOR * median_active))))
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    asked = sorted({int(k) for k in neurons_grid})
    if not asked or asked[0] < 1:
        raise ValueError(f"neurons_grid must hold neuron counts >= 1, got {list(neurons_grid)}")
    group_keys = np.arange(n) if groups is None else np.asarray(groups)
    train_idx, val_idx = grouped_split(y, group_keys, (1.0 - val_fraction, val_fraction), seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(f"too few samples ({n}) for a train/validation split")
    max_count = int(np.bincount(y[train_idx], minlength=len(classes)).max())
    # counts above the largest class's training count cannot all learn; if that leaves nothing of
    # the caller's grid, the largest count that can (never a count the caller did not ask for otherwise)
    grid = [k for k in asked if k <= max_count] or [max_count]
    comps = sorted({float(c) for c in competition_grid})
    if not comps:
        raise ValueError("competition_grid is empty")
    sweep: list[dict[str, float]] = []
    for k in grid:
        for comp in comps:
            head = learn_edge_head(x[train_idx], y[train_idx], classes, k, num_weights, comp, seed)
            pred = predict_edge_reference(head, x[val_idx])
            score = classification_metrics(y[val_idx], pred, classes)["balanced_accuracy"]
            sweep.append({"neurons_per_class": k, "learning_competition": comp, "score": float(score)})
    best = max(s["score"] for s in sweep)
    chosen = next(s for s in sweep if s["score"] >= best - tolerance)  # grid order: fewest neurons first
    top = max(
        (s for s in sweep if s["neurons_per_class"] == chosen["neurons_per_class"]),
        key=lambda s: s["score"],
    )
    return EdgeParams(num_weights, int(top["neurons_per_class"]), float(top["learning_competition"]), median_active, tuple(sweep))


def federation_edge_params(choices: Sequence[EdgeParams]) -> EdgeParams:
    """One learning configuration for a federation from every clinic's own `choose_edge_params`.

    Merging needs one num_weights (potentials of neurons with different weight counts are not
    comparable) and one neurons-per-class layout (so merged heads can be written back and go on
    learning). Clinics report only these three numbers, never data: the federation takes the
    median num_weights and neurons per class (robust to one unusual clinic) and the most common
    learning_competition (the smaller one on ties).
    """
    if not choices:
        raise ValueError("no clinic reported edge parameters")
    nw = int(round(float(np.median([c.num_weights for c in choices]))))
    npc = int(round(float(np.median([c.neurons_per_class for c in choices]))))
    counts: dict[float, int] = {}
    for c in choices:
        counts[float(c.learning_competition)] = counts.get(float(c.learning_competition), 0) + 1
    comp = min(counts, key=lambda v: (-counts[v], v))
    return EdgeParams(nw, max(1, npc), comp, float(np.median([c.median_active for c in choices])))


# --------------------------------------------------------------------------- federated merge


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.int32)
    b = b.astype(np.int32)
    return a.sum(1)[:, None] + b.sum(1)[None, :] - 2 * (a @ b.T)


def weighted_kmedoids(weights: np.ndarray, usage: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Usage-weighted k-medoids of binary vectors in Hamming distance.

    Minimises sum_i usage_i * hamming(w_i, nearest medoid) over medoids chosen among the w_i
    (so every kept vector is a real learned neuron, never a mixture). Seeded k-means++ start,
    then alternating assignment / medoid update until nothing changes. Returns (medoid row
    indices, cluster index of every row). Identical rows are one vector, so k can be at most the
    number of distinct rows (more medoids would be copies that never win a row).
    """
    weights = as_binary_features(weights, what="weights")
    n = weights.shape[0]
    usage = np.asarray(usage)
    if usage.shape != (n,) or usage.dtype.kind not in NUMBERS:
        raise ValueError(f"usage must be {n} numbers, one per row of weights, got {usage.shape} {usage.dtype}")
    if not (np.isfinite(usage).all() and (usage >= 0).all()):
        raise ValueError("usage must be finite and >= 0")
    distinct = len(np.unique(weights, axis=0)) if n else 0
    if not 1 <= k <= distinct:
        raise ValueError(f"k must be in [1, {distinct}] (the distinct rows), got {k}")
    dist = _hamming(weights, weights).astype(np.float64)
    w = usage.astype(np.float64)
    medoids = [int(np.argmax(w))]
    for _ in range(1, k):
        nearest = dist[:, medoids].min(axis=1)
        p = w * nearest**2
        p[medoids] = 0.0
        if p.sum() <= 0:  # every used neuron already coincides with a medoid: pick any other row
            p = np.isin(np.arange(n), medoids, invert=True).astype(np.float64)
        medoids.append(int(rng.choice(n, p=p / p.sum())))
    med = np.array(medoids)
    assign = np.argmin(dist[:, med], axis=1)
    for _ in range(max_iter):
        new = med.copy()
        for j in range(k):
            members = np.flatnonzero(assign == j)
            if members.size == 0:
                continue
            cost = (w[members][:, None] * dist[np.ix_(members, members)]).sum(axis=0)
            # prefer the current medoid on ties (stable), then the most used member
            best = members[np.lexsort((-w[members], (members != med[j]).astype(np.int64), cost))[0]]
            new[j] = best
        new_assign = np.argmin(dist[:, new], axis=1)
        if np.array_equal(new, med) and np.array_equal(new_assign, assign):
            break
        med, assign = new, new_assign
    return med, assign


def merge_classes(heads: Sequence[EdgeHead], classes: Iterable[str] | None = None) -> tuple[str, ...]:
    """The merged class order: `classes` (the global order) first, then new ones as they appear."""
    out = list(_check_classes(classes)) if classes is not None else []
    for head in heads:
        for c in head.classes:
            if c not in out:
                out.append(c)
    return tuple(out)


def merge_edge_heads(
    heads: Sequence[EdgeHead],
    budget_per_class: int | None = None,
    seed: int = 0,
    classes: Iterable[str] | None = None,
    keep_idle_neurons: bool = False,
) -> EdgeHead:
    """Federated merge of clinics' edge heads; bits are never averaged.

    For every class of the merged order (see `merge_classes`):
    1. pool that class's neurons from every head that has the class, one entry per distinct
       neuron: a neuron several clinics returned unchanged (they all started from the same
       global head) is one neuron, with their usage summed;
    2. keep the neurons that won local samples this round (usage > 0): all of them if they fit
       in `budget_per_class`, otherwise the medoids of usage-weighted k-medoids in Hamming
       distance (`weighted_kmedoids`). A kept neuron keeps its own per-neuron parameters and
       learning state and carries the summed usage of its cluster, so a mode seen by many
       patients at several clinics keeps a neuron and an outlier learned from one sample is
       what gets dropped;
    3. learned neurons that won nothing this round (usage 0; unweighted k-medoids if they do
       not all fit the budget) are kept where nobody used any neuron of the class (no clinic
       in this merge has images of it: it must not be forgotten), and, with
       `keep_idle_neurons`, in any spare budget. Pass it when a clinic of the federation is
       missing from this merge (partial participation, a timeout, a clinic offline): what it
       taught shows up in the others' replies as idle neurons, and dropping them would erase
       that clinic's modes in one round. With every clinic present an idle neuron is one that
       no clinic's data needs any more, and a fresh neuron is worth more;
    4. fill the rest with fresh neurons (seeded random weights, unlearned state), as Akida itself
       starts, so every class has the same neuron count and clinics can go on learning
       on-chip from the merged head. A class nobody has learned yet gets only fresh neurons.

    Kept neurons are ordered class-major, used ones most used first, then the idle learned
    ones, then the fresh ones. All heads must share num_features, num_weights and
    learning_competition (one federation, one learning configuration); the budget defaults to
    the heads' common neurons per class.
    """
    heads = list(heads)
    if not heads:
        raise ValueError("nothing to merge: no edge heads")
    if not all(isinstance(h, EdgeHead) for h in heads):
        raise ValueError("merge_edge_heads takes EdgeHead objects")
    first = heads[0]
    for i, h in enumerate(heads[1:], start=1):
        for name in ("num_features", "num_weights", "learning_competition"):
            if getattr(h, name) != getattr(first, name):
                raise ValueError(f"head {i} has {name}={getattr(h, name)}, head 0 has {getattr(first, name)}: they cannot be merged")
    if budget_per_class is None:
        sizes = {h.neurons_per_class for h in heads}
        if len(sizes) != 1:
            raise ValueError(f"heads have different neurons per class {sorted(sizes)}: give budget_per_class")
        budget_per_class = sizes.pop()
    budget = int(budget_per_class)
    if budget < 1:
        raise ValueError(f"budget_per_class must be at least 1, got {budget_per_class}")
    merged_classes = merge_classes(heads, classes)
    rng = np.random.default_rng(seed)
    d, nw = first.num_features, first.num_weights
    rows_w: list[np.ndarray] = []
    rows_state: dict[str, list[np.ndarray]] = {k: [] for k in _STATE_FIELDS}
    rows_usage: list[np.ndarray] = []
    for name in merged_classes:
        pool = _class_pool([h for h in heads if name in h.classes], name, d)
        kept, kept_usage = _keep_for_class(pool, budget, rng, keep_idle_neurons)
        fresh = budget - len(kept)
        fresh_state = {
            "threshold": np.full(fresh, FRESH_THRESHOLD, np.int32),
            "act_step": np.full(fresh, FRESH_ACT_STEP, np.float32),
            "threshold_learning": np.full(fresh, FRESH_THRESHOLD_LEARNING, np.int32),
            "thswap": np.full(fresh, nw, np.int32),
        }
        rows_w.append(np.concatenate([pool.weights[kept], random_neurons(fresh, d, nw, rng)]))
        rows_usage.append(np.concatenate([kept_usage, np.zeros(fresh, np.int64)]))
        for k in _STATE_FIELDS:
            rows_state[k].append(np.concatenate([pool.state[k][kept].astype(fresh_state[k].dtype), fresh_state[k]]))
    return _head_from_rows(
        np.concatenate(rows_w),
        np.repeat(np.arange(len(merged_classes), dtype=np.int32), budget),
        {k: np.concatenate(v) for k, v in rows_state.items()},
        np.concatenate(rows_usage),
        merged_classes,
        nw,
        first.learning_competition,
    )


_STATE_FIELDS = ("threshold", "act_step", "threshold_learning", "thswap")


@dataclass(frozen=True)
class _ClassPool:
    """One class's distinct neurons over every head that has the class (see merge_edge_heads)."""

    weights: np.ndarray  # (M, D) uint8, distinct rows, in order of first appearance
    usage: np.ndarray  # (M,) int64: summed over the copies
    learned: np.ndarray  # (M,) bool: some copy has learned
    state: dict[str, np.ndarray]  # per-neuron parameters of the most used copy (the first on ties)


def _class_pool(heads: Sequence[EdgeHead], name: str, d: int) -> _ClassPool:
    if not heads:
        return _ClassPool(np.zeros((0, d), np.uint8), np.zeros(0, np.int64), np.zeros(0, bool), {k: np.zeros(0) for k in _STATE_FIELDS})
    selections = [h.neuron_classes == h.classes.index(name) for h in heads]
    w_all = np.concatenate([h.weights[sel] for h, sel in zip(heads, selections)])
    u_all = np.concatenate([h.usage[sel] for h, sel in zip(heads, selections)])
    l_all = np.concatenate([h.learned[sel] for h, sel in zip(heads, selections)])
    s_all = {k: np.concatenate([getattr(h, k)[sel] for h, sel in zip(heads, selections)]) for k in _STATE_FIELDS}
    _, first_row, inverse = np.unique(w_all, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first_row, kind="stable")  # distinct rows in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse]
    m = len(order)
    usage = np.zeros(m, np.int64)
    np.add.at(usage, group, u_all)
    learned = np.zeros(m, bool)
    np.logical_or.at(learned, group, l_all)
    # the copy whose state is kept: the most used one, the first on ties
    best = np.full(m, -1, np.int64)
    for i in range(len(group)):
        g = group[i]
        if best[g] < 0 or u_all[i] > u_all[best[g]]:
            best[g] = i
    return _ClassPool(w_all[best], usage, learned, {k: v[best] for k, v in s_all.items()})


def _keep_for_class(pool: _ClassPool, budget: int, rng: np.random.Generator, keep_idle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows to keep, their usage): used neurons first (k-medoids if too many), then idle
    learned ones where the class had no use at all or `keep_idle` (see merge_edge_heads step 3)."""
    used = np.flatnonzero(pool.usage > 0)
    if len(used) > budget:
        medoids, assign = weighted_kmedoids(pool.weights[used], pool.usage[used], budget, rng)
        kept_used = used[medoids]
        used_usage = np.zeros(budget, np.int64)
        np.add.at(used_usage, assign, pool.usage[used])  # each medoid carries its cluster's usage
    else:
        kept_used, used_usage = used, pool.usage[used]
    order = np.argsort(-used_usage, kind="stable")
    kept_used, used_usage = kept_used[order], used_usage[order]
    spare = budget - len(kept_used) if (keep_idle or not len(used)) else 0
    idle = np.flatnonzero(pool.learned & (pool.usage == 0)) if spare else np.zeros(0, np.int64)
    if len(idle) > spare:
        medoids, _ = weighted_kmedoids(pool.weights[idle], np.ones(len(idle), np.int64), spare, rng)
        idle = idle[np.sort(medoids)]
    return np.concatenate([kept_used, idle]).astype(np.int64), np.concatenate([used_usage, np.zeros(len(idle), np.int64)])
