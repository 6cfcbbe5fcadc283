"""The coordinator loop on an in-process Grid: rounds, strategies, rejections, dropouts, audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fed_helpers import (
    FEATURES,
    NumpyClinic,
    add_record,
    head_accuracy,
    make_numpy_bundle,
    replace_head_array,
    set_clinic_key,
    set_metric,
)
from flwr.app import Array, ArrayRecord, RecordDict

from protocols import messages as P
from qana.head import head_from_npz, select_classes
from server.audit import AuditLog, EntryFilter
from server.federation import Coordinator, FederationError, FederationSettings
from server.loopback import LoopbackGrid
from server.strategies import STRATEGIES, StrategyError, build_strategy


@pytest.fixture
def bundle(tmp_path: Path):
    return make_numpy_bundle(tmp_path / "bundle")


@pytest.fixture
def audit(tmp_path: Path):
    log = AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "audit_key.pem")
    yield log
    log.close()


def settings(tmp_path: Path, bundle, **overrides) -> FederationSettings:
    config = {
        "bundle": str(bundle.path),
        "num-rounds": 2,
        "local-epochs": 8,
        "learning-rate": 0.05,
        "state-dir": str(tmp_path / "state"),
        "wire-log": True,
        "round-timeout": 5.0,
        "wait-for-clinics": 0.0,
    }
    config.update(overrides)
    return FederationSettings.from_run_config(config, run_id="run-1")


def clinics(bundle, n: int = 3, **kw) -> dict[int, NumpyClinic]:
    return {100 + i: NumpyClinic(f"clinic-{i}", bundle, seed=i, **kw) for i in range(n)}


def test_rounds_improve_the_head_and_every_version_is_audited(tmp_path, bundle, audit) -> None:
    nodes = clinics(bundle)
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle), audit).run()
    heads = [e for e in audit.entries() if e.kind == "head"]
    assert [e.version for e in heads] == ["h1", "h2", "h3"]
    assert [r.head_version for r in result.rounds] == ["h1", "h2", "h3"]
    first = head_from_npz(audit.artifact_of("h1"))
    last = head_from_npz(audit.artifact_of("h3"))
    assert head_accuracy(last) > head_accuracy(first) + 0.3
    assert result.rounds[-1].evaluate_metrics["top1"] > result.rounds[0].evaluate_metrics["top1"] + 0.3
    h3 = audit.version("h3")
    assert h3.parent == "h2" and h3.backbone == "b1" and h3.round == 2 and h3.strategy == "fedavg"
    assert sorted(p.clinic_id for p in h3.participants) == ["clinic-0", "clinic-1", "clinic-2"]
    assert h3.metrics["evaluate"]["top1"] == pytest.approx(result.rounds[-1].evaluate_metrics["top1"])
    assert "evaluate" not in h3.aggregate_metrics and h3.aggregate_metrics["train"]  # scored after it was recorded
    # every head is recorded before any clinic receives it: its entry comes before its
    # evaluation entry, which comes before the clinics' deployment entries
    for version in ("h1", "h2", "h3"):
        about = [e for e in audit.entries() if e.version == version]
        assert [e.kind for e in about] == ["head", "evaluation", "deployment", "deployment", "deployment"], version
    # the backbone went to every clinic once and each evaluated head was deployed
    deployments = audit.deployments()
    assert sum(d.version == "b1" for d in deployments) == 3
    assert sum(d.version == "h3" for d in deployments) == 3
    assert audit.verify().ok


def test_bundle_only_sent_to_clinics_that_lack_it(tmp_path, bundle, audit) -> None:
    nodes = clinics(bundle)
    nodes[100].has_bundle = True
    Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    deploys = {n: sum(m.metadata.message_type == P.MSG_DEPLOY for m in c.received) for n, c in nodes.items()}
    assert deploys == {100: 0, 101: 1, 102: 1}
    hellos = {n: sum(m.metadata.message_type == P.MSG_HELLO for m in c.received) for n, c in nodes.items()}
    assert hellos == {100: 1, 101: 1, 102: 1}  # known clinics are not greeted again every round


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (replace_head_array(P.ARR_WEIGHTS_Q, np.zeros((FEATURES, 6), np.int8)), "shape"),
        (replace_head_array(P.ARR_WEIGHTS_Q, np.zeros((FEATURES, 7), np.float32)), "dtype float32"),
        (replace_head_array(P.ARR_SCALE, np.array([np.nan], np.float32)), "NaN/Inf"),
        (set_clinic_key(P.K_BUNDLE_ID, "0" * 64), "backbone"),
        (set_metric(P.M_NUM_EXAMPLES, -3), "num-examples"),
        (set_metric(P.M_NUM_EXAMPLES, 10**15), "more than the 1,000,000 images"),  # would outweigh every other clinic
        (replace_head_array(P.ARR_SCALE, np.array([1e36], np.float32)), "when dequantized"),  # finite, Inf in float32
        (add_record("features", ArrayRecord()), "does not allow: features"),
    ],
)
def test_malformed_update_is_rejected_logged_recorded_and_round_continues(tmp_path, bundle, audit, tamper, reason) -> None:
    nodes = clinics(bundle)
    nodes[102].tamper = tamper
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    round1 = result.rounds[1]
    assert round1.head_version == "h2"
    assert sorted(round1.participants) == ["clinic-0", "clinic-1"]
    assert reason in round1.rejected["clinic-2"]
    rejections = audit.entries(EntryFilter(kinds=("rejection",)))
    assert len(rejections) == 1
    assert rejections[0].body["clinic_id"] == "clinic-2" and reason in rejections[0].body["reason"]
    assert [p.clinic_id for p in audit.version("h2").participants] == ["clinic-0", "clinic-1"]


def test_a_second_node_claiming_a_clinic_id_in_use_is_left_out(tmp_path, bundle, audit) -> None:
    """Two nodes as one clinic would make the audit log refuse the round after the head was sent out."""
    nodes = clinics(bundle)
    nodes[103] = NumpyClinic("clinic-1", bundle, seed=3)
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 2}), audit).run()
    assert [r.head_version for r in result.rounds] == ["h1", "h2", "h3"]
    assert sorted(result.rounds[2].participants) == ["clinic-0", "clinic-1", "clinic-2"]
    assert not any(m.metadata.message_type in (P.MSG_TRAIN, P.MSG_EVALUATE) for m in nodes[103].received)
    assert [p.clinic_id for p in audit.version("h3").participants] == ["clinic-0", "clinic-1", "clinic-2"]


def test_a_node_naming_another_clinic_than_its_registered_key_is_left_out(tmp_path, bundle, audit) -> None:
    """With node authentication the registry (`qana-server nodes register`) says whose key each node has."""
    nodes = clinics(bundle)
    nodes[102] = NumpyClinic("clinic-9", bundle, seed=2)  # node 102's key is clinic-2's
    state = tmp_path / "state"
    state.mkdir()
    registry = {f"clinic-{i}": {"node_id": str(100 + i), "revoked": False} for i in range(3)}
    (state / "nodes.json").write_text(json.dumps({"clinics": registry}))
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    assert sorted(result.rounds[1].participants) == ["clinic-0", "clinic-1"]
    assert not any(m.metadata.message_type == P.MSG_TRAIN for m in nodes[102].received)


def test_failed_and_vanished_clinics_do_not_stop_the_round(tmp_path, bundle, audit) -> None:
    nodes = clinics(bundle, n=4)
    nodes[101].fail_train = True
    grid = LoopbackGrid(nodes)

    class VanishAfterRoundOne(Coordinator):
        def _train(self, round_, *args, **kwargs):
            if round_ == 2:
                grid.handlers.pop(103)  # killed: it never answers again
            return super()._train(round_, *args, **kwargs)

    # min-clinics 2: the run goes on with whoever is left
    result = VanishAfterRoundOne(grid, settings(tmp_path, bundle, **{"min-clinics": 2}), audit).run()
    r1, r2 = result.rounds[1], result.rounds[2]
    assert sorted(r1.participants) == ["clinic-0", "clinic-2", "clinic-3"]
    assert "clinic crashed" in r1.failed["clinic-1"]
    assert sorted(r2.participants) == ["clinic-0", "clinic-2"]
    assert r2.head_version == "h3"


@pytest.mark.timeout(60)
def test_clinic_that_goes_silent_mid_run_is_left_out_even_below_min_clinics(tmp_path, bundle, audit) -> None:
    """Killed after the hello: still listed by the Grid, never answers. The round must not hang."""
    nodes = clinics(bundle, n=3)
    grid = LoopbackGrid(nodes)

    class SilentInRoundTwo(Coordinator):
        def _train(self, round_, *args, **kwargs):
            if round_ == 2:
                grid.silent.add(102)
            return super()._train(round_, *args, **kwargs)

    result = SilentInRoundTwo(grid, settings(tmp_path, bundle, **{"min-clinics": 3}), audit).run()
    r2 = result.rounds[2]
    assert r2.head_version == "h3" and sorted(r2.participants) == ["clinic-0", "clinic-1"]
    assert "no reply" in r2.failed["clinic-2"]
    evaluations = [m for m in nodes[102].received if m.metadata.message_type == P.MSG_EVALUATE]
    assert len(evaluations) == 2  # rounds 0 and 1; not asked again after it stopped answering
    assert sorted(audit.version("h3").metrics["evaluate_by_clinic"]) == ["clinic-0", "clinic-1"]


def test_round_without_valid_updates_keeps_the_head(tmp_path, bundle, audit) -> None:
    nodes = clinics(bundle, n=2)
    for c in nodes.values():
        c.tamper = replace_head_array(P.ARR_SCALE, np.array([np.inf], np.float32))
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    assert result.rounds[1].head_version is None and result.final_head_version == "h1"
    assert len(audit.entries(EntryFilter(kinds=("rejection",)))) == 2


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_through_flower(tmp_path, bundle, audit, name) -> None:
    options = {"fedprox": "proximal_mu=0.01", "fedadam": "eta=0.05,eta_l=0.05", "fedtrimmedavg": "beta=0.2"}.get(name, "")
    cfg = settings(tmp_path, bundle, strategy=name, **{"strategy-options": options, "num-rounds": 2})
    result = Coordinator(LoopbackGrid(clinics(bundle, n=4)), cfg, audit).run()
    assert result.final_head_version == "h3"
    assert audit.version("h3").strategy == name
    assert result.rounds[-1].evaluate_metrics["top1"] > result.rounds[0].evaluate_metrics["top1"]


def test_fedprox_sends_proximal_mu_to_clinics(tmp_path, bundle, audit) -> None:
    nodes = clinics(bundle, n=2)
    cfg = settings(tmp_path, bundle, strategy="FedProx", **{"strategy-options": "proximal_mu=0.25", "num-rounds": 1})
    Coordinator(LoopbackGrid(nodes), cfg, audit).run()
    train = [m for m in nodes[100].received if m.metadata.message_type == P.MSG_TRAIN][0]
    assert train.content[P.REC_CONFIG][P.K_PROXIMAL_MU] == 0.25


def test_next_run_starts_from_the_current_head_and_respects_rollback(tmp_path, bundle, audit) -> None:
    Coordinator(LoopbackGrid(clinics(bundle, n=2)), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    audit.rollback("h1", reason="test")
    nodes = clinics(bundle, n=2)
    result = Coordinator(LoopbackGrid(nodes), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    assert result.initial_head_version == "h1"
    assert audit.version(result.final_head_version).parent == "h1"
    assert len([e for e in audit.entries() if e.kind == "backbone"]) == 1  # same bundle, one backbone version


def test_wire_log_shows_only_head_arrays_from_clinics(tmp_path, bundle, audit) -> None:
    Coordinator(LoopbackGrid(clinics(bundle)), settings(tmp_path, bundle), audit).run()
    entries = [json.loads(line) for line in (tmp_path / "state" / "wire.jsonl").read_text().splitlines()]
    replies = [e for e in entries if e["direction"] == "in"]
    assert {e["message_type"] for e in replies} == {"query.hello", "query.deploy", "train", "evaluate"}
    for e in replies:
        arrays = {name: rec for name, rec in e["content"].items() if rec["kind"] == "arrays"}
        if e["message_type"] == "train":
            assert set(arrays) == {"head"}
            assert {k: (v["dtype"], v["shape"]) for k, v in arrays["head"]["items"].items()} == {
                "weights-q": ("int8", [FEATURES, 7]), "bias-q": ("int32", [7]), "scale": ("float32", [1])
            }
        else:
            assert arrays == {}
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["phase"] == "finished" and status["head_version"] == "h3"
    assert {c["clinic_id"] for c in status["clinics"].values()} == {"clinic-0", "clinic-1", "clinic-2"}


def test_bad_run_config_is_a_clear_error(tmp_path, bundle) -> None:
    with pytest.raises(FederationError, match="unknown run-config key"):
        FederationSettings.from_run_config({"num-round": 3}, "r")
    with pytest.raises(FederationError, match="num-rounds"):
        FederationSettings.from_run_config({"num-rounds": 0}, "r")
    with pytest.raises(FederationError, match="unknown strategy 'fedsgd'"):
        FederationSettings.from_run_config({"strategy": "fedsgd"}, "r")
    with pytest.raises(StrategyError, match="does not take option"):
        build_strategy("fedavg", {"eta": 0.1})
    with pytest.raises(StrategyError, match="beta=0.7: must be a number >= 0 and < 0.5"):
        build_strategy("fedtrimmedavg", {"beta": 0.7})
    # values every clinic would refuse (protocols.messages) are refused here, before any round
    with pytest.raises(FederationError, match="run-config l2=1e[+]300 must be between"):
        FederationSettings.from_run_config({"l2": 1e300}, "r")
    with pytest.raises(StrategyError, match="proximal_mu=10000000.0: must be a number >= 0 and < 1e[+]06"):
        build_strategy("fedprox", {"proximal_mu": 1e7})
    from server.strategies import parse_options

    with pytest.raises(StrategyError, match="strategy option proximal_mu is given twice"):
        parse_options("proximal_mu=0.1, proximal-mu=0.9")  # the last value used to win silently
    from server.strategies import check_options

    options = parse_options("num_malicious_nodes=+1")
    assert type(options["num_malicious_nodes"]) is int  # was 1.0, which krum then refused as "not a whole number"
    check_options("krum", options)
    from server.edge_rounds import EdgeSettings

    with pytest.raises(FederationError, match="edge-learning-competition=1.5 must be a number up to 1"):
        EdgeSettings.from_run_config({"edge-learning-competition": 1.5})


def test_every_strategy_builds_with_its_default_options() -> None:
    """The value ranges qana-server and qana-sim check must admit Flower's own defaults."""
    from server.strategies import STRATEGIES, strategy_options

    for name in STRATEGIES:
        build_strategy(name, strategy_options(name))


