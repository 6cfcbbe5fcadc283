"""`learning = akida-edge` on the wire and on the coordinator: edge messages, rejections, the k-medoids rounds.

Clinics here are numpy/Akida-software stand-ins on binary toy spikes (no backbone): they speak
`protocols.edge_messages` both ways and learn with `qana.edge.learn_edge_head`, as
`client.edge_learning` does, so the coordinator receives what a real clinic sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from protocols import edge_messages as E
from protocols import messages as P
from qana import edge
from qana.bundle import Bundle, write_bundle
from qana.head import head_to_npz, init_head
from server.audit import AuditLog, EntryFilter
from server.edge_rounds import (
    EdgeCoordinator,
    EdgeMerge,
    EdgeSettings,
    class_additions,
    fresh_edge_head,
    read_run_config,
)
from server.federation import FederationError
from server.loopback import LoopbackGrid, roundtrip

# Toy spikes: 3 classes on 4 blocks of 15 bits (D = 60, so packing leaves 4 padding bits per row).
# Each class has two modes of two lit blocks; the non-IID clinics see different modes.
BLOCK = 15
D = 4 * BLOCK
MODES = {0: ((0, 1), (2, 3)), 1: ((0, 2), (1, 3)), 2: ((0, 3), (1, 2))}
CLASSES = ("akiec", "bcc", "bkl")
CLINIC_MODES = ({0: (0,), 1: (0,), 2: (0,)}, {0: (1,), 1: (1,), 2: (1,)}, {0: (0, 1), 1: (0, 1), 2: (0, 1)})


def toy(
    n: int, modes: dict[int, tuple[int, ...]], seed: int, flip: float = 0.05, classes: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n) if classes is None else rng.choice(np.array(classes), n)
    x = np.zeros((n, D), np.uint8)
    for i, c in enumerate(y):
        for block in MODES[int(c)][rng.choice(modes[int(c)])]:
            x[i, block * BLOCK : (block + 1) * BLOCK] = 1
    x ^= (rng.random((n, D)) < flip).astype(np.uint8)
    return x, y


def v1_bundle(path: Path, target: str = "v1") -> Bundle:
    """A bundle whose model file is a placeholder: the coordinator never runs the backbone."""
    model = path.parent / f".{path.name}-model.fbz"
    model.write_bytes(b"placeholder v1 model for edge coordinator tests")
    head = init_head(D, CLASSES, 1.0, seed=0)
    manifest = {"target": target, "classes": list(CLASSES), "input_shape": [16, 16, 3], "feature_dim": D, "note": "test"}
    return write_bundle(path, model, head_to_npz(head), manifest)


Tamper = Callable[[RecordDict], RecordDict]


def columns(y: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Toy labels (indices into CLASSES) as columns of a head with `classes`; -1 where it lacks the class."""
    return np.array([classes.index(CLASSES[int(c)]) if CLASSES[int(c)] in classes else -1 for c in y], np.int64)


