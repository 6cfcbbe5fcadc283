"""The clinic side on the real tiny Akida bundle: ClientApp messages, caches, local learning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from synthetic import make_synthetic_ham

from client.app import app as client_app
from client.bundle_cache import BundleCache
from client.clinic import ClinicConfig, ClinicError
from client.features import FeatureCache
from protocols import messages as P
from qana.bundle import BundleError, load_bundle, pack_bundle
from qana.data import load_dataset
from server.loopback import LoopbackGrid

TINY_V2 = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
HEAD_SHA = "ab" * 32


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY_V2)


@pytest.fixture
def clinic_dir(tmp_path: Path, bundle) -> Path:
    make_synthetic_ham(tmp_path / "data", n_images=40, image_size=bundle.input_shape[0], seed=5, n_corrupt=1)
    return tmp_path / "data"


def context(tmp_path: Path, data: Path, **extra) -> Context:
    config = {"data-dir": str(data), "clinic-id": "clinic-x", "device": "software", "cache-dir": str(tmp_path / "cache"), **extra}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def send(content: RecordDict, message_type: str, ctx: Context) -> Message:
    """Through Flower's serialisation both ways, as on the wire; an exception becomes an error reply."""
    grid = LoopbackGrid({7: lambda msg: client_app(msg, ctx)})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=7, message_type=message_type)])
    return reply


# --------------------------------------------------------------------------- node config


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"clinic-id": "a"}, "lacks data-dir"),
        ({"data-dir": "/d"}, "lacks clinic-id"),
        ({"data-dir": "/d", "clinic-id": "a", "device": "gpu"}, "device='gpu'"),
        ({"data-dir": "/d", "clinic-id": "a", "eval-fraction": 1.5}, "eval-fraction"),
        ({"data-dir": "/d", "clinic-id": "a", "datadir": "/x"}, "unknown node-config key"),
    ],
)
def test_node_config_errors_name_the_key(config, reason) -> None:
    with pytest.raises(ClinicError, match=reason):
        ClinicConfig.from_node_config(config)


# --------------------------------------------------------------------------- caches


def test_bundle_cache_verifies_id_and_files(tmp_path, bundle) -> None:
    cache = BundleCache(tmp_path)
    packed = pack_bundle(bundle)
    with pytest.raises(BundleError, match="was announced"):
        cache.install("0" * 64, packed)
    assert cache.ids() == []
    installed = cache.install(bundle.bundle_id, packed)
    assert installed.bundle_id == bundle.bundle_id and cache.ids() == [bundle.bundle_id]
    (installed.path / "head.npz").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="modified"):
        cache.get(bundle.bundle_id)
    assert not cache.has(bundle.bundle_id)
    with pytest.raises(BundleError, match="deploy it first"):
        cache.get("1" * 64)


def test_a_damaged_cached_bundle_is_not_offered_so_the_coordinator_deploys_it_again(tmp_path, bundle, clinic_dir) -> None:
    # offered as cached, it was never re-sent, and every round failed at this clinic
    ctx = context(tmp_path, clinic_dir)
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    (tmp_path / "cache" / "bundles" / bundle.bundle_id / "head.npz").write_bytes(b"disk error")
    assert P.validate_hello_reply(send(P.hello_content(bundle.bundle_id), P.MSG_HELLO, ctx).content).cached_bundles == ()
    assert BundleCache(tmp_path / "cache").ids() == [bundle.bundle_id]  # still there to be named, not deleted
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    assert P.validate_hello_reply(send(P.hello_content(bundle.bundle_id), P.MSG_HELLO, ctx).content).cached_bundles == (bundle.bundle_id,)


class CountingExtractor:
    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.rows = 0

    def features(self, images: np.ndarray) -> np.ndarray:
        self.rows += len(images)
        return self.runtime.features(images)


