"""Mixup (`qana train --mixup`, qana.augment.mix_batch): every blended image is the same blend
of two images of its batch as its targets and sample weight, and training takes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.augment import mix_batch, mixup_weights  # noqa: E402
from qana.train import TrainOptions, _fit, make_dataset  # noqa: E402
from tests.test_weight_ema import _data, _tiny_model  # noqa: E402


def _batch(n: int = 16):
    """n images whose targets name them (target i is class i), so a blend's target tells its two sources."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n, 4, 4, 3)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return images, np.eye(n, dtype=np.float32), weights


def test_each_image_is_the_same_blend_of_two_batch_images_as_its_target_and_weight() -> None:
    images, targets, weights = _batch()
    x, y, w = (a.numpy() for a in mix_batch(tf.constant(images), tf.constant(targets), tf.constant(weights), alpha=0.4, seed=3))
    partners = []
    for i in range(len(images)):
        lam = y[i, i]
        rest = y[i].copy()
        rest[i] = 0.0
        j = int(rest.argmax()) if rest.max() > 0 else i  # its partner (itself when the shuffle left it in place)
        np.testing.assert_allclose(y[i], lam * targets[i] + (1 - lam) * targets[j], atol=1e-6)
        np.testing.assert_allclose(x[i], lam * images[i] + (1 - lam) * images[j], atol=1e-3)
        np.testing.assert_allclose(w[i], lam * weights[i] + (1 - lam) * weights[j], rtol=1e-5)
        partners.append(j)
    assert sorted(partners) == list(range(len(images)))  # the partners are a shuffled copy of the batch
    assert sum(0.05 < y[i, i] < 0.95 for i in range(len(images)) if partners[i] != i) >= 4  # real blends
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-5)
    assert x.min() >= 0.0 and x.max() <= 255.0


def test_blend_weights_follow_beta_and_never_become_nan() -> None:
    lam = mixup_weights(20000, 0.2, seed=1).numpy()
    assert np.isfinite(lam).all() and lam.min() >= 0.0 and lam.max() <= 1.0
    assert lam.mean() == pytest.approx(0.5, abs=0.02)  # Beta(a, a) is symmetric
    assert lam.var() == pytest.approx(1 / (4 * (2 * 0.2 + 1)), abs=0.02)  # Beta(a, a) variance: 1 / (4 (2a + 1))
    tiny = mixup_weights(5000, 1e-3, seed=2).numpy()  # both Gamma draws often underflow to 0 here
    assert np.isfinite(tiny).all()


def test_training_pipeline_with_mixup_gives_blended_targets() -> None:
    images = np.random.default_rng(1).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    targets = np.eye(7, dtype=np.float32)[np.arange(32) % 7]
    ds = make_dataset(images, targets, 32, True, 0, np.ones(32, np.float32), mixup=1.0)
    x, y, w = next(iter(ds))
    assert x.shape == (32, 8, 8, 3) and y.shape == (32, 7) and w.shape == (32,)
    assert (np.asarray(y).max(1) < 0.99).sum() >= 8  # Beta(1, 1) = uniform: most targets are real blends
    plain = make_dataset(images, targets, 32, True, 0, np.ones(32, np.float32))
    assert np.asarray(next(iter(plain))[1]).max(1).min() == 1.0  # without mixup the targets stay one-hot


def test_a_fit_with_mixup_trains_on_blended_one_hot_targets(tmp_path: Path, monkeypatch) -> None:
    """Class numbers must become one-hot targets before blending (blended class numbers would be
    cast back to wrong classes by the sparse loss without an error), and the loss must take them."""
    import qana.train as train

    seen: dict = {}
    real = train.make_dataset

    def spy(images, labels, *args, **kwargs):
        seen["labels"], seen["mixup"] = np.asarray(labels), (args[6] if len(args) > 6 else kwargs.get("mixup", 0.0))
        return real(images, labels, *args, **kwargs)

    monkeypatch.setattr(train, "make_dataset", spy)
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    start = [w.copy() for w in model.get_weights()]
    data = _data(64, 0)
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0, mixup=0.2)
    history = _fit(model, data, _data(21, 1), opts, epochs=1, lr=0.5, weights_path=tmp_path / "w.h5")
    assert seen["mixup"] == 0.2
    np.testing.assert_array_equal(seen["labels"], np.eye(7, dtype=np.float32)[data.labels])
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    assert len(history) == 1
    assert max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start)) > 0.01