@dataclass
class EdgeToyClinic:
    """A protocol-speaking akida-edge clinic on toy spikes (train 80% / evaluate 20%)."""

    name: str
    bundle: Bundle
    modes: dict[int, tuple[int, ...]]
    seed: int
    n: int = 150
    tamper: Tamper | None = None
    received: list[str] = field(default_factory=list)
    data_classes: tuple[int, ...] | None = None  # indices into CLASSES present in its data (None: all)
    new_class: str | None = None  # introduced from `new_from_round` on, as node-config new-classes does
    new_from_round: int = 1
    trained_classes: list[tuple[str, ...]] = field(default_factory=list)
    evaluated_classes: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        x, y = toy(self.n, self.modes, self.seed, classes=self.data_classes)
        cut = int(0.8 * self.n)
        self.x_train, self.y_train, self.x_eval, self.y_eval = x[:cut], y[:cut], x[cut:], y[cut:]

    def info(self, **kw) -> P.ClinicInfo:
        return P.ClinicInfo(self.name, P.PROTOCOL_VERSION, **kw)

    def __call__(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        self.received.append(kind)
        if kind == P.MSG_HELLO:
            P.validate_hello_ins(msg.content)
            return Message(P.hello_reply_content(self.info(cached_bundles=(self.bundle.bundle_id,), device="toy")), reply_to=msg)
        if kind == E.MSG_EDGE_PARAMS:
            bundle_id, seed = E.validate_edge_params_ins(msg.content)
            p = edge.choose_edge_params(self.x_train, self.y_train, CLASSES, seed=seed)
            content = E.edge_params_reply_content(
                len(self.y_train), p.num_weights, p.neurons_per_class, p.learning_competition, p.median_active, self.info(bundle_id=bundle_id)
            )
            return Message(content, reply_to=msg)
        if kind == E.MSG_TRAIN_EDGE:
            head, s = E.validate_train_edge_ins(msg.content, D)
            self.trained_classes.append(head.classes)
            classes = head.classes
            present = {CLASSES[int(c)] for c in self.y_train}
            if self.new_class and s.server_round >= self.new_from_round and self.new_class in present and self.new_class not in classes:
                classes = (*classes, self.new_class)
            y = columns(self.y_train, classes)
            known = y >= 0  # images of classes the head lacks are left out, as client.edge_learning does
            learned = edge.learn_edge_head(
                self.x_train[known], y[known], classes, s.neurons_per_class, s.num_weights, s.learning_competition,
                seed=s.seed + s.server_round, init=head, epochs=s.epochs,
            )
            metrics = {P.M_NUM_EXAMPLES: int(known.sum()), P.M_TRAIN_TOP1: 1.0, P.M_DEVICE_AGREEMENT: 1.0}
            content = E.train_edge_reply_content(learned, metrics, self.info(bundle_id=s.bundle_id))
            return Message(self.tamper(content) if self.tamper else content, reply_to=msg)
        if kind == E.MSG_EVALUATE_EDGE:
            head, s = E.validate_evaluate_edge_ins(msg.content, D)
            self.evaluated_classes.append(head.classes)
            y = columns(self.y_eval, head.classes)
            known = y >= 0
            pred = edge.predict_edge_reference(head, self.x_eval[known])
            top1 = float(np.mean(pred == y[known]))
            metrics = {P.M_NUM_EXAMPLES: int(known.sum()), P.M_TOP1: top1, P.M_MACRO_F1: top1, P.M_BALANCED_ACCURACY: top1,
                       P.M_DEVICE_AGREEMENT: 1.0}
            return Message(P.evaluate_reply_content(metrics, self.info(bundle_id=s.bundle_id, head_id=s.head_id)), reply_to=msg)
        raise ValueError(f"unexpected message type {kind}")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a Grid need Flower's task identity (LoopbackGrid sets it)."""
    LoopbackGrid({})


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return v1_bundle(tmp_path / "bundle")


@pytest.fixture
def audit(tmp_path: Path):
    log = AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "audit_key.pem")
    yield log
    log.close()


def run_config(tmp_path: Path, bundle: Bundle, **overrides) -> dict:
    config = {
        "bundle": str(bundle.path), "num-rounds": 2, "learning": "akida-edge", "initial-head": "random",
        "state-dir": str(tmp_path / "state"), "round-timeout": 30.0, "wait-for-clinics": 0.0, "min-clinics": 2,
    }
    config.update(overrides)
    return config


def coordinator(tmp_path, bundle, audit, nodes, **overrides) -> EdgeCoordinator:
    settings, edge_settings = read_run_config(run_config(tmp_path, bundle, **overrides), run_id="edge-run")
    assert edge_settings is not None
    return EdgeCoordinator(LoopbackGrid(nodes), settings, audit, edge_settings)


ALL_MODES = {0: (0, 1), 1: (0, 1), 2: (0, 1)}


def toy_clinics(bundle: Bundle, modes=CLINIC_MODES, **kw) -> dict[int, EdgeToyClinic]:
    return {200 + i: EdgeToyClinic(f"clinic-{i}", bundle, m, seed=i, **kw) for i, m in enumerate(modes)}


def accuracy(head: edge.EdgeHead) -> float:
    x, y = toy(900, ALL_MODES, seed=99)
    return float(np.mean(edge.predict_edge_reference(head, x) == y))


# --------------------------------------------------------------------------- protocol


@pytest.fixture(scope="module")
def learned() -> edge.EdgeHead:
    x, y = toy(120, CLINIC_MODES[2], seed=5)
    return edge.learn_edge_head(x, y, CLASSES, 3, 25, 0.1, seed=1)


def spec_of(head: edge.EdgeHead) -> E.EdgeSpec:
    return E.EdgeSpec(D, CLASSES, head.num_weights, head.neurons_per_class, head.learning_competition)


def reply(head: edge.EdgeHead, n: int | None = None) -> RecordDict:
    metrics = {P.M_NUM_EXAMPLES: int(head.usage.sum()) if n is None else n, P.M_TRAIN_TOP1: 0.9, P.M_DEVICE_AGREEMENT: 1.0}
    return E.train_edge_reply_content(head, metrics, P.ClinicInfo("clinic-x", P.PROTOCOL_VERSION, bundle_id="ab" * 32))