def test_features_are_computed_once_and_only_for_new_images(tmp_path, bundle, clinic_dir) -> None:
    from qana.runtime import AkidaRuntime

    extractor = CountingExtractor(AkidaRuntime(bundle, "software"))
    cache = FeatureCache(tmp_path / "cache", bundle)
    size = bundle.input_shape[0]
    data = load_dataset(clinic_dir, size=size, cache_dir=None)
    first, computed = cache.features(data, extractor)
    assert computed == len(data) == extractor.rows
    again, computed = cache.features(data, extractor)
    assert computed == 0 and extractor.rows == len(data)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, extractor.runtime.features(data.images))
    # the folder grows: only the new images go through the backbone
    make_synthetic_ham(clinic_dir.parent / "more", n_images=6, image_size=size, seed=77)
    for jpg in (clinic_dir.parent / "more" / "images").glob("*.jpg"):
        (clinic_dir / "images" / jpg.name).write_bytes(jpg.read_bytes())
    lines = (clinic_dir.parent / "more" / "HAM10000_metadata.csv").read_text().splitlines()[1:]
    with (clinic_dir / "HAM10000_metadata.csv").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    grown = load_dataset(clinic_dir, size=size, cache_dir=None)
    _, computed = cache.features(grown, extractor)
    assert computed == 6 and extractor.rows == len(data) + 6


@pytest.mark.parametrize(
    "arrays",
    [
        {"hashes": "2-d", "features": "ok"},
        {"hashes": "0-d", "features": "ok"},
        {"hashes": "ok", "features": "float"},
    ],
)
def test_a_feature_cache_of_the_wrong_shape_or_type_is_rebuilt(tmp_path, bundle, clinic_dir, arrays, caplog) -> None:
    """Such a file used to end every round on this bundle in a TypeError."""
    from qana.runtime import AkidaRuntime

    extractor = CountingExtractor(AkidaRuntime(bundle, "software"))
    cache = FeatureCache(tmp_path / "cache", bundle)
    data = load_dataset(clinic_dir, size=bundle.input_shape[0], cache_dir=None)
    good, _ = cache.features(data, extractor)
    hashes = {"ok": data.content_hashes, "2-d": data.content_hashes[:, None], "0-d": np.array(data.content_hashes[0])}[arrays["hashes"]]
    feats = good.astype(np.float32) if arrays["features"] == "float" else good
    np.savez(cache.path, hashes=hashes, features=feats)
    fresh = FeatureCache(tmp_path / "cache", bundle)
    with caplog.at_level(logging.WARNING, logger="client.features"):
        assert not fresh.cached(data.content_hashes).any() and fresh.damaged
        again, computed = fresh.features(data, extractor)
    assert computed == len(data)
    np.testing.assert_array_equal(again, good)
    assert [r.getMessage().count("recomputing it") for r in caplog.records] == [1]  # read twice, said once


def test_a_failed_feature_cache_write_leaves_no_temporary_file(tmp_path, bundle, clinic_dir, monkeypatch) -> None:
    from qana.runtime import AkidaRuntime

    cache = FeatureCache(tmp_path / "cache", bundle)
    data = load_dataset(clinic_dir, size=bundle.input_shape[0], cache_dir=None)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    from qana import atomic

    monkeypatch.setattr(atomic.os, "fsync", interrupted)  # Ctrl-C while the new cache is written
    with pytest.raises(KeyboardInterrupt):
        cache.features(data, AkidaRuntime(bundle, "software"))
    assert list(cache.path.parent.iterdir()) == []


# --------------------------------------------------------------------------- local learning


# --------------------------------------------------------------------------- the ClientApp


