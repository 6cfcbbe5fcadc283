"""The coordinator's round loop for `learning = "akida-edge"`: federated Akida 1.0 on-chip learning.

Same run as the gradient mode: `server.federation.Coordinator.run` is the round loop for both,
with its machinery (waiting for clinics, hello and bundle deployment, the ReadyGrid, sending
with the wire log, audit records, status.json); `EdgeCoordinator` overrides only its steps
(the bundle, the opening head, a round's training, evaluation, the audit record). The
differences:

- the head is an `qana.edge.EdgeHead` (binary prototypes learned by Akida's own algorithm) and
  travels as `protocols.edge_messages` (`train.edge`, `evaluate.edge`);
- the merge is `qana.edge.merge_edge_heads` (usage-weighted Hamming k-medoids per class: the
  kept neurons are real neurons some clinic learned, bits are never averaged), behind a small
  strategy object with Flower's configure/aggregate shape (`EdgeMerge`); Flower's own
  strategies average arrays, which would destroy binary prototypes;
- it needs the v1 bundle (only Akida 1.0 learns on-chip, from 1-bit spikes).

Edge settings. One federation needs one num_weights and one neurons-per-class layout (merged
heads must be comparable and go on learning on-chip) and one learning_competition. They come
from the run config (`edge-num-weights`, `edge-neurons-per-class`, `edge-learning-competition`;
0 / 0 / -1 mean `auto`, the default). If any is auto, round 0 asks every ready clinic to choose
its own settings on its own training part (`qana.edge.choose_edge_params`: num_weights from the
median spike count, neurons and competition by a small validation sweep) and takes
`qana.edge.federation_edge_params` of the replies (medians; the most common competition). Only
those numbers and the median spike count cross the wire. Explicit values override the auto ones.
The chosen settings, and each clinic's choice, go into the audit record of the initial head.

Initial head. `initial-head = auto` continues from the current audited head if it is an edge
head for this backbone with the run's classes and settings; otherwise (and for `random`) the run
starts from fresh neurons (seeded random weights, Akida's unlearned state), as Akida itself
starts. `bundle` is refused: a v1 bundle's head is a gradient-trained layer, not edge neurons.

Classes. Run config `initial-classes` starts the federation with a subset of the bundle's
classes (fresh neurons for those only). Clinics may introduce classes (node-config
`new-classes`): their replies list the round's classes then the new ones, and the merge keeps
the global order and appends new classes in clinic-id order (`merge_edge_heads` over replies
sorted by clinic id, so arrival order does not matter). Each added class is an audit
`class_addition` entry and is named in the head version's note; the next rounds and every
evaluation use the grown head.

Audit. Every merged head is recorded with `record_head` (kind "head", data = `EdgeHead.to_npz()`),
strategy "akida-edge-kmedoids" and the edge settings as its strategy configuration; a rejected
reply is recorded with `record_rejection`, exactly as in the gradient mode.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from protocols.edge_messages import (
    MAX_LEARNING_COMPETITION,
    MSG_EDGE_PARAMS,
    MSG_EVALUATE_EDGE,
    MSG_TRAIN_EDGE,
    EdgeEvaluateSettings,
    EdgeSpec,
    EdgeTrainReply,
    EdgeTrainSettings,
    edge_params_content,
    evaluate_edge_content,
    train_edge_content,
    validate_edge_params_reply,
    validate_train_edge_reply,
)
from protocols.messages import (
    M_NUM_EXAMPLES,
    REC_METRICS,
    ProtocolError,
)
from qana.bundle import Bundle, load_bundle
from qana.edge import (
    FRESH_ACT_STEP,
    FRESH_THRESHOLD,
    FRESH_THRESHOLD_LEARNING,
    EdgeHead,
    EdgeParams,
    federation_edge_params,
    merge_edge_heads,
    random_neurons,
)
from server.federation import (
    Coordinator,
    FederationError,
    FederationSettings,
    Opening,
    RoundUpdate,
    head_id,
)

STRATEGY_NAME = "akida-edge-kmedoids"
AUTO = "auto"

# Run-config keys of the akida-edge mode (0 / 0 / -1 = auto). They are not FederationSettings
# keys: `split_run_config` takes them out before FederationSettings.from_run_config sees the rest.
EDGE_RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "edge-num-weights": 0,  # ones per neuron; 0 = auto (clinics' choices)
    "edge-neurons-per-class": 0,  # neurons per class = the merge's budget; 0 = auto
    "edge-learning-competition": -1.0,  # Akida's learning_competition; < 0 = auto
    "edge-epochs": 1,  # passes over the local data per round (one is Akida's usual regime)
}


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(FederationSettings' keys, the edge keys) of a run config."""
    fed = {k: v for k, v in run_config.items() if k not in EDGE_RUN_CONFIG_DEFAULTS}
    edge = {k: v for k, v in run_config.items() if k in EDGE_RUN_CONFIG_DEFAULTS}
    return fed, edge


