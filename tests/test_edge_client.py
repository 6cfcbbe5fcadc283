"""A clinic's akida-edge rounds through the deployment's ClientApp, on the real tiny v1 bundle.

The fixture's random v1 backbone is silent (all-zero spikes for every image), so the clinic's
feature cache is filled with class-dependent binary spikes before the bundle is deployed: the
clinic finds every image's features cached (as after a real deployment) and learns on them with
Akida's own algorithm. Everything else is the real path: bundle cache, persistent split, the
`query.edge_params`, `train.edge` and `evaluate.edge` handlers, Flower's serialisation both ways.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from synthetic import make_synthetic_ham

from client.app import app as client_app
from client.clinic import DEPLOYED_EDGE_DIR
from client.features import FeatureCache
from protocols import edge_messages as E
from protocols import messages as P
from qana import edge
from qana.bundle import load_bundle, pack_bundle
from qana.data import load_dataset
from server.edge_rounds import fresh_edge_head
from server.loopback import LoopbackGrid

BUNDLES = Path(__file__).parent / "fixtures" / "bundles"
HEAD_SHA = "cd" * 32


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLES / "tiny-v1")


def spikes_for(labels: np.ndarray, d: int, seed: int = 0) -> np.ndarray:
    """One fixed 8-of-d bit pattern per class, 3 % of bits flipped per image."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((7, d), np.uint8)
    for c in range(7):
        patterns[c, rng.choice(d, 8, replace=False)] = 1
    x = patterns[labels]
    return x ^ (rng.random(x.shape) < 0.03).astype(np.uint8)


@pytest.fixture
def clinic(tmp_path: Path, bundle):
    """(context, dataset) of a clinic whose feature cache holds binary spikes for every image."""
    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=70, image_size=bundle.input_shape[0], seed=8)
    cache = tmp_path / "cache"
    ds = load_dataset(data, size=bundle.input_shape[0], cache_dir=cache, class_names=bundle.classes)
    FeatureCache(cache, bundle)._save(ds.content_hashes.astype("U64"), spikes_for(ds.labels, bundle.feature_dim).astype(np.int16))
    config = {"data-dir": str(data), "clinic-id": "clinic-e", "device": "software", "cache-dir": str(cache)}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={}), ds


def send(content: RecordDict, message_type: str, ctx: Context) -> Message:
    grid = LoopbackGrid({7: lambda msg: client_app(msg, ctx)})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=7, message_type=message_type)])
    return reply