def test_edge_head_crosses_the_wire_exactly_and_only_as_typed_arrays(learned) -> None:
    msg = Message(reply(learned), dst_node_id=1, message_type=E.MSG_TRAIN_EDGE)
    decoded, size = roundtrip(msg)
    got = E.validate_train_edge_reply(decoded.content, spec_of(learned), "ab" * 32)
    for k in ("weights_packed", "neuron_classes", "threshold", "act_step", "threshold_learning", "thswap", "usage"):
        assert np.array_equal(getattr(got.head, k), getattr(learned, k)), k
        assert getattr(got.head, k).dtype == getattr(learned, k).dtype, k
    assert (got.head.num_weights, got.head.learning_competition) == (learned.num_weights, learned.learning_competition)
    assert got.head.classes == CLASSES and got.num_examples == int(learned.usage.sum())
    described = P.describe_content(decoded.content)
    assert set(described) == {E.REC_EDGE, E.REC_EDGE_META, P.REC_METRICS, P.REC_CLINIC}
    items = described[E.REC_EDGE]["items"]
    assert items[E.ARR_WEIGHTS_PACKED] == {"dtype": "uint8", "shape": [9, 8], "stype": "numpy.ndarray", "nbytes": items[E.ARR_WEIGHTS_PACKED]["nbytes"]}
    assert {k: v["dtype"] for k, v in items.items()} == {k: str(v) for k, v in E.EDGE_ARRAYS.items()}
    # one bit per weight: the packed weights are D/8 bytes per neuron, the whole message stays small
    assert size < 8_000
    # the instruction direction too
    settings = E.EdgeTrainSettings(3, "ab" * 32, "cd" * 32, 25, 3, 0.1, 1, 7)
    ins, _ = roundtrip(Message(E.train_edge_content(learned, settings), dst_node_id=1, message_type=E.MSG_TRAIN_EDGE))
    head, got_settings = E.validate_train_edge_ins(ins.content, D, CLASSES)
    assert got_settings == settings and np.array_equal(head.weights, learned.weights)
    # a negative seed used to fail inside the Akida learning code ("expected non-negative integer")
    bad = E.train_edge_content(learned, settings)
    bad[P.REC_CONFIG][P.K_SEED] = -3
    with pytest.raises(P.ProtocolError, match="seed=-3 must be from 0"):
        E.validate_train_edge_ins(bad, D, CLASSES)
    with pytest.raises(P.ProtocolError, match="seed=-3 must be from 0"):
        E.validate_edge_params_ins(E.edge_params_content("ab" * 32, -3))


def _replace_array(name: str, value: np.ndarray) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        arrays = dict(content[E.REC_EDGE].items())
        arrays[name] = Array(value)
        out = RecordDict(dict(content.items()))
        out[E.REC_EDGE] = ArrayRecord(arrays)
        return out

    return tamper


def _set_meta(key: str, value) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        meta = ConfigRecord(dict(content[E.REC_EDGE_META].items()))
        meta[key] = value
        out = RecordDict(dict(content.items()))
        out[E.REC_EDGE_META] = meta
        return out

    return tamper


def _set_metric(key: str, value) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        metrics = MetricRecord(dict(content[P.REC_METRICS].items()))
        metrics[key] = value
        out = RecordDict(dict(content.items()))
        out[P.REC_METRICS] = metrics
        return out

    return tamper


def _extra_record(content: RecordDict) -> RecordDict:
    out = RecordDict(dict(content.items()))
    out["features"] = ArrayRecord({"x": Array(np.zeros((2, D), np.uint8))})
    return out


def _bit(learned: edge.EdgeHead, row: int, col: int) -> np.ndarray:
    w = learned.weights.copy()
    w[row, col] ^= 1
    return np.packbits(w, axis=1)


def _padding_bit(learned: edge.EdgeHead) -> np.ndarray:
    packed = learned.weights_packed.copy()
    packed[0, -1] |= 1  # bit 63 > D = 60
    return packed


