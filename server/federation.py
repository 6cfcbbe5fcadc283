"""The coordinator's federation loop, on Flower's Grid and Flower's strategies.

Why not `Strategy.start()`: the coordinator must do things between Flower's steps that
`start()` has no hook for: make sure each clinic has the backbone before it is asked to
train (hello, and a deploy only to clinics that lack the bundle's sha256), refuse malformed
updates one by one (wrong shape/dtype, NaN/Inf, wrong backbone) and record why, dequantize
the clinics' int8 heads before aggregation, and record every new head in the audit log. So
this loop calls the strategy's own `configure_train` / `aggregate_train` /
`configure_evaluate` / `aggregate_evaluate` (Flower's implementations, unchanged) and
`grid.send_and_receive`, in the same order `start()` does.

A clinic that fails, sends garbage or never answers within `round_timeout` is left out of
that round; the round goes on with the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from protocols.messages import (
    MAX_BATCH_SIZE,
    MAX_LEARNING_RATE,
    MAX_LOCAL_EPOCHS,
    MAX_REGULARISATION,
    MIN_LEARNING_RATE,
    MSG_DEPLOY,
    MSG_HELLO,
    REC_METRICS,
    EvaluateSettings,
    HeadSpec,
    ProtocolError,
    TrainReply,
    TrainSettings,
    check_class_list,
    deploy_content,
    dequantized_record,
    describe_content,
    global_head_record,
    head_from_aggregate,
    hello_content,
    validate_deploy_reply,
    validate_evaluate_reply,
    validate_hello_reply,
    validate_train_reply,
)
from qana.atomic import write_atomic
from qana.bundle import Bundle, load_bundle, pack_bundle
from qana.head import Head, dequantize, head_from_npz, head_to_npz, init_head, select_classes
from server.audit.errors import UnknownVersionError
from server.class_incremental import ClinicHead, merge_class_incremental
from server.strategies import build_strategy, canonical_name, parse_options


class FederationError(RuntimeError):
    """The federation cannot start or continue; the message says why."""


class AuditSink(Protocol):
    """The part of `server.audit.AuditLog` the coordinator uses."""

    def record_backbone(self, data: bytes, sha256: str | None = None, **kwargs: Any) -> Any: ...
    def record_head(self, run_id: str, round: int, data: bytes, sha256: str | None = None, **kwargs: Any) -> Any: ...
    def record_rejection(self, run_id: str, round: int, clinic_id: str, reason: str) -> Any: ...
    def record_deployment(self, clinic_id: str, version: str) -> Any: ...
    def record_evaluation(self, version: str, run_id: str, round: int, metrics: dict[str, Any]) -> Any: ...
    def current_version(self, kind: str = "head") -> str | None: ...
    def version(self, reference: str) -> Any: ...
    def resolve_version(self, reference: str) -> str: ...
    def artifact_of(self, version: str) -> bytes: ...


# --------------------------------------------------------------------------- settings

# Settings clinics must not see travel as environment variables of the ServerApp process
# (`qana-server start` sets them on the SuperLink); the run config is visible to ClientApps.
ENV_BUNDLE = "QANA_BUNDLE"
ENV_STATE_DIR = "QANA_SERVER_STATE_DIR"
ENV_WIRE_LOG = "QANA_WIRE_LOG"

LEARNING_MODES = ("gradient", "akida-edge")
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "bundle": "",  # bundle directory ("" = $QANA_BUNDLE, else the package's default v2 bundle)
    "num-rounds": 3,
    "strategy": "fedavg",
    "strategy-options": "",  # "key=value,key=value" for the strategy constructor
    "min-clinics": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "round-timeout": 600.0,
    "wait-for-clinics": 600.0,
    "local-epochs": 20,
    "learning-rate": 0.01,
    "batch-size": 64,
    "l2": 1e-4,
    "smote": True,
    "absent-classes": "keep",  # keep | train: local training and classes a clinic has no images of
    "seed": 0,
    "initial-head": "auto",  # auto | bundle | random
    "initial-classes": "",  # "a,b,c": the classes the federation starts with ("" = the bundle's)
    "audit-db": "",  # SQLAlchemy URL ("" = $QANA_AUDIT_DB or ~/.qana/audit.db)
    "audit-key": "",  # signing key path ("" = $QANA_AUDIT_KEY or ~/.qana/audit_key.pem)
    "state-dir": "",  # where status.json and wire.jsonl go ("" = $QANA_SERVER_STATE_DIR, else none)
    "wire-log": False,  # log every message's structure and size to state-dir/wire.jsonl (or $QANA_WIRE_LOG=1)
    "learning": "gradient",  # gradient (Flower strategy on quantized heads) | akida-edge (server.edge_rounds, v1 bundle)
}


@dataclass(frozen=True)
class FederationSettings:
    """What a run does; read from Flower's run config (`[tool.flwr.app.config]` + overrides)."""

    run_id: str
    bundle: Path | None = None
    num_rounds: int = 3
    strategy: str = "fedavg"
    strategy_options: dict[str, float | int] = field(default_factory=dict)
    min_clinics: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 600.0
    wait_for_clinics: float = 600.0
    local_epochs: int = 20
    learning_rate: float = 0.01
    batch_size: int = 64
    l2: float = 1e-4
    smote: bool = True
    absent_classes: str = "keep"
    seed: int = 0
    initial_head: str = "auto"
    initial_classes: tuple[str, ...] = ()  # () = the bundle's classes
    audit_db: str | None = None
    audit_key: Path | None = None
    state_dir: Path | None = None
    wire_log: bool = False
    learning: str = "gradient"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], run_id: str) -> FederationSettings:
        """Check every key; a wrong value is a FederationError naming the key."""
        cfg = dict(RUN_CONFIG_DEFAULTS)
        unknown = sorted(set(run_config) - set(cfg))
        if unknown:
            raise FederationError(f"unknown run-config key(s): {', '.join(unknown)}")
        cfg.update(run_config)

        def number(key: str, kind: type, low: float, high: float = float("inf")) -> Any:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FederationError(f"run-config {key}={value!r} must be a number")
            if kind is int and int(value) != value:
                raise FederationError(f"run-config {key}={value!r} must be an integer")
            if not low <= value <= high:
                raise FederationError(f"run-config {key}={value!r} must be between {low} and {high}")
            return kind(value)

        def flag(key: str) -> bool:
            value = cfg[key]
            if not isinstance(value, bool):  # smote="false" is a TOML string, and bool("false") is True
                raise FederationError(f"run-config {key}={value!r} must be true or false (unquoted)")
            return value

        learning = str(cfg["learning"])
        if learning not in LEARNING_MODES:
            raise FederationError(f"run-config learning={learning!r}: use {' or '.join(LEARNING_MODES)}")
        absent = str(cfg["absent-classes"])
        if absent not in ("keep", "train"):
            raise FederationError(f"run-config absent-classes={absent!r}: use keep or train")
        initial = str(cfg["initial-head"])
        if initial not in ("auto", "bundle", "random"):
            raise FederationError(f"run-config initial-head={initial!r}: use auto, bundle or random")
        try:
            strategy = canonical_name(str(cfg["strategy"]))
            options = parse_options(str(cfg["strategy-options"]))
        except ValueError as exc:
            raise FederationError(str(exc)) from None
        classes_text = str(cfg["initial-classes"]).strip()
        initial_classes: tuple[str, ...] = ()
        if classes_text:
            try:
                initial_classes = check_class_list([c.strip() for c in classes_text.split(",")], "run-config initial-classes")
            except ProtocolError as exc:
                raise FederationError(str(exc)) from None
        bundle = str(cfg["bundle"]) or os.environ.get(ENV_BUNDLE, "")
        state_dir = str(cfg["state-dir"]) or os.environ.get(ENV_STATE_DIR, "")
        return cls(
            run_id=run_id,
            bundle=Path(bundle).expanduser() if bundle else None,
            num_rounds=number("num-rounds", int, 1, 10_000),
            strategy=strategy,
            strategy_options=options,
            min_clinics=number("min-clinics", int, 1, 100_000),
            fraction_train=number("fraction-train", float, 0.0, 1.0),
            fraction_evaluate=number("fraction-evaluate", float, 0.0, 1.0),
            round_timeout=number("round-timeout", float, 1.0),
            wait_for_clinics=number("wait-for-clinics", float, 0.0),
            local_epochs=number("local-epochs", int, 1, MAX_LOCAL_EPOCHS),
            learning_rate=number("learning-rate", float, MIN_LEARNING_RATE, MAX_LEARNING_RATE),
            batch_size=number("batch-size", int, 1, MAX_BATCH_SIZE),
            l2=number("l2", float, 0.0, MAX_REGULARISATION),
            smote=flag("smote"),
            absent_classes=absent,
            seed=number("seed", int, 0, 2**31 - 1),
            initial_head=initial,
            initial_classes=initial_classes,
            audit_db=str(cfg["audit-db"]) or None,
            audit_key=Path(str(cfg["audit-key"])).expanduser() if cfg["audit-key"] else None,
            state_dir=Path(state_dir).expanduser() if state_dir else None,
            wire_log=flag("wire-log") or os.environ.get(ENV_WIRE_LOG) == "1",
            learning=learning,
        )

    def strategy_config(self) -> dict[str, Any]:
        """What the audit log records as the round's strategy configuration."""
        return {
            "strategy": self.strategy,
            "options": dict(self.strategy_options),
            "min_clinics": self.min_clinics,
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "local_epochs": self.local_epochs,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "l2": self.l2,
            "smote": self.smote,
            "absent_classes": self.absent_classes,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- clinics


@dataclass
class ClinicState:
    node_id: int
    clinic_id: str
    device: str = ""
    has_bundle: bool = False
    last_seen: float = 0.0
    rounds_trained: int = 0
    rejections: int = 0


@contextmanager
def sampling_floor(strategy: Strategy, available: int) -> Iterator[None]:
    """Let a Flower strategy sample from the `available` clinics when fewer than its minimum remain.

    Flower's `sample_nodes` waits (forever) until `min_available_nodes` are connected. When a
    clinic dies in the middle of a round the coordinator must go on with the others, so for
    the duration of one configure call the minimums are lowered to what is available.
    """
    names = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
    saved = {n: getattr(strategy, n) for n in names if hasattr(strategy, n)}
    try:
        for name, value in saved.items():
            if value > available:
                setattr(strategy, name, max(available, 0))
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)