def test_too_few_clinics_is_a_clear_error(tmp_path, bundle, audit) -> None:
    with pytest.raises(FederationError, match="only 1 clinic"):
        Coordinator(LoopbackGrid(clinics(bundle, n=1)), settings(tmp_path, bundle, **{"min-clinics": 2}), audit).run()


def test_a_class_introduced_by_one_clinic_reaches_every_clinic_and_the_audit_log(tmp_path, bundle, audit) -> None:
    """Class-incremental live rounds: the federation starts without df; clinic-0 brings it in round 2."""
    from fed_helpers import clinic_data, columns

    from qana.classes import CLASS_NAMES
    from qana.head import predict

    df = CLASS_NAMES.index("df")
    without_df = tuple(i for i in range(len(CLASS_NAMES)) if i != df)
    nodes = {
        100: NumpyClinic("clinic-0", bundle, seed=0, n=200, new_class="df", new_from_round=2),
        101: NumpyClinic("clinic-1", bundle, seed=1, data_classes=without_df),
        102: NumpyClinic("clinic-2", bundle, seed=2, data_classes=without_df),
    }
    old = tuple(c for c in CLASS_NAMES if c != "df")
    cfg = settings(tmp_path, bundle, **{"num-rounds": 3, "initial-classes": ",".join(old), "initial-head": "random"})
    result = Coordinator(LoopbackGrid(nodes), cfg, audit).run()
    heads = {e.version: head_from_npz(audit.artifact_of(e.version)) for e in audit.entries() if e.kind == "head"}
    assert [heads[r.head_version].classes for r in result.rounds] == [old, old, (*old, "df"), (*old, "df")]
    # every clinic evaluated the grown head from round 2 on (the new class reached all of them)
    for clinic in nodes.values():
        assert clinic.evaluated_classes[-2:] == [(*old, "df"), (*old, "df")]
    additions = [e for e in audit.entries() if e.kind == "class_addition"]
    assert [(e.body["class_name"], e.body["clinic_id"], e.body["round"]) for e in additions] == [("df", "clinic-0", 2)]
    grown_round = result.rounds[2]
    assert "df" in audit.version(grown_round.head_version).note
    assert audit.verify().ok
    # the merged head recognises df, and the old classes stay as good as before it arrived
    x, y = clinic_data(600, seed=999)
    final, before = heads[result.rounds[-1].head_version], heads[result.rounds[1].head_version]
    is_df = y == df
    assert np.mean(predict(final, x[is_df]) == final.classes.index("df")) > 0.7
    old_cols = columns(y[~is_df], old)
    acc_before = np.mean(predict(before, x[~is_df]) == old_cols)
    acc_after = np.mean(predict(final, x[~is_df]) == old_cols)
    assert acc_after >= acc_before - 0.03, (acc_before, acc_after)