MALFORMED = [
    ("dtype", lambda h: _replace_array(E.ARR_WEIGHTS_PACKED, h.weights_packed.astype(np.int8))),
    ("exactly num-weights=25 ones", lambda h: _replace_array(E.ARR_WEIGHTS_PACKED, _bit(h, 0, int(np.flatnonzero(h.weights[0] == 0)[0])))),
    ("beyond the 60 features", lambda h: _replace_array(E.ARR_WEIGHTS_PACKED, _padding_bit(h))),
    ("act-step must be finite", lambda h: _replace_array(E.ARR_ACT_STEP, np.where(np.arange(9) == 2, np.nan, h.act_step).astype(np.float32))),
    ("class-major layout", lambda h: _replace_array(E.ARR_NEURON_CLASSES, h.neuron_classes[::-1].copy())),
    ("shape (6,)", lambda h: _replace_array(E.ARR_THRESHOLD, h.threshold[:6].copy())),
    ("usage cannot be negative", lambda h: _replace_array(E.ARR_USAGE, -h.usage)),
    ("neuron usage sums to", lambda h: _replace_array(E.ARR_USAGE, h.usage * 10)),
    ("do not start with the round's classes", lambda h: _set_meta(E.K_CLASSES, ["akiec", "bcc", "mel"])),
    ("do not start with the round's classes", lambda h: _set_meta(E.K_CLASSES, ["bcc", "akiec", "bkl"])),
    ("listed twice: akiec", lambda h: _set_meta(E.K_CLASSES, ["akiec", "bcc", "akiec"])),
    ("class name 'b kl' must be", lambda h: _set_meta(E.K_CLASSES, ["akiec", "bcc", "b kl"])),
    ("classes must be a list", lambda h: _set_meta(E.K_CLASSES, "akiec,bcc,bkl")),
    ("adds 17 classes at once (at most 16)", lambda h: _set_meta(E.K_CLASSES, [*CLASSES, *(f"new{i}" for i in range(17))])),
    # a class appended in the meta without its neurons: the layout no longer fits the class list
    ("9 neurons for 4 classes", lambda h: _set_meta(E.K_CLASSES, [*CLASSES, "df"])),
    ("num-weights 24, the round uses 25", lambda h: _set_meta(E.K_NUM_WEIGHTS, 24)),
    ("does not allow: colour", lambda h: _set_meta("colour", "red")),
    ("does not allow: features", lambda h: _extra_record),
    ("num-examples", lambda h: _set_metric(P.M_NUM_EXAMPLES, -1)),
]