def test_clientapp_protocol_and_replies_carry_only_the_head(tmp_path, bundle, clinic_dir) -> None:
    ctx = context(tmp_path, clinic_dir)
    spec = P.HeadSpec.from_head(bundle.load_head(), bundle.target)

    hello = send(P.hello_content(bundle.bundle_id), P.MSG_HELLO, ctx)
    info = P.validate_hello_reply(hello.content)
    assert info.clinic_id == "clinic-x" and info.cached_bundles == () and "software" in info.device

    # training before the bundle arrived is an error reply, not a crash
    settings = P.TrainSettings(1, bundle.bundle_id, HEAD_SHA, local_epochs=30, learning_rate=0.05)
    early = send(P.train_content(bundle.load_head(), settings), P.MSG_TRAIN, ctx)
    assert early.has_error() and "deploy it first" in early.error.reason

    deployed = send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    assert P.validate_deploy_reply(deployed.content, bundle.bundle_id).clinic_id == "clinic-x"
    assert P.validate_hello_reply(send(P.hello_content(bundle.bundle_id), P.MSG_HELLO, ctx).content).cached_bundles == (bundle.bundle_id,)

    reply = send(P.train_content(bundle.load_head(), settings), P.MSG_TRAIN, ctx)
    update = P.validate_train_reply(reply.content, spec, bundle.bundle_id)
    # Exactly the declared records, arrays, keys; nothing shaped like per-sample data.
    content = reply.content
    assert set(content.keys()) == {P.REC_HEAD, P.REC_METRICS, P.REC_CLINIC}
    assert set(content.array_records) == {P.REC_HEAD}
    arrays = content[P.REC_HEAD]
    assert {k: (a.dtype, tuple(a.shape)) for k, a in arrays.items()} == {
        P.ARR_WEIGHTS_Q: ("int8", (spec.num_features, spec.num_classes)),
        P.ARR_BIAS_Q: ("int32", (spec.num_classes,)),
        P.ARR_SCALE: ("float32", (1,)),
    }
    payload = sum(a.numpy().nbytes for a in arrays.values())
    assert payload == spec.num_features * spec.num_classes + 4 * spec.num_classes + 4
    assert set(content[P.REC_METRICS].keys()) == set(P.TRAIN_METRICS)
    assert all(not isinstance(v, list) for v in content[P.REC_METRICS].values())
    assert set(content[P.REC_CLINIC].keys()) == {P.K_PROTOCOL, P.K_CLINIC_ID, P.K_BUNDLE_ID, P.K_CLASSES}
    assert tuple(content[P.REC_CLINIC][P.K_CLASSES]) == bundle.classes
    assert update.num_examples > 0 and update.metrics[P.M_DEVICE_AGREEMENT] == 1.0

    ev_settings = P.EvaluateSettings(1, bundle.bundle_id, HEAD_SHA)
    head = P.head_from_global_record(P.dequantized_record(update.qhead, spec), spec)
    ev = send(P.evaluate_content(head, ev_settings), P.MSG_EVALUATE, ctx)
    result = P.validate_evaluate_reply(ev.content, bundle.bundle_id, HEAD_SHA)
    assert set(ev.content.keys()) == {P.REC_METRICS, P.REC_CLINIC} and not ev.content.array_records
    assert result.metrics[P.M_DEVICE_AGREEMENT] == 1.0
    assert result.metrics[P.M_NUM_EXAMPLES] + update.num_examples == 40  # the corrupt file was skipped
    deployed_dir = tmp_path / "cache" / "deployed" / bundle.bundle_id
    assert (deployed_dir / "model.fbz").is_file() and (deployed_dir / "deployed.json").is_file()


def test_on_device_predictions_agree_with_the_reference_head(tmp_path, bundle, clinic_dir) -> None:
    """What the clinic checks before replying, checked here independently on the saved model."""
    import akida

    from client.clinic import Clinic
    from qana.head import quantize_head, quantized_potentials

    clinic = Clinic(ClinicConfig.from_node_config(context(tmp_path, clinic_dir).node_config))
    clinic.deploy(bundle.bundle_id, pack_bundle(bundle))
    settings = P.TrainSettings(1, bundle.bundle_id, HEAD_SHA, local_epochs=20, learning_rate=0.05)
    qhead, _ = clinic.train(bundle.load_head(), settings)
    head = P.head_from_global_record(P.dequantized_record(qhead, P.HeadSpec.from_head(bundle.load_head(), "v2")), P.HeadSpec.from_head(bundle.load_head(), "v2"))
    clinic.evaluate(head, P.EvaluateSettings(1, bundle.bundle_id, HEAD_SHA))
    saved = akida.Model(str(tmp_path / "cache" / "deployed" / bundle.bundle_id / "model.fbz"))
    prep = clinic.prepare(bundle.bundle_id)
    chip = np.argmax(saved.predict(prep.dataset.images).reshape(len(prep.dataset), -1), axis=1)
    reference = np.argmax(quantized_potentials(quantize_head(head, "v2"), prep.features), axis=1)
    np.testing.assert_array_equal(chip, reference)


