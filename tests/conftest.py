"""Fixtures shared by several test files (the simulation tests' data and cache; a quantizer stand-in)."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import HAM_CENTRES, make_synthetic_ham


@pytest.fixture
def private_cache(monkeypatch, tmp_path: Path) -> Path:
    """Decoded images and features of a test run go to a temporary cache, not ~/.cache/qana."""
    import qana.data

    cache = tmp_path / "qana-cache"
    monkeypatch.setattr(qana.data, "DEFAULT_CACHE_DIR", cache)
    return cache


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    """160 synthetic 32x32 images spread over the four HAM10000 centres (one per module)."""
    root = tmp_path_factory.mktemp("ham") / "data"
    make_synthetic_ham(root, n_images=160, image_size=32, seed=11, centres=HAM_CENTRES)
    return root


@pytest.fixture
def float_copy_quantizer(monkeypatch) -> None:
    """qana.convert.quantize_model replaced by a copy of the float model, for tests of what the
    quantized stage does around quantization (which model it keeps, what QAT is taught): their
    outcome does not depend on how the model was quantized, and quantizeml takes about a minute to
    build even the tests' tiny nets."""
    import tf_keras as keras

    import qana.convert

    def float_copy(model, spec, samples):
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        return copy

    monkeypatch.setattr(qana.convert, "quantize_model", float_copy)
