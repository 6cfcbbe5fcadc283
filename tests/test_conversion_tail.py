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
    assert [layer.name for layer in whole.layers][-2:] == [HEAD_LAYER, "dequantizer"]
    with pytest.raises(ConversionError, match="cnn2snn warned during conversion: Conversion stops"):
        convert_checked(quantize_model(_model(after_head=True), QuantSpec("v2", 8), images), "v2")
