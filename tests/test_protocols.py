"""The wire protocol: round trips through Flower's serialisation, and every refusal path."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocols import edge_messages as E
from protocols import messages as P
from qana.edge import EdgeHead, random_neurons
from qana.head import Head, dequantize, init_head, quantize_head

CLASSES = ("a", "b", "c")
BUNDLE = "ab" * 32
HEAD_SHA = "cd" * 32


@pytest.fixture
def head() -> Head:
    h = init_head(8, CLASSES, feature_scale=0.05, seed=1)
    rng = np.random.default_rng(0)
    return Head(rng.normal(0, 0.3, (8, 3)).astype(np.float32), np.array([0.5, -1.0, 0.2], np.float32), CLASSES, h.feature_scale)


@pytest.fixture
def spec(head: Head) -> P.HeadSpec:
    return P.HeadSpec.from_head(head, "v2")


def test_global_head_roundtrip_is_exact(head: Head, spec: P.HeadSpec) -> None:
    back = P.head_from_global_record(P.global_head_record(head), spec)
    np.testing.assert_allclose(back.weights, head.weights, rtol=1e-6)
    np.testing.assert_array_equal(back.bias, head.bias)
    assert back.classes == head.classes and back.feature_scale == head.feature_scale


def test_update_carries_exactly_the_quantized_head(head: Head, spec: P.HeadSpec) -> None:
    q = quantize_head(head, "v2")
    decoded = P.quantized_from_update(P.update_record(q), spec)
    np.testing.assert_array_equal(decoded.weights, q.weights)
    np.testing.assert_array_equal(decoded.bias, q.bias)
    assert decoded.scale == pytest.approx(q.scale, rel=1e-7)
    # dequantized for aggregation == the float head the quantized one represents, in scaled units
    floats = P.dequantized_record(decoded, spec)
    expected = dequantize(q, spec.feature_scale)
    np.testing.assert_allclose(floats[P.ARR_WEIGHTS].numpy(), expected.weights / spec.feature_scale, rtol=1e-5)
    np.testing.assert_allclose(floats[P.ARR_BIAS].numpy(), expected.bias, rtol=1e-5, atol=1e-6)


def _train_reply(head: Head, **metric_overrides) -> RecordDict:
    q = quantize_head(head, "v2")
    metrics = {P.M_NUM_EXAMPLES: 10, P.M_TRAIN_TOP1: 0.5, P.M_NUM_SYNTHETIC: 0, P.M_DEVICE_AGREEMENT: 1.0}
    metrics.update(metric_overrides)
    return P.train_reply_content(q, metrics, P.ClinicInfo("clinic-a", 1, bundle_id=BUNDLE))


def test_valid_train_reply_is_accepted(head: Head, spec: P.HeadSpec) -> None:
    reply = P.validate_train_reply(_train_reply(head), spec, BUNDLE)
    assert reply.clinic.clinic_id == "clinic-a" and reply.num_examples == 10


def _with_array(content: RecordDict, name: str, value: np.ndarray) -> RecordDict:
    arrays = dict(content[P.REC_HEAD].items())
    arrays[name] = Array(value)
    return RecordDict({P.REC_HEAD: ArrayRecord(arrays), P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: content[P.REC_CLINIC]})


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (P.ARR_WEIGHTS_Q, np.zeros((8, 4), np.int8), "shape (8, 4), expected (8, 3)"),
        (P.ARR_WEIGHTS_Q, np.zeros((8, 3), np.float32), "dtype float32, expected int8"),
        (P.ARR_BIAS_Q, np.zeros(3, np.int64), "dtype int64, expected int32"),
        (P.ARR_SCALE, np.array([np.nan], np.float32), "NaN/Inf"),
        (P.ARR_SCALE, np.array([np.inf], np.float32), "NaN/Inf"),
        (P.ARR_SCALE, np.array([-1.0], np.float32), "scale must be positive"),
        (P.ARR_WEIGHTS_Q, np.full((8, 3), -128, np.int8), "exceed the 8-bit range"),
    ],
)
def test_malformed_updates_are_refused_with_a_reason(head, spec, name, value, reason) -> None:
    content = _with_array(_train_reply(head), name, value)
    with pytest.raises(P.ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        P.validate_train_reply(content, spec, BUNDLE)


def _with_raw_array(content: RecordDict, name: str, raw: Array) -> RecordDict:
    arrays = dict(content[P.REC_HEAD].items())
    arrays[name] = raw
    return RecordDict({P.REC_HEAD: ArrayRecord(arrays), P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: content[P.REC_CLINIC]})


_BROKEN_NPY_HEADER = b"\x93NUMPY\x01\x00" + (10).to_bytes(2, "little") + b"{'descr':(\n"


@pytest.mark.parametrize(
    ("dtype", "data", "reason"),
    [
        ("int9", np.zeros((8, 3), np.int8).tobytes(), "unknown dtype 'int9'"),  # numpy: TypeError
        ("", np.zeros((8, 3), np.int8).tobytes(), "unknown dtype ''"),
        ("int8", b"", "cannot be decoded"),  # numpy: EOFError
        ("int8", _BROKEN_NPY_HEADER, "cannot be decoded"),  # numpy: tokenize.TokenError
    ],
)
def test_an_array_numpy_cannot_read_is_one_refused_update(head, spec, dtype, data, reason) -> None:
    """Whatever numpy raises on a clinic's bytes must come out as a ProtocolError: the coordinator
    rejects that one update and goes on; any other exception would stop the round for everyone."""
    raw = Array(dtype=dtype, shape=(8, 3), stype="numpy.ndarray", data=data)
    content = _with_raw_array(_train_reply(head), P.ARR_WEIGHTS_Q, raw)
    with pytest.raises(P.ProtocolError, match=re.escape(reason)):
        P.validate_train_reply(content, spec, BUNDLE)


@pytest.mark.parametrize(("scale", "reason"), [(1e36, "reaches 2.54e\\+39"), (1e307, "overflows"), (10.0, "reaches 2.54e\\+04")])
def test_a_finite_scale_too_large_for_a_head_is_refused(head, spec, scale, reason) -> None:
    """1e36 is finite in float32 but 127 * 1e36 / 0.05 is not: the check must come before the cast."""
    q = quantize_head(head, "v2")
    big = type(q)(q.weights, q.bias, scale, q.weight_bits, q.classes)
    with pytest.raises(P.ProtocolError, match=reason):
        P.dequantized_record(big, spec)
    assert P.dequantized_record(q, spec)[P.ARR_WEIGHTS].numpy().dtype == np.float32  # a learned head passes


def test_wrong_backbone_is_refused(head, spec) -> None:
    with pytest.raises(P.ProtocolError, match="backbone"):
        P.validate_train_reply(_train_reply(head), spec, "ef" * 32)


def test_extra_records_and_keys_are_refused(head, spec) -> None:
    content = _train_reply(head)
    extra = RecordDict({**dict(content.items()), "features": ArrayRecord({"x": Array(np.zeros((10, 8), np.int16))})})
    with pytest.raises(P.ProtocolError, match="does not allow: features"):
        P.validate_train_reply(extra, spec, BUNDLE)
    arrays = dict(content[P.REC_HEAD].items())
    arrays["labels"] = Array(np.zeros(10, np.int64))
    smuggled = RecordDict({P.REC_HEAD: ArrayRecord(arrays), P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: content[P.REC_CLINIC]})
    with pytest.raises(P.ProtocolError, match="does not allow: labels"):
        P.validate_train_reply(smuggled, spec, BUNDLE)
    metrics = MetricRecord(dict(content[P.REC_METRICS]))
    metrics["predictions"] = [0.0, 1.0]
    with pytest.raises(P.ProtocolError, match="does not allow: predictions"):
        P.validate_train_reply(
            RecordDict({P.REC_HEAD: content[P.REC_HEAD], P.REC_METRICS: metrics, P.REC_CLINIC: content[P.REC_CLINIC]}), spec, BUNDLE
        )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({P.M_NUM_EXAMPLES: 0}, "num-examples must be a positive integer"),
        ({P.M_NUM_EXAMPLES: P.MAX_NUM_EXAMPLES + 1}, "more than the 1,000,000 images"),
        ({P.M_TRAIN_TOP1: float("nan")}, "is nan"),
        ({P.M_TRAIN_TOP1: 1.5}, "outside"),
    ],
)
def test_bad_metrics_are_refused(head, spec, overrides, reason) -> None:
    with pytest.raises(P.ProtocolError, match=reason):
        P.validate_train_reply(_train_reply(head, **overrides), spec, BUNDLE)


def test_protocol_version_mismatch_is_a_clear_error(head, spec) -> None:
    content = _train_reply(head)
    clinic = ConfigRecord(dict(content[P.REC_CLINIC]))
    clinic[P.K_PROTOCOL] = 99
    bad = RecordDict({P.REC_HEAD: content[P.REC_HEAD], P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: clinic})
    with pytest.raises(P.ProtocolError, match="protocol version 99"):
        P.validate_train_reply(bad, spec, BUNDLE)


def test_train_instruction_roundtrip_and_checks(head, spec) -> None:
    settings = P.TrainSettings(3, BUNDLE, HEAD_SHA, local_epochs=4, learning_rate=0.05, proximal_mu=0.1)
    got_head, got = P.validate_train_ins(P.train_content(head, settings), spec)
    assert got == P.TrainSettings(3, BUNDLE, HEAD_SHA, local_epochs=4, learning_rate=0.05, proximal_mu=0.1, classes=CLASSES)
    np.testing.assert_allclose(got_head.weights, head.weights, rtol=1e-6)
    content = P.train_content(head, settings)
    content[P.REC_CONFIG][P.K_EPOCHS] = 0
    with pytest.raises(P.ProtocolError, match="out of range"):
        P.validate_train_ins(content, spec)
    content = P.train_content(head, settings)
    content[P.REC_CONFIG]["data-dir"] = "/etc"
    with pytest.raises(P.ProtocolError, match="does not allow: data-dir"):
        P.validate_train_ins(content, spec)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (P.K_ROUND, -5, "server-round=-5 must be from 0 to"),
        (P.K_SEED, 2**62, "seed=4611686018427387904 must be from 0 to 2147483647"),
        (P.K_SEED, -1, "seed=-1 must be from 0"),
        (P.K_L2, float("inf"), "l2=inf must be a finite number from 0 to 1e+06"),
        (P.K_PROXIMAL_MU, float("inf"), "proximal-mu=inf must be a finite number from 0 to 1e+06"),
        # finite, but so large that the float32 gradient overflows: "head contains NaN or Inf"
        (P.K_L2, 1e300, "l2=1e+300 must be a finite number from 0 to 1e+06"),
        (P.K_PROXIMAL_MU, 1e300, "proximal-mu=1e+300 must be a finite number from 0 to 1e+06"),
        (P.K_L2, -1e-4, "l2=-0.0001 must be a finite number from 0"),
        (P.K_LR, float("nan"), "learning-rate=nan must be > 0 and at most 10"),
    ],
)
def test_train_settings_that_would_fail_deep_in_training_are_refused_by_name(head, spec, key, value, reason) -> None:
    """They used to reach SMOTE/PCA (bad seed) or the head (Inf) and fail there without naming the setting."""
    content = P.train_content(head, P.TrainSettings(3, BUNDLE, HEAD_SHA, proximal_mu=0.1))
    content[P.REC_CONFIG][key] = value
    with pytest.raises(P.ProtocolError, match=re.escape(reason)):
        P.validate_train_ins(content, spec)


def test_the_coordinator_s_largest_learning_rate_is_accepted(head, spec) -> None:
    content = P.train_content(head, P.TrainSettings(3, BUNDLE, HEAD_SHA, learning_rate=P.MAX_LEARNING_RATE))
    assert P.validate_train_ins(content, spec)[1].learning_rate == 10.0


def test_train_settings_at_their_bounds_are_accepted(head, spec) -> None:
    """Round 0 (set-up), the largest round and seed, and the largest regularisation all pass."""
    for settings in (
        P.TrainSettings(0, BUNDLE, HEAD_SHA, seed=P.MAX_SEED, l2=0.0),
        P.TrainSettings(P.MAX_ROUND, BUNDLE, HEAD_SHA, l2=P.MAX_REGULARISATION, proximal_mu=P.MAX_REGULARISATION),
    ):
        assert P.validate_train_ins(P.train_content(head, settings), spec)[1] == replace(settings, classes=CLASSES)
    assert P.MAX_SEED + P.MAX_ROUND <= 2**32 - 1  # seed + round, the clinic's seed, stays a valid 32-bit seed


@pytest.mark.parametrize("server_round", [-5, P.MAX_ROUND + 1])
def test_evaluate_instruction_with_a_round_out_of_range_is_refused_by_name(head, spec, server_round) -> None:
    """The clinic stores the round with its deployed head; a negative one used to be stored as is."""
    content = P.evaluate_content(head, P.EvaluateSettings(1, BUNDLE, HEAD_SHA))
    content[P.REC_CONFIG][P.K_ROUND] = server_round
    with pytest.raises(P.ProtocolError, match=re.escape(f"evaluate instruction: server-round={server_round} must be from 0 to")):
        P.validate_evaluate_ins(content, spec)


# --------------------------------------------------------------------------- akida-edge instructions


def _edge_head(learning_competition: float = 0.1) -> EdgeHead:
    """Two fresh neurons per class on 16 binary features, built without Akida."""
    n, d, nw = 2 * len(CLASSES), 16, 4
    return EdgeHead(
        weights_packed=np.packbits(random_neurons(n, d, nw, np.random.default_rng(0)), axis=1),
        num_features=d,
        neuron_classes=np.repeat(np.arange(len(CLASSES), dtype=np.int32), 2),
        threshold=np.zeros(n, np.int32),
        act_step=np.ones(n, np.float32),
        threshold_learning=np.zeros(n, np.int32),
        thswap=np.full(n, nw, np.int32),
        usage=np.zeros(n, np.int64),
        classes=CLASSES,
        num_weights=nw,
        learning_competition=learning_competition,
    )


def _edge_train_content(learning_competition: float = 0.1, seed: int = 0) -> RecordDict:
    settings = E.EdgeTrainSettings(3, BUNDLE, HEAD_SHA, 4, 2, learning_competition, 1, seed)
    return E.train_edge_content(_edge_head(learning_competition), settings)


def test_edge_train_instruction_at_akidas_largest_learning_competition_is_accepted() -> None:
    assert E.validate_train_edge_ins(_edge_train_content(E.MAX_LEARNING_COMPETITION, seed=P.MAX_SEED), 16)[1].seed == P.MAX_SEED


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (E.K_EDGE_COMPETITION, float("inf"), "learning-competition inf must be from 0 to 1"),
        # Akida's learning code: "expected non-negative integer"
        (P.K_SEED, -1, "seed=-1 must be from 0 to 2147483647"),
        (P.K_SEED, 2**62, "seed=4611686018427387904 must be from 0 to 2147483647"),
        (P.K_ROUND, -5, "server-round=-5 must be from 0 to"),
    ],
)
def test_edge_train_settings_that_would_fail_in_akida_are_refused_by_name(key, value, reason) -> None:
    content = _edge_train_content()
    content[P.REC_CONFIG][key] = value
    with pytest.raises(P.ProtocolError, match=re.escape(f"edge train instruction: {reason}")):
        E.validate_train_edge_ins(content, 16)


def test_edge_train_instruction_with_a_learning_competition_akida_refuses_is_refused_by_name() -> None:
    """Head and settings agreeing on 1.5 used to pass, and Akida then failed deep in learning with
    "The learning competition must be between 0 and 1."."""
    content = _edge_train_content()  # (an EdgeHead with 1.5 cannot be built any more: set it on the wire)
    content[P.REC_CONFIG][E.K_EDGE_COMPETITION] = 1.5
    content[E.REC_EDGE_META][E.K_COMPETITION] = 1.5
    with pytest.raises(P.ProtocolError, match=re.escape("edge train instruction: learning-competition 1.5 must be from 0 to 1")):
        E.validate_train_edge_ins(content, 16)


def test_edge_params_reply_with_a_learning_competition_akida_refuses_is_refused() -> None:
    info = P.ClinicInfo("clinic-a", P.PROTOCOL_VERSION, bundle_id=BUNDLE)
    good = E.edge_params_reply_content(10, 4, 2, 1.0, 5.0, info)
    assert E.validate_edge_params_reply(good, BUNDLE, 16).learning_competition == 1.0
    with pytest.raises(P.ProtocolError, match=re.escape("edge-params reply: learning-competition 2.0 must be from 0 to 1")):
        E.validate_edge_params_reply(E.edge_params_reply_content(10, 4, 2, 2.0, 5.0, info), BUNDLE, 16)


def test_edge_evaluate_instruction_with_a_negative_round_is_refused_by_name() -> None:
    content = E.evaluate_edge_content(_edge_head(), E.EdgeEvaluateSettings(2, BUNDLE, HEAD_SHA))
    assert E.validate_evaluate_edge_ins(content, 16)[1].server_round == 2
    content[P.REC_CONFIG][P.K_ROUND] = -5
    with pytest.raises(P.ProtocolError, match=re.escape("edge evaluate instruction: server-round=-5 must be from 0 to")):
        E.validate_evaluate_edge_ins(content, 16)


def test_edge_reply_usage_cannot_wrap_around_to_the_reported_examples() -> None:
    # int64 usage [2**63-1, 2**63-1, 12] sums (wrapping) to 10: the merge would weigh those
    # neurons by about 1.8e19 samples while the clinic reported 10
    big = np.iinfo(np.int64).max
    head = replace(_edge_head(), usage=np.array([big, big, 12, 0, 0, 0], np.int64))
    metrics = {P.M_NUM_EXAMPLES: 10, P.M_TRAIN_TOP1: 1.0, P.M_DEVICE_AGREEMENT: 1.0}
    content = E.train_edge_reply_content(head, metrics, P.ClinicInfo("clinic-a", P.PROTOCOL_VERSION, bundle_id=BUNDLE))
    spec = E.EdgeSpec(16, CLASSES, head.num_weights, 2, head.learning_competition)
    with pytest.raises(P.ProtocolError, match="neuron usage sums to 18446744073709551626, but the clinic reports 10"):
        E.validate_train_edge_reply(content, spec, BUNDLE)
    honest = E.train_edge_reply_content(replace(head, usage=np.array([4, 0, 6, 0, 0, 0], np.int64)), metrics, P.ClinicInfo("clinic-a", P.PROTOCOL_VERSION, bundle_id=BUNDLE))
    assert E.validate_train_edge_reply(honest, spec, BUNDLE).head.usage.sum() == 10


def test_global_head_with_nan_is_refused(head, spec) -> None:
    record = P.global_head_record(head)
    w = record[P.ARR_WEIGHTS].numpy().copy()
    w[0, 0] = np.nan
    record[P.ARR_WEIGHTS] = Array(w)
    with pytest.raises(P.ProtocolError, match="NaN/Inf"):
        P.head_from_global_record(record, spec)


def test_deploy_instruction_checks_the_announced_id() -> None:
    content = P.deploy_content(BUNDLE, b"tar bytes")
    assert P.validate_deploy_ins(content) == (BUNDLE, b"tar bytes")
    content[P.REC_BUNDLE][P.K_BUNDLE_ID] = "ef" * 32
    with pytest.raises(P.ProtocolError, match="different bundles"):
        P.validate_deploy_ins(content)


def test_hello_and_evaluate_replies() -> None:
    info = P.validate_hello_reply(P.hello_reply_content(P.ClinicInfo("c1", 1, cached_bundles=(BUNDLE,), device="software")))
    assert info.cached_bundles == (BUNDLE,) and info.device == "software"
    metrics = {P.M_NUM_EXAMPLES: 5, P.M_TOP1: 0.8, P.M_MACRO_F1: 0.7, P.M_BALANCED_ACCURACY: 0.6, P.M_DEVICE_AGREEMENT: 1.0}
    content = P.evaluate_reply_content(metrics, P.ClinicInfo("c1", 1, bundle_id=BUNDLE, head_id=HEAD_SHA))
    assert P.validate_evaluate_reply(content, BUNDLE, HEAD_SHA).metrics[P.M_TOP1] == 0.8
    with pytest.raises(P.ProtocolError, match="evaluated head"):
        P.validate_evaluate_reply(content, BUNDLE, "ef" * 32)


def test_a_reply_with_fewer_metrics_is_refused_before_it_can_stop_aggregation(head, spec) -> None:
    # Flower's strategies refuse replies whose metric keys differ (InconsistentMessageReplies):
    # one clinic sending only num-examples would leave the whole round without a head
    content = _train_reply(head)
    content[P.REC_METRICS] = MetricRecord({P.M_NUM_EXAMPLES: 10})
    with pytest.raises(P.ProtocolError, match="lacks key.s. train-top1, num-synthetic, device-agreement"):
        P.validate_train_reply(content, spec, BUNDLE)
    info = P.ClinicInfo("c1", 1, bundle_id=BUNDLE, head_id=HEAD_SHA)
    short = P.evaluate_reply_content({P.M_NUM_EXAMPLES: 5, P.M_TOP1: 0.8}, info)
    with pytest.raises(P.ProtocolError, match="lacks key.s. macro-f1"):
        P.validate_evaluate_reply(short, BUNDLE, HEAD_SHA)


def test_lower_bound_is_parameters_times_bits(spec) -> None:
    assert spec.num_parameters == 8 * 3 + 3
    assert spec.lower_bound_bytes == 27.0
    assert P.HeadSpec(8, 3, "v1", 1.0, CLASSES).lower_bound_bytes == 13.5


# --------------------------------------------------------------------------- class lists


def test_instructions_carry_the_heads_class_list(head, spec) -> None:
    """The class set is the run's state: a head with other classes than the bundle's travels."""
    fewer = Head(head.weights[:, :2], head.bias[:2], ("a", "b"), head.feature_scale)
    got_head, settings = P.validate_train_ins(P.train_content(fewer, P.TrainSettings(1, BUNDLE, HEAD_SHA)), spec)
    assert got_head.classes == ("a", "b") and settings.classes == ("a", "b") and got_head.weights.shape == (8, 2)
    got_head, ev = P.validate_evaluate_ins(P.evaluate_content(fewer, P.EvaluateSettings(1, BUNDLE, HEAD_SHA)), spec)
    assert got_head.classes == ev.classes == ("a", "b")
    # a class list that does not match the arrays is refused
    content = P.train_content(fewer, P.TrainSettings(1, BUNDLE, HEAD_SHA))
    content[P.REC_CONFIG][P.K_CLASSES] = ["a", "b", "c"]
    with pytest.raises(P.ProtocolError, match="shape"):
        P.validate_train_ins(content, spec)


@pytest.mark.parametrize(
    ("classes", "reason"),
    [([], "1 to"), (["a", "a"], "listed twice"), (["a", "b c"], "class name"), ("abc", "list of class names"), (["x" * 65], "class name")],
)
def test_bad_class_lists_are_refused(head, spec, classes, reason) -> None:
    content = P.train_content(head, P.TrainSettings(1, BUNDLE, HEAD_SHA))
    content[P.REC_CONFIG][P.K_CLASSES] = classes
    with pytest.raises(P.ProtocolError, match=reason):
        P.validate_train_ins(content, spec)


def _reply_with_classes(head: Head, classes: tuple[str, ...]) -> RecordDict:
    rng = np.random.default_rng(1)
    placeholders = tuple(f"class{i}" for i in range(len(classes)))  # a Head refuses a name listed twice; a reply may not
    grown = Head(
        rng.normal(0, 0.3, (8, len(classes))).astype(np.float32), np.zeros(len(classes), np.float32), placeholders, head.feature_scale
    )
    qhead = replace(quantize_head(grown, "v2"), classes=classes)
    metrics = {P.M_NUM_EXAMPLES: 10, P.M_TRAIN_TOP1: 0.5, P.M_NUM_SYNTHETIC: 0, P.M_DEVICE_AGREEMENT: 1.0}
    return P.train_reply_content(qhead, metrics, P.ClinicInfo("clinic-a", 1, bundle_id=BUNDLE))


def test_a_reply_may_append_new_classes_after_the_rounds_classes(head, spec) -> None:
    reply = P.validate_train_reply(_reply_with_classes(head, (*CLASSES, "scc")), spec, BUNDLE)
    assert reply.qhead.classes == (*CLASSES, "scc") and reply.qhead.weights.shape == (8, 4)
    assert reply.clinic.classes == (*CLASSES, "scc")


@pytest.mark.parametrize(
    ("classes", "reason"),
    [(("b", "a", "c"), "do not start with"), (("a", "b"), "do not start with"), (("a", "b", "c", "a"), "listed twice")],
)
def test_a_reply_that_reorders_or_drops_classes_is_refused(head, spec, classes, reason) -> None:
    with pytest.raises(P.ProtocolError, match=reason):
        P.validate_train_reply(_reply_with_classes(head, classes), spec, BUNDLE)


def test_a_reply_whose_arrays_do_not_match_its_class_list_is_refused(head, spec) -> None:
    content = _reply_with_classes(head, (*CLASSES, "scc"))
    content[P.REC_CLINIC][P.K_CLASSES] = list(CLASSES)
    with pytest.raises(P.ProtocolError, match="shape"):
        P.validate_train_reply(content, spec, BUNDLE)


def test_absent_classes_setting_travels_and_is_checked(head, spec) -> None:
    content = P.train_content(head, P.TrainSettings(1, BUNDLE, HEAD_SHA, absent_classes="train"))
    assert P.validate_train_ins(content, spec)[1].absent_classes == "train"
    content[P.REC_CONFIG][P.K_ABSENT] = "forget"
    with pytest.raises(P.ProtocolError, match="absent-classes='forget'"):
        P.validate_train_ins(content, spec)


def test_global_head_beyond_the_update_bound_is_refused_by_name(head, spec) -> None:
    # 3e38 is finite: it used to pass, train into NaN and come back as "head contains NaN or Inf"
    record = P.global_head_record(head)
    record[P.ARR_WEIGHTS] = Array(np.full((8, 3), 3e38, np.float32))
    with pytest.raises(P.ProtocolError, match="global head: 'weights' reaches 3e.38; a head's values must stay within 1000"):
        P.head_from_global_record(record, spec)
    record = P.global_head_record(head)
    record[P.ARR_BIAS] = Array(np.array([0.0, 1e4, 0.0], np.float32))
    with pytest.raises(P.ProtocolError, match="'bias' reaches 1e.04"):
        P.head_from_global_record(record, spec)