def test_adding_a_class_is_no_way_around_a_robust_strategy(tmp_path, bundle, audit) -> None:
    """An attacker who appends a class and claims the most examples still meets fedmedian on the old classes."""
    def poison(content):
        arrays = dict(content[P.REC_HEAD].items())
        arrays[P.ARR_WEIGHTS_Q] = Array(-arrays[P.ARR_WEIGHTS_Q].numpy())  # every old class pushed the wrong way
        return set_metric(P.M_NUM_EXAMPLES, P.MAX_NUM_EXAMPLES)(
            RecordDict({P.REC_HEAD: ArrayRecord(arrays), P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: content[P.REC_CLINIC]})
        )

    nodes = clinics(bundle, n=4)
    nodes[103] = NumpyClinic("clinic-3", bundle, seed=3, new_class="zzz", tamper=poison)
    cfg = settings(tmp_path, bundle, strategy="fedmedian", **{"num-rounds": 1, "initial-head": "random"})
    result = Coordinator(LoopbackGrid(nodes), cfg, audit).run()
    grown = head_from_npz(audit.artifact_of(result.rounds[1].head_version))
    assert grown.classes[-1] == "zzz"  # the class was added ...
    honest = Coordinator(LoopbackGrid(clinics(bundle, n=3)), settings(tmp_path / "honest", bundle, strategy="fedmedian",
                         **{"num-rounds": 1, "initial-head": "random"}), audit).run()
    reference = head_accuracy(head_from_npz(audit.artifact_of(honest.rounds[1].head_version)))
    # ... but the old classes are the median of the heads, not the attacker's (example-weighted: accuracy near 0)
    assert head_accuracy(select_classes(grown, grown.classes[:-1])) > reference - 0.1 > 0.5