@dataclass(frozen=True)
class EdgeSettings:
    """The akida-edge keys of the run config; None = auto (chosen by the clinics in round 0)."""

    num_weights: int | None = None
    neurons_per_class: int | None = None
    learning_competition: float | None = None
    epochs: int = 1

    @property
    def needs_clinics(self) -> bool:
        return None in (self.num_weights, self.neurons_per_class, self.learning_competition)

    @classmethod
    def from_run_config(cls, edge_config: Mapping[str, Any]) -> EdgeSettings:
        cfg = dict(EDGE_RUN_CONFIG_DEFAULTS)
        unknown = sorted(set(edge_config) - set(cfg))
        if unknown:
            raise FederationError(f"unknown edge run-config key(s): {', '.join(unknown)}")
        cfg.update(edge_config)

        def integer(key: str, low: int, high: int) -> int:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FederationError(f"run-config {key}={value!r} must be an integer between {low} and {high}")
            return value

        comp = cfg["edge-learning-competition"]
        if isinstance(comp, bool) or not isinstance(comp, (int, float)) or not np.isfinite(comp) or comp > MAX_LEARNING_COMPETITION:
            raise FederationError(
                f"run-config edge-learning-competition={comp!r} must be a number up to {MAX_LEARNING_COMPETITION:g} (< 0 = auto)"
            )
        nw = integer("edge-num-weights", 0, 1 << 20)
        npc = integer("edge-neurons-per-class", 0, 1024)
        return cls(
            num_weights=nw or None,
            neurons_per_class=npc or None,
            learning_competition=float(comp) if comp >= 0 else None,
            epochs=integer("edge-epochs", 1, 100),
        )


def fresh_edge_head(num_features: int, classes: tuple[str, ...], params: EdgeParams, seed: int) -> EdgeHead:
    """Unlearned neurons as Akida starts them (seeded random weights, fresh per-neuron state)."""
    if not 1 <= params.num_weights <= num_features:
        raise FederationError(f"edge num-weights {params.num_weights} must be in [1, {num_features}] (the backbone's features)")
    n = len(classes) * params.neurons_per_class
    weights = random_neurons(n, num_features, params.num_weights, np.random.default_rng(seed))
    return EdgeHead(
        weights_packed=np.packbits(weights, axis=1),
        num_features=num_features,
        neuron_classes=np.repeat(np.arange(len(classes), dtype=np.int32), params.neurons_per_class),
        threshold=np.full(n, FRESH_THRESHOLD, np.int32),
        act_step=np.full(n, FRESH_ACT_STEP, np.float32),
        threshold_learning=np.full(n, FRESH_THRESHOLD_LEARNING, np.int32),
        thswap=np.full(n, params.num_weights, np.int32),
        usage=np.zeros(n, np.int64),
        classes=tuple(classes),
        num_weights=params.num_weights,
        learning_competition=params.learning_competition,
    )


def check_edge_bundle(bundle: Bundle, edge: EdgeSettings | None = None) -> None:
    """What can be checked against the bundle before any clinic is waited for."""
    if bundle.target != "v1":
        raise FederationError(
            f"learning akida-edge needs a v1 bundle (Akida 1.0 learns on-chip from 1-bit spikes); "
            f"{bundle.path} targets {bundle.target!r}. Pass --bundle with a v1 bundle (the package ships qana/bundles/v1)"
        )
    if edge is not None and edge.num_weights is not None and edge.num_weights > bundle.feature_dim:
        raise FederationError(
            f"run-config edge-num-weights={edge.num_weights} must be at most {bundle.feature_dim} (the bundle's backbone features)"
        )