class ReadyGrid(Grid):
    """The run's Grid, showing strategies only the clinics that hold the run's backbone.

    Flower's strategies sample from `grid.get_node_ids()`; a clinic that connected a second
    ago has no bundle yet and would fail the round, so it is hidden until it is ready.
    """

    def __init__(self, grid: Grid, ready: Iterable[int]) -> None:
        self._grid = grid
        self._ready = set(ready)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n in self._ready]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


# --------------------------------------------------------------------------- results


@dataclass
class RoundResult:
    round: int
    head_version: str | None
    participants: list[str]
    rejected: dict[str, str]
    failed: dict[str, str]
    train_metrics: dict[str, float]
    evaluate_metrics: dict[str, float]
    seconds: float
    server_seconds: float  # coordinator time: validation, aggregation, audit (not waiting for clinics)


@dataclass
class FederationResult:
    run_id: str
    bundle_id: str
    backbone_version: str
    initial_head_version: str
    final_head_version: str
    rounds: list[RoundResult]


@dataclass
class Opening:
    """Where a run's head starts: the head, its bytes, its audited version (None: audit it in
    round 0, with `note` and the extra round-0 `metrics`) and what every update must match."""

    head: Any  # qana.head.Head or qana.edge.EdgeHead
    data: bytes
    version: str | None
    spec: Any  # protocols HeadSpec or EdgeSpec: both have .classes and .with_classes()
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundUpdate:
    """A training round's outcome: the merged head, or None and why not."""

    head: Any | None
    train_metrics: dict[str, float]
    participants: list[dict[str, Any]]
    rejected: dict[str, str]
    failed: dict[str, str]
    why_none: str = ""