def test_initial_classes_must_be_classes_of_the_bundle_head(tmp_path, bundle, audit) -> None:
    cfg = settings(tmp_path, bundle, **{"initial-classes": "nv,scc", "initial-head": "bundle"})
    with pytest.raises(FederationError, match="scc"):
        Coordinator(LoopbackGrid(clinics(bundle)), cfg, audit).run()
    with pytest.raises(FederationError, match="listed twice"):
        settings(tmp_path, bundle, **{"initial-classes": "nv,nv"})


def test_a_gradient_run_after_an_akida_edge_run_on_the_same_backbone_starts_from_the_bundle_head(tmp_path, bundle, audit) -> None:
    """The current audited head may be an akida-edge head of this very backbone (a v1 bundle
    federates both ways): initial-head auto cannot continue it and must start from the bundle's
    head instead of stopping on "not a valid head file"."""
    from qana.bundle import pack_bundle
    from qana.edge import EdgeParams
    from server.edge_rounds import fresh_edge_head

    backbone = audit.record_backbone(pack_bundle(bundle), run_id="edge-run").version
    edge = fresh_edge_head(bundle.feature_dim, bundle.classes, EdgeParams(8, 2, 0.1, 4.0), seed=0).to_npz()
    audit.record_head("edge-run", 1, edge, parent=None, backbone=backbone, strategy="akida-edge", strategy_config={}, participants=[], aggregate_metrics={})
    result = Coordinator(LoopbackGrid(clinics(bundle)), settings(tmp_path, bundle, **{"num-rounds": 1}), audit).run()
    assert [r.head_version for r in result.rounds] == ["h2", "h3"]
    start = audit.version("h2")
    assert start.backbone == backbone and start.parent is None
    assert head_from_npz(audit.artifact_of("h2")).classes == bundle.classes

