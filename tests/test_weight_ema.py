"""The float stage's weight averaging: validation and the kept checkpoint use the average."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.data import Dataset  # noqa: E402
from qana.train import TrainOptions, _fit  # noqa: E402


def _tiny_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(7, name="head")(x))


def _data(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 7
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return Dataset(images=images, labels=labels, image_ids=np.array([f"i{i}" for i in range(n)]),
                   lesion_ids=np.array([f"l{i}" for i in range(n)]), centres=np.array(["c"] * n),
                   content_hashes=np.array([f"h{i}" for i in range(n)]))


@pytest.mark.parametrize("ema", [0.0, 0.9999])
def test_the_kept_weights_are_the_average_when_averaging_is_on(tmp_path: Path, ema: float) -> None:
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    start = [w.copy() for w in model.get_weights()]
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0)
    _fit(model, _data(64, 0), _data(21, 1), opts, epochs=2, lr=0.5, weights_path=tmp_path / "w.h5", ema=ema)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start))
    if ema:
        # 16 steps of a 0.9999 average barely leave the starting point, although lr 0.5 moves the raw weights far
        assert moved < 0.01
    else:
        assert moved > 0.1