def test_clinic_chooses_settings_learns_from_the_global_neurons_and_evaluates_on_akida(clinic, bundle) -> None:
    ctx, ds = clinic
    deployed = send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    assert not deployed.has_error(), deployed.error.reason if deployed.has_error() else ""
    # round 0: the clinic's own choice of settings, three numbers and a spike count
    got = send(E.edge_params_content(bundle.bundle_id, seed=0), E.MSG_EDGE_PARAMS, ctx)
    assert not got.has_error(), got.error.reason if got.has_error() else ""
    params = E.validate_edge_params_reply(got.content, bundle.bundle_id, bundle.feature_dim)
    assert params.clinic.clinic_id == "clinic-e" and 1 <= params.num_weights <= bundle.feature_dim
    assert 7 <= params.median_active <= 10  # 8 pattern bits, a few flipped
    # a round of learning from fresh global neurons
    npc, nw = 2, params.num_weights
    start = fresh_edge_head(bundle.feature_dim, bundle.classes, edge.EdgeParams(nw, npc, 0.1, 0.0), seed=0)
    settings = E.EdgeTrainSettings(1, bundle.bundle_id, HEAD_SHA, nw, npc, 0.1, 1, 0)
    trained = send(E.train_edge_content(start, settings), E.MSG_TRAIN_EDGE, ctx)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    spec = E.EdgeSpec(bundle.feature_dim, bundle.classes, nw, npc, 0.1)
    update = E.validate_train_edge_reply(trained.content, spec, bundle.bundle_id)
    assert update.clinic.clinic_id == "clinic-e" and update.metrics[P.M_DEVICE_AGREEMENT] == 1.0
    assert update.head.learned.any() and update.metrics[P.M_TRAIN_TOP1] > 0.8
    # usage: every local training image is won by one neuron (the merge's weight)
    assert int(update.head.usage.sum()) == update.num_examples < len(ds)
    # the clinic went on from the neurons it was sent: unlearned classes keep their fresh neurons
    absent = [c for c in range(7) if update.head.usage[update.head.neuron_classes == c].sum() == 0]
    for c in absent:
        rows = update.head.neuron_classes == c
        assert np.array_equal(update.head.weights[rows], start.weights[rows])
    # evaluation of the learned head on the held-out images, on Akida
    evaluated = send(E.evaluate_edge_content(update.head, E.EdgeEvaluateSettings(1, bundle.bundle_id, HEAD_SHA)), E.MSG_EVALUATE_EDGE, ctx)
    assert not evaluated.has_error(), evaluated.error.reason if evaluated.has_error() else ""
    result = P.validate_evaluate_reply(evaluated.content, bundle.bundle_id, HEAD_SHA)
    m = result.metrics
    assert m[P.M_DEVICE_AGREEMENT] == 1.0 and m[P.M_NUM_EXAMPLES] == len(ds) - update.num_examples
    assert m[P.M_TOP1] > 0.7 and set(m) == {P.M_NUM_EXAMPLES, P.M_TOP1, P.M_MACRO_F1, P.M_BALANCED_ACCURACY, P.M_DEVICE_AGREEMENT}
    saved = Path(ctx.node_config["cache-dir"]) / "deployed-edge" / bundle.bundle_id / "edge_head.npz"
    kept = edge.EdgeHead.from_npz(saved.read_bytes())
    for name in ("weights_packed", "threshold", "act_step", "threshold_learning", "thswap", "usage"):
        assert np.array_equal(getattr(kept, name), getattr(update.head, name)), name


def test_edge_instructions_with_a_v2_bundle_or_silent_backbone_are_refused_clearly(tmp_path, bundle) -> None:
    v2 = load_bundle(BUNDLES / "tiny-v2")
    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=30, image_size=v2.input_shape[0], seed=2)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                  node_config={"data-dir": str(data), "clinic-id": "c", "device": "software", "cache-dir": str(tmp_path / "cache")})
    send(P.deploy_content(v2.bundle_id, pack_bundle(v2)), P.MSG_DEPLOY, ctx)
    reply = send(E.edge_params_content(v2.bundle_id, seed=0), E.MSG_EDGE_PARAMS, ctx)
    assert reply.has_error() and "akida-edge learning needs a v1 bundle" in reply.error.reason
    # the real tiny v1 backbone emits no spikes: choosing settings says so instead of learning nothing
    ctx.node_config["cache-dir"] = str(tmp_path / "cache-v1")
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    reply = send(E.edge_params_content(bundle.bundle_id, seed=0), E.MSG_EDGE_PARAMS, ctx)
    assert reply.has_error() and "no spikes" in reply.error.reason


