"""A tiny QANA model quantizes, converts with no software remainder, maps onto hardware, and
Akida's outputs match the quantized Keras model. Also: the training pipeline end to end."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")

from qana.convert import (  # noqa: E402
    ConversionError,
    QuantSpec,
    check_hardware_mapping,
    convert_checked,
    keep_output_headroom,
    quantize_model,
)
from qana.model import ModelSpec, build_model  # noqa: E402

pytestmark = pytest.mark.slow


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize(
    "target, bits, attention",
    [("v2", 8, "both"), ("v2", 8, "none"), ("v1", 4, "none")],
)
def test_tiny_model_runs_entirely_on_akida(target: str, bits: int, attention: str, request: pytest.FixtureRequest) -> None:
    if (target, bits, attention) == ("v2", 8, "both"):  # the module's full-QANA model, converted once (tiny_v2)
        import akida

        qmodel, path = request.getfixturevalue("tiny_v2")
        akida_model = akida.Model(str(path))
    else:
        spec = ModelSpec(target=target, input_size=32, width=8, feature_dim=32, attention=attention)
        qmodel = quantize_model(build_model(spec), QuantSpec(target, bits), _images(32, 32))
        akida_model = convert_checked(qmodel, target)
    backends = check_hardware_mapping(akida_model, target)
    assert backends and all("Hardware" in b for b in backends)
    x = _images(16, 32, seed=1)
    keras_out = qmodel.predict(x.astype(np.float32), verbose=0)
    akida_out = akida_model.predict(x).reshape(keras_out.shape)
    np.testing.assert_allclose(akida_out, keras_out, rtol=1e-4, atol=1e-4 * np.abs(keras_out).max())
    assert (akida_out.argmax(1) == keras_out.argmax(1)).all()


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """A tiny full-QANA v2 model, quantized and converted once: (quantized Keras model, model.fbz)."""
    spec = ModelSpec(target="v2", input_size=32, width=8, feature_dim=32, attention="both")
    qmodel = quantize_model(build_model(spec), QuantSpec("v2", 8), _images(32, 32))
    path = tmp_path_factory.mktemp("tiny-v2") / "model.fbz"
    convert_checked(qmodel, "v2").save(str(path))
    return qmodel, path


def test_the_pooled_last_conv_sees_one_input_scale_on_akida_2(tiny_v2: tuple[object, Path]) -> None:
    # Per-channel scales before the pooled last conv made cnn2snn add an input shift there and
    # Akida's features saturate (session 24, two of four training splits); per tensor, none.
    import akida
    from cnn2snn import AkidaVersion, set_akida_version
    from quantizeml.models import dump_config

    qmodel, path = tiny_v2
    feeding = qmodel.get_layer("last_conv").inbound_nodes[0].inbound_layers.name
    with set_akida_version(AkidaVersion.v2):
        config = dump_config(qmodel)
    assert config[feeding]["output_quantizer"]["axis"] == "per-tensor"
    last_conv = akida.Model(str(path)).get_layer("last_conv")
    assert not last_conv.get_variable("input_shift").any()


def test_output_shifts_below_minus_24_are_rewritten_so_features_keep_their_range(tiny_v2: tuple[object, Path]) -> None:
    # Akida saturates an output whose rescale shift is below -24 at 128 >> (-24 - shift), not 127
    # (cnn2snn gave 141 of the shipped v2 model's 256 pooled last conv channels a shift of -25:
    # their features stopped at 64). Made here with a constant accumulator: bias 100 << 13 at each of the 4 x 4
    # pooled positions, rescaled by 200 x 2**-25, is 78.1 -- which Akida cuts to 64.
    import akida

    def features(model) -> np.ndarray:
        while model.layers[-1].name != "last_conv":
            model.pop_layer()
        return model.forward(_images(2, 32)).reshape(2, -1)

    model = akida.Model(str(tiny_v2[1]))
    layer = model.get_layer("last_conv")
    n = np.asarray(layer.get_variable("output_scales")).shape[0]
    layer.set_variable("weights", np.zeros_like(np.asarray(layer.get_variable("weights"))))
    layer.set_variable("bias", np.full(n, 100, np.int8))
    layer.set_variable("bias_shift", np.full(n, 13, np.uint8))
    layer.set_variable("max_value", np.full(n, 255, np.uint8))
    layer.set_variable("max_value_shift", np.full(n, 20, np.uint8))
    layer.set_variable("output_scales", np.full(n, 200, np.uint8))
    layer.set_variable("output_shift", np.full(n, -25, np.int8))
    assert (features(_reloaded(model)) == 64).all()  # Akida cuts it

    assert keep_output_headroom(model) == {"last_conv": n}
    assert (np.asarray(layer.get_variable("output_scales")) == 100).all()
    assert (np.asarray(layer.get_variable("output_shift")) == -24).all()
    assert (features(_reloaded(model)) == 78).all()  # 100 x 2**-24 x 16 x (100 << 13) = 78.1
    assert keep_output_headroom(model) == {}


def _reloaded(model) -> object:
    """A copy of an Akida model through its saved form (pop_layer changes the model it is called on)."""
    import tempfile

    import akida

    with tempfile.TemporaryDirectory() as folder:
        model.save(f"{folder}/m.fbz")
        return akida.Model(f"{folder}/m.fbz")


def test_a_layer_akida_cannot_run_is_a_conversion_error() -> None:
    import tf_keras as keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = keras.layers.ReLU(6.0)(x)
    gate = keras.layers.Activation("sigmoid")(keras.layers.Conv2D(8, 1)(x))
    x = keras.layers.Multiply()([x, gate])  # textbook SE gating: not convertible
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(7, name="head")(x))
    with pytest.raises(Exception) as info:
        convert_checked(quantize_model(model, QuantSpec("v2", 8), _images(16, 32)), "v2")
    assert not isinstance(info.value, AssertionError)


def test_v2_4bit_is_refused_by_the_hardware_check_not_silently_accepted() -> None:
    # Refused at an identity convolution quantizeml inserts (stem_relu_identity_conv; README, "4-bit
    # weights on Akida 2.0"), which the net has with or without attention; without attention
    # quantizeml takes about half the time.
    spec = ModelSpec(target="v2", input_size=32, width=8, feature_dim=32, attention="none")
    qmodel = quantize_model(build_model(spec), QuantSpec("v2", 4), _images(32, 32))
    with pytest.raises(ConversionError, match="does not map"):
        convert_checked(qmodel, "v2")


@pytest.mark.timeout(1200)  # trains twice, converts, evaluates on the Akida software backend; slow on 2 shared cores
def test_pipeline_trains_converts_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qana.bundle import load_bundle
    from qana.train import STAGES, VIEW_STAGES, TrainOptions, run
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=140, image_size=40, seed=0)
    opts = TrainOptions(
        data=clinic.root, run_dir=tmp_path / "run", image_size=32, width=8, feature_dim=32,
        epochs=1, qat_epochs=1, batch_size=32, cache_dir=tmp_path / "cache", command="test",
        attention="none",  # the stages are what is tested; the full QANA net converts in tiny_v2 (half the time)
    )
    infos = run(opts, progress=lambda m: None)
    bundle = load_bundle(infos["bundle"]["bundle"])
    assert bundle.target == "v2" and bundle.feature_dim == 32
    test = bundle.manifest["metrics"]["test"]
    assert set(test) >= {"float", "quantized", "akida", "agreement_quantized_vs_akida"}
    assert test["agreement_quantized_vs_akida"] == 1.0
    assert infos["head"]["chip_vs_reference_agreement"] == 1.0
    quantized = infos["quantized"]
    assert quantized["kept"] in ("fine-tuned", "calibrated")
    assert {"val_float", "val_calibrated", "val_fine_tuned"} <= set(quantized)
    # The synthetic metadata's body site names the class, so validation keeps the clinical prior
    # and the bundle carries it, with figures beside the images-only ones.
    assert set(infos["clinical"]["validation_top1_plus_macro_f1"]) == {"0", "0.25", "0.5", "0.75", "1", "1.25", "1.5"}
    assert infos["clinical"]["used"] and infos["clinical"]["weight"] > 0
    assert bundle.load_clinical_prior().weight == infos["clinical"]["weight"]
    assert test["akida_with_clinical_prior"]["top1"] >= test["akida"]["top1"]
    # Resuming finds every stage done and changes nothing.
    before = (opts.run_dir / "float.json").read_text()
    messages: list[str] = []
    run(opts, progress=messages.append)
    assert sum("already finished" in m for m in messages) == len(STAGES)
    assert (opts.run_dir / "float.json").read_text() == before
    assert json.loads((opts.run_dir / "split.json").read_text())["n_images"] == 140
    # Asking for test-time views redoes only the stages that depend on them.
    messages.clear()
    views = run(replace(opts, test_time_views=2), progress=messages.append)
    assert sum("already finished" in m for m in messages) == len(STAGES) - len(VIEW_STAGES)
    assert any("[head] was finished with 1 test-time view(s); redoing it with 2" in m for m in messages)
    assert load_bundle(views["bundle"]["bundle"]).test_time_views == 2
    assert views["head"]["chip_vs_reference_agreement"] == 1.0
    assert (opts.run_dir / "akida" / "features-2views.npz").is_file() and (opts.run_dir / "float.json").read_text() == before
    # A stage redone for any reason (here: its record deleted) redoes every stage after it.
    import qana.train

    (opts.run_dir / "head.json").unlink()
    messages.clear()
    monkeypatch.setattr(qana.train, "MEASURABLE", 2.0)  # no retrained head can win: the converted one is kept
    kept = run(replace(opts, test_time_views=2), progress=messages.append)
    assert [m for m in messages if m.endswith("running ...")] == ["[head] running ...", "[clinical] running ...", "[bundle] running ..."]
    # The converted head is kept exactly as cnn2snn wrote it (per-class output scales), not
    # re-quantized per tensor, and the bundle's Akida figures are the converted head's.
    assert kept["head"]["chosen"] == "converted"
    converted = qana.train._read_akida_head(opts.run_dir / "akida" / "model.fbz")
    final = qana.train._read_akida_head(opts.run_dir / "final" / "model.fbz")
    for a, b in zip(converted, final):
        np.testing.assert_array_equal(a, b)
    for part in ("val", "test"):
        metrics = kept["bundle"]["metrics"][part]
        assert metrics["akida"] == metrics["akida_converted_head"]
    assert kept["head"]["candidates"]["converted"] == {
        k: kept["bundle"]["metrics"]["val"]["akida"][k] for k in ("top1", "macro_f1", "balanced_accuracy")
    }
    monkeypatch.undo()
    # (that the calibrated model is saved when QAT is the less faithful one: tests/test_quantized_choice.py)
    # --bundle-out on a finished run writes the bundle there (before: ignored, exit 0), redoing
    # only the bundle stage; a folder of other files is refused, and kept.
    messages = []
    elsewhere = run(replace(opts, test_time_views=2, bundle_out=tmp_path / "wanted"), progress=messages.append)
    assert [m for m in messages if m.endswith("running ...")] == ["[bundle] running ..."]
    assert load_bundle(tmp_path / "wanted").bundle_id == elsewhere["bundle"]["bundle_id"]