def head_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wire_bytes(message: Message) -> int:
    """Bytes of a message as Flower transfers it: the sum of its deflated objects."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))


class Coordinator:
    """One federated run: backbone distribution, rounds, validation, aggregation, audit."""

    def __init__(self, grid: Grid, settings: FederationSettings, audit: AuditSink) -> None:
        self.grid = grid
        self.settings = settings
        self.audit = audit
        self.clinics: dict[int, ClinicState] = {}
        self.status: dict[str, Any] = {"run_id": settings.run_id, "history": []}
        self.strategy: Strategy = self._build_strategy()
        self._server_time = 0.0
        self.unresponsive: set[int] = set()
        self.refusals_logged: set[int] = set()  # nodes already told why they are left out

    def _build_strategy(self) -> Strategy:
        s = self.settings
        return build_strategy(
            s.strategy, s.strategy_options, min_clinics=s.min_clinics,
            fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        )

    # ------------------------------------------------------------------ bookkeeping

    def _clinic_name(self, node_id: int) -> str:
        state = self.clinics.get(node_id)
        return state.clinic_id if state else f"node-{node_id}"

    def _write_status(self, **fields: Any) -> None:
        self.status.update(fields)
        self.status["updated_at"] = time.time()
        self.status["clinics"] = {str(k): asdict(v) for k, v in self.clinics.items()}
        if self.settings.state_dir is None:
            return
        write_atomic(self.settings.state_dir / "status.json", (json.dumps(self.status, indent=2, default=str) + "\n").encode())

    def _wire(self, round_: int, direction: str, message: Message) -> None:
        if not (self.settings.wire_log and self.settings.state_dir is not None):
            return
        entry: dict[str, Any] = {
            "run_id": self.settings.run_id,
            "round": round_,
            "direction": direction,
            "message_type": message.metadata.message_type,
            "node_id": message.metadata.dst_node_id if direction == "out" else message.metadata.src_node_id,
        }
        if message.has_error():
            entry["error"] = message.error.reason
        else:
            entry["content"] = describe_content(message.content)
            entry["wire_bytes"] = wire_bytes(message)
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.state_dir / "wire.jsonl").open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def _send(self, round_: int, messages: list[Message], timeout: float) -> list[Message]:
        for m in messages:
            # Flower's strategies leave group_id empty; the round number makes the SuperNodes'
            # logs ("[RUN r, ROUND n]") and the wire log line up with the audit log.
            if not m.metadata.group_id:
                m.metadata.group_id = str(round_)
            self._wire(round_, "out", m)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout)) if messages else []
        # Replies arrive in network order; Flower's strategies sum updates in list order, and
        # float addition is not associative. In clinic order, the same updates always give
        # the same aggregate, bit for bit (reproducible runs and simulations).
        replies.sort(key=lambda r: (self._clinic_name(r.metadata.src_node_id), r.metadata.src_node_id))
        for r in replies:
            self._wire(round_, "in", r)
        return replies

    def _message(self, content: RecordDict, node_id: int, message_type: str, round_: int) -> Message:
        return Message(content, dst_node_id=node_id, message_type=message_type, group_id=str(round_))

    # ------------------------------------------------------------------ versions

    def _backbone(self, bundle: Bundle, packed: bytes) -> str:
        """The audit version of this bundle, recording it the first time it is used."""
        digest = hashlib.sha256(packed).hexdigest()
        try:
            return self.audit.resolve_version(digest)
        except UnknownVersionError:  # not recorded yet
            pass
        info = self.audit.record_backbone(
            packed,
            digest,
            run_id=self.settings.run_id,
            note=f"bundle {bundle.bundle_id} (target {bundle.target}, {len(bundle.classes)} classes, "
            f"{bundle.feature_dim} features)",
        )
        log(INFO, "Recorded backbone %s (bundle %s…)", info.version, bundle.bundle_id[:12])
        return str(info.version)

    def _initial_head(self, bundle: Bundle, spec: HeadSpec, backbone: str) -> tuple[Head, str | None, bytes]:
        """Start from the current audited head for this backbone, else from the bundle's head.

        With `initial-classes` the federation starts with those classes only (columns of the
        bundle's head, or a random head over them): classes the backbone knows but the
        federation has not agreed on yet can then enter later, class-incrementally. The
        current audited head is continued whatever its classes (it may have grown), unless
        `initial-classes` asks for other ones.
        """
        mode = self.settings.initial_head
        wanted = self.settings.initial_classes
        if mode == "auto":
            current = self.audit.current_version("head")
            if current is not None:
                info = self.audit.version(current)
                if info.backbone == backbone:
                    data = self.audit.artifact_of(current)
                    try:
                        head = head_from_npz(data)
                    except ValueError:  # an akida-edge run's head of the same (v1) backbone
                        head = None
                    if head is not None and head.num_features == spec.num_features and (not wanted or head.classes == wanted):
                        log(INFO, "Starting from the current head %s (%d classes)", current, head.num_classes)
                        return head, current, data
                log(
                    WARNING,
                    "Current head %s belongs to another backbone, class list or kind of learning (akida-edge); "
                    "starting from the bundle's head",
                    current,
                )
        classes = wanted or spec.classes
        if mode == "random":
            head = init_head(spec.num_features, classes, spec.feature_scale, seed=self.settings.seed)
            return head, None, head_to_npz(head)
        data = bundle.head_path.read_bytes()
        if not wanted:
            return head_from_npz(data), None, data
        base = head_from_npz(data)
        missing = [c for c in wanted if c not in base.classes]
        if missing:
            raise FederationError(
                f"initial-classes {', '.join(missing)} are not classes of the bundle's head ({', '.join(base.classes)}); "
                "use initial-head=random, or let a clinic introduce them with --new-class"
            )
        cols = [base.classes.index(c) for c in wanted]
        head = Head(base.weights[:, cols], base.bias[cols], wanted, base.feature_scale)
        return head, None, head_to_npz(head)

    # ------------------------------------------------------------------ clinics

    def _ensure_ready(self, round_: int, bundle: Bundle, packed: bytes) -> list[int]:
        """Greet new nodes; deploy the bundle to those that lack it; return ready node ids."""
        connected = list(self.grid.get_node_ids())
        new = [n for n in connected if n not in self.clinics or not self.clinics[n].has_bundle]
        if new:
            msgs = [self._message(hello_content(bundle.bundle_id), n, MSG_HELLO, round_) for n in new]
            for reply in self._send(round_, msgs, timeout=min(self.settings.round_timeout, 120.0)):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(WARNING, "Clinic %s did not answer hello: %s", self._clinic_name(node), reply.error.reason)
                    continue
                try:
                    info = validate_hello_reply(reply.content)
                except ProtocolError as exc:
                    log(WARNING, "Node %s: invalid hello reply: %s", node, exc)
                    continue
                if not self._claim_clinic_id(node, info.clinic_id, connected):
                    continue
                self.clinics[node] = ClinicState(
                    node, info.clinic_id, info.device, bundle.bundle_id in info.cached_bundles, time.time()
                )
            lacking = [n for n in new if n in self.clinics and not self.clinics[n].has_bundle]
            if lacking:
                log(INFO, "Deploying bundle %s… (%d bytes) to %d clinic(s)", bundle.bundle_id[:12], len(packed), len(lacking))
                msgs = [self._message(deploy_content(bundle.bundle_id, packed), n, MSG_DEPLOY, round_) for n in lacking]
                for reply in self._send(round_, msgs, timeout=self.settings.round_timeout):
                    node = reply.metadata.src_node_id
                    if reply.has_error():
                        log(WARNING, "Clinic %s could not install the bundle: %s", self._clinic_name(node), reply.error.reason)
                        continue
                    try:
                        info = validate_deploy_reply(reply.content, bundle.bundle_id)
                    except ProtocolError as exc:
                        log(WARNING, "Clinic %s: invalid deploy reply: %s", self._clinic_name(node), exc)
                        continue
                    state = self.clinics[node]
                    state.has_bundle, state.device, state.last_seen = True, info.device, time.time()
                    self.audit.record_deployment(state.clinic_id, self.backbone_version)
        connected_now = set(self.grid.get_node_ids())
        return [n for n, s in self.clinics.items() if s.has_bundle and n in connected_now]

    def _claim_clinic_id(self, node: int, clinic_id: str, connected: list[int]) -> bool:
        """Whether `node` may take part as `clinic_id`: the name its key was registered under (when
        `qana-server nodes register` registered it), and no other connected node already that clinic.

        The audit log names clinics by this id, so a node must not speak for another clinic. Two
        nodes with one id would also make the audit log refuse the round, after the clinics had
        already been sent the new head. A refused node is greeted again later: if the first one
        has gone, a clinic that restarted under a new node id takes its place.
        """
        registered = self._registered_name(node)
        if registered is not None and registered != clinic_id:
            self._refuse_once(node, "Node %s says it is clinic %r, but its key is registered for %r: left out of this run",
                              node, clinic_id, registered)
            return False
        holder = next((n for n, state in self.clinics.items() if state.clinic_id == clinic_id and n != node), None)
        if holder is None:
            return True
        if holder not in connected:
            self.clinics.pop(holder)  # the clinic reconnected under a new node id
            return True
        self._refuse_once(node, "Node %s says it is clinic %r, which node %s already is: node %s is left out of this run "
                          "(give each clinic its own --clinic-id)", node, clinic_id, holder, node)
        return False

    def _registered_name(self, node: int) -> str | None:
        """The clinic id `node`'s key was registered under in the coordinator's state (None when the
        run has no registry: insecure or --no-node-auth runs, simulations)."""
        if self.settings.state_dir is None:
            return None
        from server.deployment import StateDir, read_nodes  # server.deployment imports this module

        registry = read_nodes(StateDir(self.settings.state_dir))
        return next((name for name, entry in registry.items() if str(entry.get("node_id")) == str(node) and not entry.get("revoked")), None)

    def _refuse_once(self, node: int, message: str, *args: Any) -> None:
        """Log why a node is left out, once per node (it is greeted again every few seconds)."""
        if node not in self.refusals_logged:
            self.refusals_logged.add(node)
            log(WARNING, message, *args)

    def _wait_for_clinics(self, round_: int, bundle: Bundle, packed: bytes) -> list[int]:
        deadline = time.monotonic() + self.settings.wait_for_clinics
        while True:
            ready = self._ensure_ready(round_, bundle, packed)
            if len(ready) >= self.settings.min_clinics:
                return ready
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(ready)} clinic(s) ready after {self.settings.wait_for_clinics:.0f}s; "
                    f"need {self.settings.min_clinics}"
                )
            log(INFO, "Waiting for clinics: %d ready, %d needed", len(ready), self.settings.min_clinics)
            self._write_status(phase="waiting for clinics")
            time.sleep(2.0)

    # ------------------------------------------------------------------ rounds

    def _train(self, round_: int, arrays: ArrayRecord, grid: Grid, head_sha: str, spec: HeadSpec, bundle_id: str):
        """One training round; returns (aggregate, growing heads or None, metrics, participants, rejected, failed).

        Flower's strategy aggregates the round's classes of every accepted head (the aggregate
        ArrayRecord). When some clinic introduced a class, the clinics' whole heads are returned
        too: `_train_round` merges the new classes' columns by name beside the aggregate
        (`server.class_incremental`), and the strategy is rebuilt here because its state
        (FedAdam's moments, ...) has the old shape.
        """
        s = self.settings
        config = TrainSettings(
            round_, bundle_id, head_sha, s.local_epochs, s.learning_rate, s.batch_size, s.l2, s.smote, s.seed,
            classes=spec.classes, absent_classes=s.absent_classes,
        ).to_config()
        with sampling_floor(self.strategy, len(list(grid.get_node_ids()))):
            msgs = list(self.strategy.configure_train(round_, arrays, config, grid))
        replies = self._send(round_, msgs, timeout=s.round_timeout)
        t0 = time.perf_counter()

        def validate(content: RecordDict) -> tuple[TrainReply, ArrayRecord]:
            update = validate_train_reply(content, spec, bundle_id)
            return update, dequantized_record(update.qhead, spec)

        screened, participants, rejected, failed = self._screen_train_replies(round_, msgs, replies, validate)
        accepted: list[Message] = []
        heads: list[ClinicHead] = []
        for reply, (update, floats) in screened:
            reply.content = RecordDict({"arrays": floats, REC_METRICS: MetricRecord(dict(update.metrics))})
            accepted.append(reply)
            heads.append(ClinicHead(update.clinic.clinic_id, dequantize(update.qhead, spec.feature_scale), update.num_examples))
        agg_arrays, agg_metrics = None, None
        growing = any(h.head.classes != spec.classes for h in heads)
        if growing:  # the strategy sees the round's classes only (every reply starts with them)
            for reply, clinic_head in zip(accepted, heads):
                own = select_classes(clinic_head.head, spec.classes)
                reply.content = RecordDict({"arrays": global_head_record(own), REC_METRICS: reply.content[REC_METRICS]})
        if accepted:
            try:
                agg_arrays, agg_metrics = self.strategy.aggregate_train(round_, accepted)
            except (InconsistentMessageReplies, AggregationError) as exc:
                log(WARNING, "Round %d: aggregation failed: %s", round_, getattr(exc, "reason", exc))
        if growing:
            self.strategy = self._build_strategy()
        self._server_time += time.perf_counter() - t0
        return agg_arrays, heads if growing else None, dict(agg_metrics or {}), participants, rejected, failed

    def _screen_train_replies(
        self, round_: int, msgs: list[Message], replies: list[Message], validate: Callable[[RecordDict], Any]
    ) -> tuple[list[tuple[Message, Any]], list[dict[str, Any]], dict[str, str], dict[str, str]]:
        """Sort a training round's replies: valid updates, rejected ones, failed or silent clinics.

        `validate(content)` returns the decoded update (an object with `.clinic` and `.metrics`,
        or a tuple whose first item is one) or raises ProtocolError. A rejection is logged and
        recorded in the audit log; a clinic that sent nothing is dropped from this round's
        evaluation and greeted again before it next trains. Shared by the gradient and the
        Akida edge rounds, so both treat clinics the same way.
        """
        s = self.settings
        screened: list[tuple[Message, Any]] = []
        participants: list[dict[str, Any]] = []
        rejected: dict[str, str] = {}
        failed: dict[str, str] = {}
        answered = {r.metadata.src_node_id for r in replies}
        self.unresponsive = set()
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in answered:
                failed[self._clinic_name(node)] = f"no reply within {s.round_timeout:.0f}s"
                # Not asked to evaluate this round, and greeted again before it trains next time.
                self.unresponsive.add(node)
                self.clinics.pop(node, None)
        for reply in replies:
            node = reply.metadata.src_node_id
            name = self._clinic_name(node)
            if reply.has_error():
                failed[name] = reply.error.reason
                continue
            try:
                decoded = validate(reply.content)
                update = decoded[0] if isinstance(decoded, tuple) else decoded
                if update.clinic.clinic_id != name and node in self.clinics:
                    raise ProtocolError(f"reply names clinic {update.clinic.clinic_id!r}, node belongs to {name!r}")
            except ProtocolError as exc:
                rejected[name] = str(exc)
                if node in self.clinics:
                    self.clinics[node].rejections += 1
                    if "backbone" in str(exc):
                        self.clinics[node].has_bundle = False  # greet it again next round
                log(WARNING, "Round %d: rejected the update of %s: %s", round_, name, exc)
                self.audit.record_rejection(s.run_id, round_, name, str(exc))
                continue
            screened.append((reply, decoded))
            participants.append({"clinic_id": name, "num_examples": update.num_examples, "metrics": dict(update.metrics)})
            if node in self.clinics:
                self.clinics[node].rounds_trained += 1
                self.clinics[node].last_seen = time.time()
        for name, reason in failed.items():
            log(WARNING, "Round %d: no update from %s: %s", round_, name, reason)
        return screened, participants, rejected, failed

    def _screen_evaluate_replies(self, round_: int, replies: list[Message], bundle_id: str, head_sha: str) -> list[tuple[Message, str, Any]]:
        """(reply, clinic name, validated result) of every usable evaluation reply; a clinic that
        failed or answered for another bundle or head is logged and left out of the round's scores."""
        valid = []
        for reply in replies:
            name = self._clinic_name(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "Round %d: %s could not evaluate: %s", round_, name, reply.error.reason)
                continue
            try:
                result = validate_evaluate_reply(reply.content, bundle_id, head_sha)
            except ProtocolError as exc:
                log(WARNING, "Round %d: ignored the evaluation of %s: %s", round_, name, exc)
                continue
            valid.append((reply, name, result))
        return valid

    def _evaluate(self, round_: int, head: Head, head_sha: str, grid: Grid, bundle_id: str):
        config = EvaluateSettings(round_, bundle_id, head_sha, head.classes).to_config()
        with sampling_floor(self.strategy, len(list(grid.get_node_ids()))):
            msgs = list(self.strategy.configure_evaluate(round_, global_head_record(head), config, grid))
        replies = self._send(round_, msgs, timeout=self.settings.round_timeout)
        t0 = time.perf_counter()
        valid = self._screen_evaluate_replies(round_, replies, bundle_id, head_sha)
        accepted: list[Message] = []
        for reply, _name, result in valid:
            reply.content = RecordDict({REC_METRICS: MetricRecord(dict(result.metrics))})
            accepted.append(reply)
        evaluated = [name for _reply, name, _result in valid]
        per_clinic = {name: dict(result.metrics) for _reply, name, result in valid}
        metrics: dict[str, float] = {}
        if accepted:
            try:
                metrics = dict(self.strategy.aggregate_evaluate(round_, accepted) or {})
            except InconsistentMessageReplies as exc:
                log(WARNING, "Round %d: evaluation aggregation failed: %s", round_, exc.reason)
            metrics["num-examples"] = sum(int(m["num-examples"]) for m in per_clinic.values())
        self._server_time += time.perf_counter() - t0
        return metrics, evaluated, per_clinic

    def _record(self, round_: int, data: bytes, parent: str | None, participants, metrics, note: str | None) -> str:
        info = self.audit.record_head(
            self.settings.run_id,
            round_,
            data,
            head_id(data),
            parent=parent,
            strategy=self.settings.strategy,
            strategy_config=self.settings.strategy_config(),
            participants=participants,
            aggregate_metrics=metrics,
            backbone=self.backbone_version,
            note=note,
        )
        return str(info.version)

    def _record_evaluation(self, version: str, round_: int, metrics: dict, per_clinic: dict, evaluated: list[str]) -> None:
        """How the clinics scored `version`, and that each of them now holds it."""
        self.audit.record_evaluation(version, self.settings.run_id, round_, {"evaluate": metrics, "evaluate_by_clinic": per_clinic})
        for name in evaluated:
            self.audit.record_deployment(name, version)

    # ------------------------------------------------------------------ the run's steps (EdgeCoordinator overrides them)

    learning = "gradient"
    training_phase = "training"  # shown in the status file while clinics learn
    head_kind = "head"  # in log lines

    def _run_bundle(self) -> Bundle:
        from qana.bundle import load_default_bundle

        return load_bundle(self.settings.bundle) if self.settings.bundle else load_default_bundle("v2")

    def _run_description(self) -> dict[str, Any]:
        return {"strategy": self.settings.strategy}

    def _prepare_opening(self, bundle: Bundle) -> Callable[[list[int]], Opening]:
        """Decide the first head before waiting for clinics (so a bad setting fails at once);
        the returned step finishes the opening once the clinics are ready."""
        base = bundle.load_head()
        head, version, data = self._initial_head(bundle, HeadSpec.from_head(base, bundle.target), self.backbone_version)
        opening = Opening(
            head, data, version, HeadSpec.from_head(head, bundle.target),  # the run's classes: they may grow
            note=f"initial head ({self.settings.initial_head}) for bundle {bundle.bundle_id}",
        )
        return lambda _ready: opening

    def _train_round(self, round_: int, head: Head, head_sha: str, spec: HeadSpec, grid: Grid, bundle_id: str) -> RoundUpdate:
        agg, growing, train_metrics, participants, rejected, failed = self._train(
            round_, global_head_record(head), grid, head_sha, spec, bundle_id
        )
        if agg is None:
            return RoundUpdate(None, {}, participants, rejected, failed, "no valid update")
        t0 = time.perf_counter()
        try:
            new_head = head_from_aggregate(agg, spec)
            if growing is not None:  # the aggregate holds the round's classes; the new ones are merged by name
                new_head, additions = merge_class_incremental(spec.classes, growing, self.audit, self.settings.run_id, round_, new_head)
                for name, clinic in additions:
                    log(INFO, "Round %d: class %r added by %s; the global head now has %d classes", round_, name, clinic, new_head.num_classes)
        except ProtocolError as exc:
            return RoundUpdate(None, train_metrics, participants, rejected, failed, f"the aggregate is unusable ({exc})")
        finally:
            self._server_time += time.perf_counter() - t0
        return RoundUpdate(new_head, train_metrics, participants, rejected, failed)

    def _head_bytes(self, head: Head) -> bytes:
        return head_to_npz(head)

    def _record_round(self, round_: int, data: bytes, parent: str | None, participants, metrics, spec: HeadSpec, note: str | None) -> str:
        return self._record(round_, data, parent, participants, metrics, note)

    # ------------------------------------------------------------------ the run

    def run(self) -> FederationResult:
        """Round 0 evaluates (and audits) the first head; each later round trains, merges,
        evaluates, audits and deploys a new head, or keeps the old one when no update is usable."""
        s = self.settings
        bundle = self._run_bundle()
        packed = pack_bundle(bundle)
        self.backbone_version = self._backbone(bundle, packed)
        finish_opening = self._prepare_opening(bundle)
        self._write_status(
            phase="starting", bundle_id=bundle.bundle_id, backbone_version=self.backbone_version,
            num_rounds=s.num_rounds, learning=self.learning, round=0, **self._run_description(),
        )
        log(INFO, "QANA-FL %s run %s: %d round(s), bundle %s…", self.learning, s.run_id, s.num_rounds, bundle.bundle_id[:12])

        ready = self._wait_for_clinics(0, bundle, packed)
        t_round = time.perf_counter()
        self._server_time = 0.0
        opening = finish_opening(ready)
        head, head_version, spec, sha = opening.head, opening.version, opening.spec, head_id(opening.data)
        if head_version is None:  # recorded before any clinic receives it
            head_version = self._record_round(0, opening.data, None, [], dict(opening.metrics), spec, note=opening.note)
        eval_metrics, evaluated, per_clinic = self._evaluate(0, head, sha, ReadyGrid(self.grid, ready), bundle.bundle_id)
        self._record_evaluation(head_version, 0, eval_metrics, per_clinic, evaluated)
        initial_version = head_version
        rounds = [RoundResult(0, head_version, [], {}, {}, {}, eval_metrics, time.perf_counter() - t_round, self._server_time)]
        self.status["history"].append({"round": 0, "head_version": head_version, "evaluate": eval_metrics})
        self._write_status(phase="round 0 done", head_version=head_version)

        for round_ in range(1, s.num_rounds + 1):
            t_round = time.perf_counter()
            self._server_time = 0.0
            ready = self._wait_for_clinics(round_, bundle, packed)
            self._write_status(phase=f"round {round_}: {self.training_phase}", round=round_)
            update = self._train_round(round_, head, sha, spec, ReadyGrid(self.grid, ready), bundle.bundle_id)
            if update.head is None:
                log(WARNING, "Round %d: %s; the %s stays %s", round_, update.why_none, self.head_kind, head_version)
                rounds.append(RoundResult(round_, None, [], update.rejected, update.failed, update.train_metrics, {},
                                          time.perf_counter() - t_round, self._server_time))
                self.status["history"].append({"round": round_, "head_version": None, "rejected": update.rejected, "failed": update.failed})
                continue
            new_head = update.head
            new_bytes = self._head_bytes(new_head)
            new_sha = head_id(new_bytes)
            t0 = time.perf_counter()
            metrics = {"train": update.train_metrics, "rejected": update.rejected, "failed": update.failed}
            note = None
            if new_head.classes != spec.classes:
                added = [c for c in new_head.classes if c not in spec.classes]
                note = f"class-incremental merge: added {', '.join(added)}; classes now {', '.join(new_head.classes)}"
                spec = spec.with_classes(new_head.classes)
            # Recorded before it leaves the coordinator: no clinic ever holds an unrecorded head.
            new_version = self._record_round(round_, new_bytes, head_version, update.participants, metrics, spec, note)
            self._server_time += time.perf_counter() - t0
            self._write_status(phase=f"round {round_}: evaluating")
            responsive = ReadyGrid(self.grid, [n for n in ready if n not in self.unresponsive])
            eval_metrics, evaluated, per_clinic = self._evaluate(round_, new_head, new_sha, responsive, bundle.bundle_id)
            t0 = time.perf_counter()
            self._record_evaluation(new_version, round_, eval_metrics, per_clinic, evaluated)
            self._server_time += time.perf_counter() - t0
            log(
                INFO, "Round %d: %s %s from %d clinic(s) (%d rejected, %d failed); federated top1 %s",
                round_, self.head_kind, new_version, len(update.participants), len(update.rejected), len(update.failed),
                f"{eval_metrics['top1']:.3f}" if "top1" in eval_metrics else "n/a",
            )
            head, head_version, sha = new_head, new_version, new_sha
            rounds.append(
                RoundResult(
                    round_, new_version, [p["clinic_id"] for p in update.participants], update.rejected, update.failed,
                    update.train_metrics, eval_metrics, time.perf_counter() - t_round, self._server_time,
                )
            )
            self.status["history"].append(
                {"round": round_, "head_version": new_version, "evaluate": eval_metrics, "participants": len(update.participants),
                 "rejected": update.rejected, "failed": update.failed}
            )
            self._write_status(phase=f"round {round_} done", head_version=new_version)
        self._write_status(phase="finished")
        return FederationResult(s.run_id, bundle.bundle_id, self.backbone_version, str(initial_version), str(head_version), rounds)