def test_a_clinic_with_new_classes_grows_the_edge_head_and_the_chip_agrees(clinic, bundle) -> None:
    """node-config new-classes=scc from round 2: round 1 leaves scc images out, round 2 adds scc neurons and learns them on-chip."""
    ctx, ds = clinic
    meta = Path(ctx.node_config["data-dir"]) / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(",df,", ",scc,"))  # a diagnosis the bundle does not know; spikes stay cached
    ctx.node_config.update({"new-classes": "scc", "new-classes-from-round": 2})
    deployed = send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    assert not deployed.has_error(), deployed.error.reason if deployed.has_error() else ""
    old = tuple(c for c in bundle.classes if c != "df")  # the federation started without df (initial-classes)
    npc, nw = 2, 10
    head = fresh_edge_head(bundle.feature_dim, old, edge.EdgeParams(nw, npc, 0.1, 0.0), seed=0)
    spec = E.EdgeSpec(bundle.feature_dim, old, nw, npc, 0.1)
    updates = []
    for round_ in (1, 2):
        settings = E.EdgeTrainSettings(round_, bundle.bundle_id, HEAD_SHA, nw, npc, 0.1, 1, 0)
        reply = send(E.train_edge_content(head, settings), E.MSG_TRAIN_EDGE, ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        updates.append(E.validate_train_edge_reply(reply.content, spec, bundle.bundle_id))
    before, grown = updates[0].head, updates[1].head
    assert before.classes == old  # round 1 < new-classes-from-round: scc images were left out of learning
    assert grown.classes == (*old, "scc") and grown.is_uniform and grown.neurons_per_class == npc
    assert updates[1].metrics[P.M_DEVICE_AGREEMENT] == 1.0
    # the new neurons learned exactly the scc training images the clinic left out in round 1
    scc_train = updates[1].num_examples - updates[0].num_examples
    scc = grown.neuron_classes == len(old)
    assert scc_train > 0 and int(grown.usage[scc].sum()) == scc_train and grown.learned[scc].any()
    # the old classes' neurons still won every other training image (scc images went to scc neurons only)
    assert int(grown.usage[~scc].sum()) == updates[0].num_examples
    # the grown head on Akida: evaluation now scores the held-out scc images too, and the chip decides as the reference
    results = []
    for h in (before, grown):
        ev = send(E.evaluate_edge_content(h, E.EdgeEvaluateSettings(2, bundle.bundle_id, HEAD_SHA)), E.MSG_EVALUATE_EDGE, ctx)
        assert not ev.has_error(), ev.error.reason if ev.has_error() else ""
        results.append(P.validate_evaluate_reply(ev.content, bundle.bundle_id, HEAD_SHA).metrics)
    assert [m[P.M_DEVICE_AGREEMENT] for m in results] == [1.0, 1.0]
    held_out = len(ds) - updates[1].num_examples
    assert results[1][P.M_NUM_EXAMPLES] == held_out and results[0][P.M_NUM_EXAMPLES] < held_out
    assert results[1][P.M_TOP1] > 0.7
    df_spikes = spikes_for(np.full(20, bundle.classes.index("df")), bundle.feature_dim)  # scc images carry df's pattern
    chip = edge.predict_edge(grown, df_spikes)
    assert np.array_equal(chip, edge.predict_edge_reference(grown, df_spikes)) and np.mean(chip == len(old)) > 0.8


def test_learn_on_a_clinic_of_an_akida_edge_federation_refuses_instead_of_ignoring_its_head(clinic, bundle) -> None:
    """The clinic's head is in deployed-edge/ (on-chip learned); `learn` trains gradient heads, and
    one started from the bundle's original head would ignore what the federation learned."""
    from typer.testing import CliRunner

    from client.cli import app as client_cli

    ctx, _ = clinic
    assert not send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx).has_error()
    head = fresh_edge_head(bundle.feature_dim, bundle.classes, edge.EdgeParams(10, 2, 0.1, 0.0), seed=0)
    evaluated = send(E.evaluate_edge_content(head, E.EdgeEvaluateSettings(1, bundle.bundle_id, HEAD_SHA)), E.MSG_EVALUATE_EDGE, ctx)
    assert not evaluated.has_error(), evaluated.error.reason if evaluated.has_error() else ""
    cache = Path(ctx.node_config["cache-dir"])
    base = ["learn", "--data", ctx.node_config["data-dir"], "--clinic-id", "clinic-e", "--cache-dir", str(cache), "--device", "software"]
    for extra in ([], ["--bundle", bundle.bundle_id[:12]]):
        result = CliRunner().invoke(client_cli, base + extra)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: this clinic's deployed head for bundle") and "akida-edge head" in result.output, result.output
    assert not (cache / "deployed").exists()
    # a crash between the two renames of the next swap leaves the head only as .NAME.previous:
    # it is still this clinic's head (the check used to skip it and let `learn` train beside it)
    edge_dir = cache / DEPLOYED_EDGE_DIR / bundle.bundle_id
    os.replace(edge_dir, edge_dir.with_name(f".{edge_dir.name}.previous"))
    result = CliRunner().invoke(client_cli, base)
    assert result.exit_code == 2 and "akida-edge head" in result.output, result.output
    assert edge_dir.is_dir() and not (cache / "deployed").exists()