def test_wrong_bundle_and_malformed_instructions_are_error_replies(tmp_path, bundle, clinic_dir) -> None:
    ctx = context(tmp_path, clinic_dir)
    wrong = send(P.deploy_content("0" * 64, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    assert wrong.has_error() and "was announced" in wrong.error.reason
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    content = P.train_content(bundle.load_head(), P.TrainSettings(1, bundle.bundle_id, HEAD_SHA))
    content[P.REC_CONFIG]["data-dir"] = "/etc"  # the coordinator cannot redirect a clinic
    bad = send(content, P.MSG_TRAIN, ctx)
    assert bad.has_error() and "does not allow: data-dir" in bad.error.reason


def test_a_bundle_corrupted_in_transit_is_refused(tmp_path, bundle) -> None:
    import io
    import tarfile

    packed = bytearray(pack_bundle(bundle))
    with tarfile.open(fileobj=io.BytesIO(bytes(packed))) as tar:
        model = tar.getmember("model.fbz")
    packed[model.offset_data + model.size // 2] ^= 0xFF  # one flipped bit-pattern inside the model
    cache = BundleCache(tmp_path)
    with pytest.raises(BundleError, match="model.fbz"):
        cache.install(bundle.bundle_id, bytes(packed))
    assert cache.ids() == []


# --------------------------------------------------------------------------- class-incremental


def _relabel(data: Path, old: str, new: str) -> None:
    meta = data / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(f",{old},", f",{new},"))


def test_a_clinic_introduces_a_new_class_and_the_chip_runs_the_grown_head(tmp_path, bundle) -> None:
    """`--new-class scc`: the reply's head has the global classes then scc; the chip agrees."""
    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=60, image_size=bundle.input_shape[0], seed=8)
    _relabel(data, "df", "scc")
    ctx = context(tmp_path, data, **{"new-classes": "scc"})
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    settings = P.TrainSettings(1, bundle.bundle_id, HEAD_SHA, local_epochs=20, learning_rate=0.05)
    base_spec = P.HeadSpec.from_head(bundle.load_head(), bundle.target)
    reply = send(P.train_content(bundle.load_head(), settings), P.MSG_TRAIN, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    update = P.validate_train_reply(reply.content, base_spec, bundle.bundle_id)
    assert update.qhead.classes == (*bundle.classes, "scc")
    assert update.metrics[P.M_DEVICE_AGREEMENT] == 1.0
    # the merged (grown) head comes back for evaluation: 8 columns on the chip, scc images scored
    from qana.head import dequantize

    grown = dequantize(update.qhead, base_spec.feature_scale)
    ev = send(P.evaluate_content(grown, P.EvaluateSettings(1, bundle.bundle_id, HEAD_SHA)), P.MSG_EVALUATE, ctx)
    assert not ev.has_error(), ev.error.reason if ev.has_error() else ""
    result = P.validate_evaluate_reply(ev.content, bundle.bundle_id, HEAD_SHA)
    assert result.metrics[P.M_DEVICE_AGREEMENT] == 1.0
    deployed = ClinicConfig.from_node_config(ctx.node_config).cache / "deployed" / bundle.bundle_id
    from qana.head import head_from_npz

    assert head_from_npz((deployed / "head.npz").read_bytes()).classes == (*bundle.classes, "scc")


def test_new_class_waits_for_its_round_and_undeclared_classes_are_a_clear_error(tmp_path, bundle) -> None:
    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=40, image_size=bundle.input_shape[0], seed=9)
    _relabel(data, "df", "scc")
    ctx = context(tmp_path, data, **{"new-classes": "scc", "new-classes-from-round": 3})
    send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, ctx)
    base_spec = P.HeadSpec.from_head(bundle.load_head(), bundle.target)
    settings = P.TrainSettings(2, bundle.bundle_id, HEAD_SHA, local_epochs=5, learning_rate=0.05)
    update = P.validate_train_reply(send(P.train_content(bundle.load_head(), settings), P.MSG_TRAIN, ctx).content, base_spec, bundle.bundle_id)
    assert update.qhead.classes == bundle.classes  # round 2 < 3: scc images are left out
    undeclared = context(tmp_path / "other", data)
    reply = send(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY, undeclared)
    assert reply.has_error() and "scc" in reply.error.reason
    with pytest.raises(ClinicError, match="new-classes"):
        ClinicConfig.from_node_config({"data-dir": "/d", "clinic-id": "a", "new-classes": "a b"})
    with pytest.raises(ClinicError, match="new-classes-from-round"):
        ClinicConfig.from_node_config({"data-dir": "/d", "clinic-id": "a", "new-classes-from-round": 0})