@pytest.mark.parametrize(("reason", "make"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_edge_update_is_a_protocol_error_naming_the_problem(learned, reason, make) -> None:
    content = make(learned)(reply(learned))
    decoded, _ = roundtrip(Message(content, dst_node_id=1, message_type=E.MSG_TRAIN_EDGE))
    with pytest.raises(P.ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        E.validate_train_edge_reply(decoded.content, spec_of(learned), "ab" * 32)


def test_a_reply_may_append_new_classes_after_the_rounds_classes(learned) -> None:
    """Class-incremental: the round's classes first, then a class the clinic introduces with its own neurons."""
    x, y = toy(120, CLINIC_MODES[2], seed=6)
    grown = edge.learn_edge_head(x, y, (*CLASSES[:2], "df"), 3, 25, 0.1, seed=2, init=_first_two(learned))
    got = E.validate_train_edge_reply(reply(grown), E.EdgeSpec(D, CLASSES[:2], 25, 3, 0.1), "ab" * 32)
    assert got.head.classes == (*CLASSES[:2], "df") and got.head.class_counts().tolist() == [3, 3, 3]
    assert got.head.usage[got.head.neuron_classes == 2].sum() == np.sum(y == 2)  # the new neurons learned df's images
    # instructions carry the federation's current classes, whatever the bundle's
    settings = E.EdgeTrainSettings(2, "ab" * 32, "cd" * 32, 25, 3, 0.1, 1, 0)
    head, _ = E.validate_train_edge_ins(E.train_edge_content(got.head, settings), D)
    assert head.classes == (*CLASSES[:2], "df")
    with pytest.raises(P.ProtocolError, match=r"edge head classes \['akiec', 'bcc', 'df'\] are not the run's classes"):
        E.validate_train_edge_ins(E.train_edge_content(got.head, settings), D, CLASSES)


def _first_two(head: edge.EdgeHead) -> edge.EdgeHead:
    """The head's neurons of its first two classes (a federation that has not got the third yet)."""
    keep = head.neuron_classes < 2
    return edge.EdgeHead(
        head.weights_packed[keep], head.num_features, head.neuron_classes[keep], head.threshold[keep], head.act_step[keep],
        head.threshold_learning[keep], head.thswap[keep], head.usage[keep], head.classes[:2], head.num_weights,
        head.learning_competition,
    )


def test_neurons_per_class_of_the_round_is_enforced(learned) -> None:
    other = E.EdgeSpec(D, CLASSES, learned.num_weights, 4, learned.learning_competition)
    with pytest.raises(P.ProtocolError, match="3 neurons per class, the round uses 4"):
        E.validate_train_edge_reply(reply(learned), other, "ab" * 32)


# --------------------------------------------------------------------------- settings


def test_run_config_learning_and_edge_keys_are_checked(tmp_path, bundle) -> None:
    settings, e = read_run_config({"learning": "akida-edge", "edge-num-weights": 20, "edge-learning-competition": 0.3}, "r")
    assert settings.learning == "akida-edge"
    assert e == EdgeSettings(num_weights=20, neurons_per_class=None, learning_competition=0.3, epochs=1) and e.needs_clinics
    assert read_run_config({}, "r") == (read_run_config({"learning": "gradient"}, "r")[0], None)
    with pytest.raises(FederationError, match="learning='edge': use gradient or akida-edge"):
        read_run_config({"learning": "edge"}, "r")
    with pytest.raises(FederationError, match="edge-num-weights only apply to learning akida-edge"):
        read_run_config({"edge-num-weights": 20}, "r")
    # what a deployed Flower app passes for a gradient run: every declared key with its default
    from server.edge_rounds import EDGE_RUN_CONFIG_DEFAULTS

    assert read_run_config(dict(EDGE_RUN_CONFIG_DEFAULTS), "r")[1] is None
    with pytest.raises(FederationError, match="edge-neurons-per-class=-2"):
        read_run_config({"learning": "akida-edge", "edge-neurons-per-class": -2}, "r")


def test_akida_edge_needs_a_v1_bundle_and_fresh_or_audited_neurons(tmp_path, audit) -> None:
    v2 = v1_bundle(tmp_path / "v2bundle", target="v2")
    with pytest.raises(FederationError, match="needs a v1 bundle"):
        coordinator(tmp_path, v2, audit, {}).run()
    with pytest.raises(FederationError, match="initial-head bundle does not apply"):
        coordinator(tmp_path, v2, audit, {}, **{"initial-head": "bundle"})


# --------------------------------------------------------------------------- rounds


def test_edge_rounds_choose_settings_merge_neurons_and_audit_every_head(tmp_path, bundle, audit) -> None:
    nodes = toy_clinics(bundle, modes=(ALL_MODES,) * 3)  # every clinic sees both modes: each asks for >= 2 neurons
    result = coordinator(tmp_path, bundle, audit, nodes).run()
    heads = [e for e in audit.entries() if e.kind == "head"]
    assert [e.version for e in heads] == ["h1", "h2", "h3"] == [r.head_version for r in result.rounds]
    # round 0 asked the clinics for their settings (auto) and recorded them with the fresh head
    assert all(n.received.count(E.MSG_EDGE_PARAMS) == 1 for n in nodes.values())
    h1 = audit.version("h1")
    cfg = h1.strategy_config
    assert h1.strategy == "akida-edge-kmedoids" and cfg["settings_from"].startswith("auto")
    choices = [edge.choose_edge_params(n.x_train, n.y_train, CLASSES, seed=0) for n in nodes.values()]
    expected = edge.federation_edge_params(choices)
    assert (cfg["num_weights"], cfg["neurons_per_class"], cfg["learning_competition"]) == (
        expected.num_weights, expected.neurons_per_class, expected.learning_competition)
    assert sorted(h1.aggregate_metrics["edge_clinic_choices"]) == ["clinic-0", "clinic-1", "clinic-2"]
    first = edge.EdgeHead.from_npz(audit.artifact_of("h1"))
    last = edge.EdgeHead.from_npz(audit.artifact_of("h3"))
    assert not first.learned.any() and last.is_uniform and last.neurons_per_class == expected.neurons_per_class
    assert expected.neurons_per_class >= 2
    # fresh neurons are at chance (1/3); two rounds of learning and merging separate the classes
    assert accuracy(last) > max(0.75, accuracy(first) + 0.3), (accuracy(first), accuracy(last))
    assert result.rounds[-1].evaluate_metrics["top1"] > 0.75
    assert result.rounds[-1].evaluate_metrics["num-examples"] == 3 * 30
    h3 = audit.version("h3")
    assert h3.parent == "h2" and h3.backbone == "b1" and h3.round == 2
    assert sorted(p.clinic_id for p in h3.participants) == ["clinic-0", "clinic-1", "clinic-2"]
    assert sum(d.version == "h3" for d in audit.deployments()) == 3
    assert audit.verify().ok


def test_merged_neurons_are_learned_neurons_never_averaged(tmp_path, bundle, audit) -> None:
    nodes = toy_clinics(bundle)
    sent: list[edge.EdgeHead] = []

    def spy(clinic: EdgeToyClinic):
        def handler(msg: Message) -> Message:
            out = clinic(msg)
            if msg.metadata.message_type == E.MSG_TRAIN_EDGE:
                sent.append(E.edge_head_from_records(out.content, "spy", D, CLASSES))
            return out
        return handler

    grid_nodes = {k: spy(v) for k, v in nodes.items()}
    coordinator(tmp_path, bundle, audit, grid_nodes, **{"num-rounds": 1, "edge-num-weights": 25,
                "edge-neurons-per-class": 2, "edge-learning-competition": 0.1}).run()
    merged = edge.EdgeHead.from_npz(audit.artifact_of("h2"))
    pool = {row.tobytes() for h in sent for row in h.weights[h.usage > 0]}
    used = merged.usage > 0
    assert used.any() and all(row.tobytes() in pool for row in merged.weights[used])
    # clinics 0 and 1 each saw one mode per class: the merge keeps a neuron for each mode
    assert accuracy(merged) > 0.9, accuracy(merged)
    # explicit settings: nobody was asked
    assert all(E.MSG_EDGE_PARAMS not in n.received for n in nodes.values())
    assert audit.version("h1").strategy_config["settings_from"] == "run config"


def test_a_malformed_edge_update_is_rejected_recorded_and_the_round_goes_on(tmp_path, bundle, audit) -> None:
    nodes = toy_clinics(bundle)
    nodes[202].tamper = _replace_array(E.ARR_ACT_STEP, np.full(6, -1.0, np.float32))
    result = coordinator(tmp_path, bundle, audit, nodes, **{"num-rounds": 1, "edge-num-weights": 25,
                         "edge-neurons-per-class": 2, "edge-learning-competition": 0.1}).run()
    r1 = result.rounds[1]
    assert r1.head_version == "h2" and sorted(r1.participants) == ["clinic-0", "clinic-1"]
    assert "act-step must be finite and at least" in r1.rejected["clinic-2"]
    rejections = audit.entries(EntryFilter(kinds=("rejection",)))
    assert [r.body["clinic_id"] for r in rejections] == ["clinic-2"]


FIXED = {"edge-num-weights": 25, "edge-neurons-per-class": 2, "edge-learning-competition": 0.1}


def test_a_class_introduced_by_one_clinic_reaches_every_clinic_and_the_audit_log(tmp_path, bundle, audit) -> None:
    """Class-incremental edge rounds: the federation starts without bkl; clinic-0 brings it in round 2."""
    old = CLASSES[:2]
    nodes = {
        200: EdgeToyClinic("clinic-0", bundle, ALL_MODES, seed=0, n=240, new_class="bkl", new_from_round=2),
        201: EdgeToyClinic("clinic-1", bundle, ALL_MODES, seed=1, data_classes=(0, 1)),
        202: EdgeToyClinic("clinic-2", bundle, ALL_MODES, seed=2, data_classes=(0, 1)),
    }
    result = coordinator(tmp_path, bundle, audit, nodes, **{"num-rounds": 3, "initial-classes": ",".join(old), **FIXED}).run()
    heads = {e.version: edge.EdgeHead.from_npz(audit.artifact_of(e.version)) for e in audit.entries() if e.kind == "head"}
    grown = (*old, "bkl")
    assert [heads[r.head_version].classes for r in result.rounds] == [old, old, grown, grown]
    assert "initial-classes" in audit.version(result.rounds[0].head_version).note
    # every clinic trains from and evaluates the grown head after round 2 (the class reached all of them)
    for clinic in nodes.values():
        assert clinic.trained_classes == [old, old, grown]
        assert clinic.evaluated_classes == [old, old, grown, grown]
    additions = [e for e in audit.entries() if e.kind == "class_addition"]
    assert [(e.body["class_name"], e.body["clinic_id"], e.body["round"]) for e in additions] == [("bkl", "clinic-0", 2)]
    h3 = audit.version(result.rounds[2].head_version)
    assert h3.note == "class-incremental merge: added bkl; classes now akiec, bcc, bkl"
    assert audit.version(result.rounds[3].head_version).note is None
    assert audit.verify().ok
    # the merged head recognises bkl (its neurons are clinic-0's), the old classes stay as good as before it arrived
    final, before = heads[result.rounds[-1].head_version], heads[result.rounds[1].head_version]
    assert final.is_uniform and final.neurons_per_class == 2 and final.learned[final.neuron_classes == 2].all()
    x, y = toy(900, ALL_MODES, seed=99)
    is_new = y == 2
    assert np.mean(edge.predict_edge_reference(final, x[is_new]) == 2) > 0.8
    acc_before = np.mean(edge.predict_edge_reference(before, x[~is_new]) == y[~is_new])
    acc_after = np.mean(edge.predict_edge_reference(final, x[~is_new]) == y[~is_new])
    assert acc_before > 0.9 and acc_after >= acc_before - 0.05, (acc_before, acc_after)


def test_new_classes_from_several_clinics_are_appended_in_clinic_id_order(tmp_path, bundle, audit) -> None:
    """Two clinics introduce two classes in the same round: the order is by clinic id, not by arrival."""
    nodes = {
        200: EdgeToyClinic("clinic-b", bundle, ALL_MODES, seed=0, data_classes=(0, 2), new_class="bkl"),
        201: EdgeToyClinic("clinic-a", bundle, ALL_MODES, seed=1, data_classes=(0, 1), new_class="bcc"),
    }
    result = coordinator(tmp_path, bundle, audit, nodes, **{"num-rounds": 1, "initial-classes": "akiec", **FIXED}).run()
    final = edge.EdgeHead.from_npz(audit.artifact_of(result.final_head_version))
    assert final.classes == ("akiec", "bcc", "bkl")
    additions = [(e.body["class_name"], e.body["clinic_id"]) for e in audit.entries() if e.kind == "class_addition"]
    assert additions == [("bcc", "clinic-a"), ("bkl", "clinic-b")]
    # the merge itself does not depend on the order of the replies it is given
    start = fresh_edge_head(D, ("akiec",), edge.EdgeParams(25, 2, 0.1, 0.0), seed=0)
    replies = []
    for name, cls in (("clinic-b", 2), ("clinic-a", 1)):
        x, y = toy(100, ALL_MODES, seed=cls, classes=(0, cls))
        head = edge.learn_edge_head(x, np.where(y == 0, 0, 1), ("akiec", CLASSES[cls]), 2, 25, 0.1, init=start)
        replies.append(E.EdgeTrainReply(P.ClinicInfo(name, P.PROTOCOL_VERSION), head, {P.M_NUM_EXAMPLES: 100}))
    merge, spec = EdgeMerge(), E.EdgeSpec(D, ("akiec",), 25, 2, 0.1)
    one, other = merge.aggregate_train(1, replies, spec), merge.aggregate_train(1, replies[::-1], spec)
    assert one.classes == ("akiec", "bcc", "bkl") and one.to_npz() == other.to_npz()
    assert class_additions(("akiec",), replies) == [("bcc", "clinic-a"), ("bkl", "clinic-b")]


def test_a_clinic_missing_from_a_round_keeps_its_neurons_in_the_merge() -> None:
    """Clinic a saw mode 0 of every class, clinic b mode 1. A round that merges a's head alone must
    keep b's neurons (idle in a's reply) while there is room; a round with both keeps only used ones."""
    one_mode = ({0: (0,), 1: (0,), 2: (0,)}, {0: (1,), 1: (1,), 2: (1,)})
    data = {name: toy(200, modes, seed=i) for i, (name, modes) in enumerate(zip(("clinic-a", "clinic-b"), one_mode))}
    spec = E.EdgeSpec(D, CLASSES, 25, 4, 0.1)
    merge = EdgeMerge()

    def reply(name: str, init: edge.EdgeHead, seed: int) -> E.EdgeTrainReply:
        head = edge.learn_edge_head(*data[name], CLASSES, 4, 25, 0.1, seed=seed, init=init)
        return E.EdgeTrainReply(P.ClinicInfo(name, P.PROTOCOL_VERSION), head, {P.M_NUM_EXAMPLES: 200})

    start = fresh_edge_head(D, CLASSES, edge.EdgeParams(25, 4, 0.1, 0.0), seed=0)
    g1 = merge.aggregate_train(1, [reply("clinic-a", start, 1), reply("clinic-b", start, 2)], spec)
    mode1 = toy(600, one_mode[1], seed=91)
    assert np.mean(edge.predict_edge_reference(g1, mode1[0]) == mode1[1]) > 0.95
    g2 = merge.aggregate_train(2, [reply("clinic-a", g1, 3)], spec)
    assert np.mean(edge.predict_edge_reference(g2, mode1[0]) == mode1[1]) > 0.95, "clinic b's modes were forgotten"
    g3 = merge.aggregate_train(3, [reply("clinic-a", g2, 4), reply("clinic-b", g2, 5)], spec)
    assert not g3.learned[g3.usage == 0].any(), "with every clinic present, idle neurons give way to fresh ones"


def test_initial_classes_must_be_classes_of_the_bundle(tmp_path, bundle, audit) -> None:
    with pytest.raises(FederationError, match=r"initial-classes scc are not classes of the bundle \(akiec, bcc, bkl\)"):
        coordinator(tmp_path, bundle, audit, toy_clinics(bundle), **{"initial-classes": "akiec,scc", **FIXED}).run()


def test_a_malformed_class_list_is_rejected_and_the_round_goes_on(tmp_path, bundle, audit) -> None:
    nodes = toy_clinics(bundle)
    nodes[202].tamper = _set_meta(E.K_CLASSES, ["bcc", "akiec", "bkl"])
    result = coordinator(tmp_path, bundle, audit, nodes, **{"num-rounds": 1, **FIXED}).run()
    r1 = result.rounds[1]
    assert r1.head_version == "h2" and sorted(r1.participants) == ["clinic-0", "clinic-1"]
    assert "do not start with the round's classes ['akiec', 'bcc', 'bkl']" in r1.rejected["clinic-2"]
    assert not [e for e in audit.entries() if e.kind == "class_addition"]


def test_initial_head_auto_continues_the_audited_edge_head(tmp_path, bundle, audit) -> None:
    nodes = toy_clinics(bundle)
    fixed = {"num-rounds": 1, "edge-num-weights": 25, "edge-neurons-per-class": 2, "edge-learning-competition": 0.1}
    coordinator(tmp_path, bundle, audit, nodes, **fixed).run()
    again = coordinator(tmp_path, bundle, audit, toy_clinics(bundle), **{**fixed, "initial-head": "auto", "edge-num-weights": 0}).run()
    assert again.initial_head_version == "h2" and again.final_head_version == "h3"
    assert audit.version("h3").parent == "h2"


def test_a_continued_run_remembers_the_clinics_of_the_head_it_continues(tmp_path, bundle, audit) -> None:
    """Without them, a clinic missing from the first round after a restart had its neurons dropped."""
    fixed = {"num-rounds": 1, "edge-num-weights": 25, "edge-neurons-per-class": 2, "edge-learning-competition": 0.1}
    coordinator(tmp_path, bundle, audit, toy_clinics(bundle), **fixed).run()
    two = {k: v for k, v in toy_clinics(bundle).items() if k != 202}
    again = coordinator(tmp_path, bundle, audit, two, **{**fixed, "initial-head": "auto"})
    again.run()
    assert again.merge.clinics_merged == {"clinic-0", "clinic-1", "clinic-2"}


# --------------------------------------------------------------------------- qana-server start --learning

FIXTURES = Path(__file__).parent / "fixtures" / "bundles"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning", "akida-edge", "--bundle", str(FIXTURES / "tiny-v2")], "learning akida-edge needs a v1 bundle"),
        (["--learning", "edge", "--bundle", str(FIXTURES / "tiny-v1")], "learning='edge': use gradient or akida-edge"),
        (["--bundle", str(FIXTURES / "tiny-v2"), "--run-config", "edge-num-weights=20"], "only apply to learning akida-edge"),
        (["--learning", "akida-edge", "--bundle", str(FIXTURES / "tiny-v1"), "--run-config", "edge-num-weights=100000"], "edge-num-weights=100000 must be at most"),
        # valid edge settings get as far as the certificates (TLS by default)
        (["--learning", "akida-edge", "--bundle", str(FIXTURES / "tiny-v1"), "--run-config", "edge-num-weights=20"], "ca.pem not found"),
    ],
)
def test_server_start_checks_the_learning_mode_before_starting_anything(tmp_path, args, message) -> None:
    from typer.testing import CliRunner

    from server.cli import app as server_cli

    state = tmp_path / "state"
    base = ["start", "--state-dir", str(state), "--audit-db", f"sqlite:///{tmp_path / 'a.db'}", "--audit-key", str(tmp_path / "k.pem")]
    result = CliRunner().invoke(server_cli, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (state / "superlink.db").exists()


def test_the_flower_app_declares_the_edge_keys(tmp_path) -> None:
    from flwr.cli.config_utils import load_and_validate

    from server.deployment import StateDir, write_flower_app

    app_dir = write_flower_app(StateDir(tmp_path), {"learning": "akida-edge", "edge-neurons-per-class": 4})
    config, _ = load_and_validate(app_dir / "pyproject.toml", check_module=True)
    declared = config["tool"]["flwr"]["app"]["config"]
    assert declared["learning"] == "akida-edge" and declared["edge-neurons-per-class"] == 4 and declared["edge-num-weights"] == 0
    settings, e = read_run_config(declared, "r")  # what the ServerApp reads back
    assert settings.learning == "akida-edge" and e.neurons_per_class == 4 and e.num_weights is None