def initial_edge_classes(bundle: Bundle, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The classes the federation starts with: run config `initial-classes` (known to the bundle), else the bundle's.

    Fresh neurons could be made for any name, but a class the backbone was not trained on
    belongs in a clinic's `new-classes` (it brings the images); a typo here would otherwise
    start a federation with a class nobody has.
    """
    if not wanted:
        return bundle.classes
    unknown = [c for c in wanted if c not in bundle.classes]
    if unknown:
        raise FederationError(
            f"initial-classes {', '.join(unknown)} are not classes of the bundle ({', '.join(bundle.classes)}); "
            "a clinic introduces other classes with node-config new-classes"
        )
    return tuple(wanted)


def class_additions(global_classes: tuple[str, ...], replies: Iterable[EdgeTrainReply]) -> list[tuple[str, str]]:
    """(class, clinic) for every class not in `global_classes`: the first clinic in id order that brought it."""
    additions: dict[str, str] = {}
    for r in sorted(replies, key=lambda r: r.clinic.clinic_id):
        for name in r.head.classes:
            if name not in global_classes and name not in additions:
                additions[name] = r.clinic.clinic_id
    return list(additions.items())


def weighted_metrics(metrics: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Flower's weighted mean of every metric by num-examples (as the gradient mode's strategies report), plus their sum."""
    records = [RecordDict({REC_METRICS: MetricRecord(dict(m))}) for m in metrics]
    if not records:
        return {}
    out = dict(aggregate_metricrecords(records, M_NUM_EXAMPLES))
    out[M_NUM_EXAMPLES] = sum(int(r[REC_METRICS][M_NUM_EXAMPLES]) for r in records)
    return out


@dataclass
class EdgeMerge:
    """The akida-edge "strategy": which clinics take part, and how their neurons become one head.

    Same shape as Flower's strategies (configure_* builds the messages, aggregate_* combines
    the validated replies), so the round loop reads like the gradient one. Sampling follows
    Flower's rule (fraction of the ready clinics, at least `min_clinics` of them when there are
    that many), seeded per round so a run is reproducible.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clinics: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        self._clinics_merged: set[str] = set()

    @property
    def clinics_merged(self) -> frozenset[str]:
        """Clinics whose heads have gone into this run's head: the merges so far, and the
        participants of an audited head the run continues (`remember_clinics`)."""
        return frozenset(self._clinics_merged)

    def remember_clinics(self, clinic_ids: Iterable[str]) -> None:
        self._clinics_merged |= set(clinic_ids)

    def _sample(self, server_round: int, grid: Grid, fraction: float, salt: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if fraction == 0.0 or not nodes:
            return []
        k = min(len(nodes), max(int(len(nodes) * fraction), self.min_clinics))
        return sorted(random.Random(f"{self.seed}-{server_round}-{salt}").sample(nodes, k))

    def configure_train(self, server_round: int, content: RecordDict, grid: Grid) -> list[Message]:
        return [
            Message(content, dst_node_id=n, message_type=MSG_TRAIN_EDGE, group_id=str(server_round))
            for n in self._sample(server_round, grid, self.fraction_train, 0)
        ]

    def aggregate_train(self, server_round: int, replies: list[EdgeTrainReply], spec: EdgeSpec) -> EdgeHead:
        """merge_edge_heads of the clinics' learned neurons, the round's neurons-per-class as the budget.

        Replies are taken in clinic-id order, so the merged head (and the order of classes
        clinics introduce: appended after the round's classes, first seen in that order) does
        not depend on the order in which replies arrived. When a clinic merged in an earlier
        round is missing from this one (not sampled, timed out, rejected, offline), the merge
        keeps idle learned neurons in spare budget: they hold what that clinic taught.
        """
        if not replies:
            raise ValueError("no edge heads to merge")
        ordered = sorted(replies, key=lambda r: r.clinic.clinic_id)
        present = {r.clinic.clinic_id for r in ordered}
        absent = sorted(self._clinics_merged - present)
        self._clinics_merged |= present
        if absent:
            log(INFO, "Round %d: %s missing from this merge; idle learned neurons are kept where there is room", server_round, ", ".join(absent))
        return merge_edge_heads(
            [r.head for r in ordered],
            budget_per_class=spec.neurons_per_class,
            seed=self.seed + server_round,
            classes=spec.classes,
            keep_idle_neurons=bool(absent),
        )

    def configure_evaluate(self, server_round: int, content: RecordDict, grid: Grid) -> list[Message]:
        return [
            Message(content, dst_node_id=n, message_type=MSG_EVALUATE_EDGE, group_id=str(server_round))
            for n in self._sample(server_round, grid, self.fraction_evaluate, 1)
        ]

    def aggregate_evaluate(self, server_round: int, metrics: Iterable[Mapping[str, float]]) -> dict[str, float]:
        return weighted_metrics(metrics)


class EdgeCoordinator(Coordinator):
    """One akida-edge run: the gradient coordinator's rounds (`Coordinator.run`) with edge heads,
    settings the clinics agree on, and the k-medoids merge."""

    learning = "akida-edge"
    training_phase = "edge learning"
    head_kind = "edge head"

    def __init__(self, grid: Grid, settings: FederationSettings, audit: Any, edge: EdgeSettings | None = None) -> None:
        if settings.initial_head == "bundle":
            raise FederationError(
                "initial-head bundle does not apply to akida-edge: the v1 bundle's head is a gradient-trained layer, "
                "not edge neurons; use auto (continue the audited edge head) or random (fresh neurons)"
            )
        super().__init__(grid, settings, audit)
        self.edge = edge or EdgeSettings()
        self.merge = EdgeMerge(settings.fraction_train, settings.fraction_evaluate, settings.min_clinics, settings.seed)
        self._settings_source = ""  # how the run's edge settings were decided (set when the run opens)

    # ------------------------------------------------------------------ settings and the first head

    def _strategy_config(self, spec: EdgeSpec, source: str) -> dict[str, Any]:
        s = self.settings
        return {
            "learning": "akida-edge",
            "merge": "usage-weighted Hamming k-medoids per class (qana.edge.merge_edge_heads)",
            "num_weights": spec.num_weights,
            "neurons_per_class": spec.neurons_per_class,
            "learning_competition": spec.learning_competition,
            "edge_epochs": self.edge.epochs,
            "settings_from": source,
            "min_clinics": s.min_clinics,
            "fraction_train": s.fraction_train,
            "fraction_evaluate": s.fraction_evaluate,
            "seed": s.seed,
        }

    def _ask_clinics(self, ready: list[int], bundle: Bundle) -> tuple[EdgeParams, dict[str, dict[str, float]]]:
        """Round 0: every ready clinic's own choice of settings, combined by federation_edge_params."""
        msgs = [self._message(edge_params_content(bundle.bundle_id, self.settings.seed), n, MSG_EDGE_PARAMS, 0) for n in ready]
        choices: list[EdgeParams] = []
        by_clinic: dict[str, dict[str, float]] = {}
        for reply in self._send(0, msgs, timeout=self.settings.round_timeout):
            name = self._clinic_name(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "Clinic %s could not choose edge settings: %s", name, reply.error.reason)
                continue
            try:
                got = validate_edge_params_reply(reply.content, bundle.bundle_id, bundle.feature_dim)
            except ProtocolError as exc:
                log(WARNING, "Clinic %s: invalid edge-params reply: %s", name, exc)
                self.audit.record_rejection(self.settings.run_id, 0, name, str(exc))
                continue
            choices.append(EdgeParams(got.num_weights, got.neurons_per_class, got.learning_competition, got.median_active))
            by_clinic[name] = {
                "num_examples": got.num_examples, "num_weights": got.num_weights,
                "neurons_per_class": got.neurons_per_class, "learning_competition": got.learning_competition,
                "median_active": got.median_active,
            }
        if not choices:
            raise FederationError(
                "no clinic reported edge-learning settings; set edge-num-weights, edge-neurons-per-class and "
                "edge-learning-competition in the run config"
            )
        return federation_edge_params(choices), by_clinic

    def _settle_params(self, ready: list[int], bundle: Bundle) -> tuple[EdgeParams, str, dict[str, dict[str, float]]]:
        e = self.edge
        by_clinic: dict[str, dict[str, float]] = {}
        if e.needs_clinics:
            chosen, by_clinic = self._ask_clinics(ready, bundle)
            source = f"auto: federation_edge_params of {len(by_clinic)} clinic(s)' choose_edge_params"
        else:
            chosen, source = EdgeParams(0, 0, 0.0, 0.0), "run config"
        params = EdgeParams(
            e.num_weights if e.num_weights is not None else chosen.num_weights,
            e.neurons_per_class if e.neurons_per_class is not None else chosen.neurons_per_class,
            e.learning_competition if e.learning_competition is not None else chosen.learning_competition,
            chosen.median_active,
        )
        if e.needs_clinics and not all(v is None for v in (e.num_weights, e.neurons_per_class, e.learning_competition)):
            source += " (run-config values kept where given)"
        return params, source, by_clinic

    def _resumable(self, bundle: Bundle) -> tuple[EdgeHead, str, bytes] | None:
        """The current audited head, if it is an edge head for this backbone (with `initial-classes`, exactly those)."""
        current = self.audit.current_version("head")
        if current is None or self.audit.version(current).backbone != self.backbone_version:
            return None
        data = self.audit.artifact_of(current)
        try:
            head = EdgeHead.from_npz(data)
        except ValueError:
            return None  # a gradient head of the same backbone
        wanted = self.settings.initial_classes
        if head.num_features != bundle.feature_dim or not head.is_uniform or (wanted and head.classes != wanted):
            return None  # (without initial-classes the head is continued whatever its classes: it may have grown)
        e = self.edge
        wanted = (e.num_weights, e.neurons_per_class, e.learning_competition)
        have = (head.num_weights, head.neurons_per_class, head.learning_competition)
        if any(w is not None and w != h for w, h in zip(wanted, have)):
            log(INFO, "Current edge head %s has settings %s, the run config asks %s; starting fresh", current, have, wanted)
            return None
        return head, current, data

    def _run_bundle(self) -> Bundle:
        from qana.bundle import load_default_bundle

        s = self.settings
        bundle = load_bundle(s.bundle) if s.bundle else load_default_bundle("v1")
        check_edge_bundle(bundle, self.edge)
        initial_edge_classes(bundle, s.initial_classes)  # a wrong class name fails before anything is audited or awaited
        return bundle

    def _run_description(self) -> dict[str, Any]:
        return {"strategy": STRATEGY_NAME}

    def _prepare_opening(self, bundle: Bundle) -> Callable[[list[int]], Opening]:
        return lambda ready: self._start(ready, bundle)  # the fresh head's settings may need the clinics

    def _start(self, ready: list[int], bundle: Bundle) -> Opening:
        """Continue the audited edge head, or make fresh neurons with settings the clinics agree on."""
        s = self.settings
        if s.initial_head == "auto":
            found = self._resumable(bundle)
            if found is not None:
                head, version, data = found
                log(INFO, "Starting from the current edge head %s", version)
                # its clinics count as merged: one missing from the first round keeps its neurons
                self.merge.remember_clinics(p.clinic_id for p in self.audit.version(version).participants)
                return self._opened(Opening(head, data, version, self._spec_of(head, bundle)), f"continued from {version}", {})
        classes = initial_edge_classes(bundle, s.initial_classes)
        params, source, by_clinic = self._settle_params(ready, bundle)
        head = fresh_edge_head(bundle.feature_dim, classes, params, s.seed)
        note = f"initial edge head (fresh neurons, seed {s.seed}) for bundle {bundle.bundle_id}" + (
            f", classes {', '.join(head.classes)} (initial-classes)" if s.initial_classes else ""
        )
        opening = Opening(head, head.to_npz(), None, self._spec_of(head, bundle), note, {"edge_clinic_choices": by_clinic})
        return self._opened(opening, source, by_clinic)

    @staticmethod
    def _spec_of(head: EdgeHead, bundle: Bundle) -> EdgeSpec:
        return EdgeSpec(bundle.feature_dim, head.classes, head.num_weights, head.neurons_per_class, head.learning_competition)

    def _opened(self, opening: Opening, source: str, clinic_choices: dict[str, dict[str, float]]) -> Opening:
        """Log and publish the run's edge settings; every audited head names where they came from."""
        spec = opening.spec
        self._settings_source = source
        log(INFO, "Edge settings (%s): %d weights, %d neurons/class, competition %g", source,
            spec.num_weights, spec.neurons_per_class, spec.learning_competition)
        self._write_status(edge_settings={**self._strategy_config(spec, source), "clinic_choices": clinic_choices})
        return opening

    # ------------------------------------------------------------------ rounds

    def _head_bytes(self, head: EdgeHead) -> bytes:
        return head.to_npz()

    def _record_round(self, round_: int, data: bytes, parent: str | None, participants, metrics, spec: EdgeSpec, note: str | None) -> str:
        info = self.audit.record_head(
            self.settings.run_id, round_, data, head_id(data), parent=parent, strategy=STRATEGY_NAME,
            strategy_config=self._strategy_config(spec, self._settings_source), participants=participants,
            aggregate_metrics=metrics, backbone=self.backbone_version, note=note,
        )
        return str(info.version)

    def _train_round(self, round_: int, head: EdgeHead, sha: str, spec: EdgeSpec, grid: Grid, bundle_id: str) -> RoundUpdate:
        s = self.settings
        settings = EdgeTrainSettings(
            round_, bundle_id, sha, spec.num_weights, spec.neurons_per_class, spec.learning_competition, self.edge.epochs, s.seed
        )
        msgs = self.merge.configure_train(round_, train_edge_content(head, settings), grid)
        replies = self._send(round_, msgs, timeout=s.round_timeout)
        t0 = time.perf_counter()
        screened, participants, rejected, failed = self._screen_train_replies(
            round_, msgs, replies, lambda content: validate_train_edge_reply(content, spec, bundle_id)
        )
        accepted: list[EdgeTrainReply] = [update for _reply, update in screened]
        merged = self.merge.aggregate_train(round_, accepted, spec) if accepted else None
        if merged is not None:
            for name, clinic in class_additions(spec.classes, accepted):
                self.audit.record_class_addition(s.run_id, round_, name, clinic)
                log(INFO, "Round %d: class %r added by %s; the edge head now has %d classes", round_, name, clinic, merged.num_classes)
        self._server_time += time.perf_counter() - t0
        train_metrics = weighted_metrics(u.metrics for u in accepted)
        return RoundUpdate(merged, train_metrics, participants, rejected, failed, "no valid edge update")

    def _evaluate(self, round_: int, head: EdgeHead, sha: str, grid: Grid, bundle_id: str):
        msgs = self.merge.configure_evaluate(round_, evaluate_edge_content(head, EdgeEvaluateSettings(round_, bundle_id, sha)), grid)
        replies = self._send(round_, msgs, timeout=self.settings.round_timeout)
        t0 = time.perf_counter()
        per_clinic = {name: dict(result.metrics) for _reply, name, result in self._screen_evaluate_replies(round_, replies, bundle_id, sha)}
        metrics = self.merge.aggregate_evaluate(round_, per_clinic.values())
        self._server_time += time.perf_counter() - t0
        return metrics, list(per_clinic), per_clinic


def read_run_config(run_config: Mapping[str, Any], run_id: str) -> tuple[FederationSettings, EdgeSettings | None]:
    """The run's settings, and its edge settings when learning is akida-edge (None for gradient runs).

    Edge keys set to anything but their defaults in a gradient run are an error: they would
    otherwise be silently ignored. (A deployed Flower app passes every key it declares, with
    its default, so defaults alone are not a mistake.)
    """
    fed, edge = split_run_config(run_config)
    settings = FederationSettings.from_run_config(fed, run_id=run_id)
    if settings.learning == "akida-edge":
        return settings, EdgeSettings.from_run_config(edge)
    changed = sorted(k for k, v in edge.items() if v != EDGE_RUN_CONFIG_DEFAULTS[k])
    if changed:
        raise FederationError(f"run-config {', '.join(changed)} only apply to learning akida-edge (learning is {settings.learning!r})")
    return settings, None
