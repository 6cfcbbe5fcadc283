"""convert_checked refuses a model whose end cnn2snn dropped (helper-35 P1, session 35).

cnn2snn stops at the first dequantizer and only warns ("Conversion stops at layer head ... The end
of the model is ignored"); with a layer after the head whose output has the head's size, neither
the output-size check nor "the head is somewhere in the model" noticed, and the truncated model
was accepted. Kept apart from test_conversion.py: a few layers, seconds, not minutes."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402
from tf_keras import layers  # noqa: E402

from qana.convert import ConversionError, QuantSpec, convert_checked, quantize_model  # noqa: E402
from qana.model import HEAD_LAYER  # noqa: E402


def _model(after_head: bool) -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)  # Akida's input convolution
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(7, name=HEAD_LAYER)(x)
    if after_head:  # the same size as the head's output, so the output-size check passes
        x = layers.Dense(7, name="post")(layers.Activation("softmax")(x))
    return keras.Model(inputs, x)


@pytest.mark.timeout(300)
def test_a_model_cut_after_its_head_is_refused_and_a_whole_one_is_not() -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    whole = convert_checked(quantize_model(_model(after_head=False), QuantSpec("v2", 8), images), "v2")
    assert whole.layers[-2].name == HEAD_LAYER and str(whole.layers[-1].parameters.layer_type) == "LayerType.Dequantizer"
    with pytest.raises(ConversionError, match="cnn2snn warned during conversion: Conversion stops"):
        convert_checked(quantize_model(_model(after_head=True), QuantSpec("v2", 8), images), "v2")


def _gate_effect(attention: str) -> tuple[float, float]:
    """(largest drop, largest rise) the attention block applies to its input, over random weights."""
    from qana.blocks import qana_stage

    rng = np.random.default_rng(1)
    drops, rises = [], []
    for draw in range(5):
        inputs = keras.Input((8, 8, 16))
        attended = qana_stage(inputs, 16, name=f"s{draw}", attention=attention)
        block = keras.Model(inputs, attended)
        probe = keras.Model(inputs, block.get_layer(f"s{draw}_{attention.split('-')[0]}_out").output)
        ghost = keras.Model(inputs, block.get_layer(f"s{draw}_ghost_concat").output)
        for layer in probe.layers:
            if isinstance(layer, layers.BatchNormalization):  # shifts and scales of either sign
                gamma, beta, mean, var = layer.get_weights()
                layer.set_weights([rng.normal(1, 0.5, gamma.shape), rng.normal(0, 2, beta.shape), mean, var])
        x = rng.uniform(0, 6, (4, 8, 8, 16)).astype(np.float32)
        before, after = ghost(x).numpy(), probe(x).numpy()
        drops.append(float((before - after).max()))
        rises.append(float((after - before).max()))
    return max(drops), max(rises)


@pytest.mark.parametrize("kind", ["seca", "se"])
def test_the_signed_gate_can_lower_a_channel_and_the_bounded_one_cannot(kind: str) -> None:
    """helper-35 P2: x + ReLU6(gate) >= x for every weight setting, so the shipped blocks only excite."""
    drop, rise = _gate_effect(kind)
    assert drop <= 1e-6 and rise > 0.1
    drop, rise = _gate_effect(f"{kind}-signed")
    assert drop > 0.1 and rise > 0.1


@pytest.mark.timeout(300)
def test_a_network_with_signed_gates_runs_entirely_on_akida() -> None:
    from qana.model import ModelSpec, build_model

    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    qmodel = quantize_model(build_model(ModelSpec(target="v2", input_size=32, width=8, feature_dim=32, attention="both-signed")), QuantSpec("v2", 8), images)
    akida_model = convert_checked(qmodel, "v2")  # maps onto a virtual Akida 2.0 with hw_only=True
    keras_out = qmodel.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(akida_model.predict(images).reshape(keras_out.shape), keras_out, atol=1e-6)


def test_network_settings_that_cannot_work_are_refused_when_built() -> None:
    """helper-35 P3/P4: an odd v2 width failed inside Keras; v1 at 16 px trained, then failed to map."""
    from qana.convert import virtual_device
    from qana.model import ModelSpec, build_model

    for spec, message in (
        (ModelSpec(target="v2", width=9), "width must be even on v2"),
        (ModelSpec(target="v1", attention="bogus"), "unknown attention 'bogus'"),
        (ModelSpec(target="v1", input_size=16), "the v1 network needs an input of at least 24 pixels"),
        (ModelSpec(target="V2"), "unknown target 'V2'"),
    ):
        with pytest.raises(ValueError, match=message):
            build_model(spec)
    with pytest.raises(ValueError, match="unknown target 'V2'"):
        virtual_device("V2")
