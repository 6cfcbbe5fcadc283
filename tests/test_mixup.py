"""Mixup (`qana train --mixup`, qana.augment.mix_batch): every blended image is the same blend
of two images of its batch as its targets and sample weight, and training takes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.augment import mix_batch, mixup_weights  # noqa: E402
from qana.train import RunSettingsError, TrainOptions, _fit, make_dataset, mixup_phases, qat_mixup_epochs  # noqa: E402
from tests.test_fit_resume import _stop_after_epoch, _Stopped  # noqa: E402
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


def test_blended_pixels_stay_in_0_to_255() -> None:
    """w x 255 + (1 - w) x 255 in float32 can round to 255.00002: the blend is clipped (images only)."""
    images = np.full((256, 8, 8, 3), 255, np.uint8)
    images[:, :4] = 0
    x, y = (a.numpy() for a in mix_batch(tf.constant(images), tf.constant(np.eye(256, dtype=np.float32)), alpha=0.4, seed=0))
    assert x.max() <= 255.0 and x.min() >= 0.0
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-5)


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


def test_mixup_phases_blend_the_first_epochs_and_train_the_rest_on_plain_images() -> None:
    assert mixup_phases(0.2, 40, None) == [(40, 0.2)]  # the default: mixup throughout
    assert mixup_phases(0.2, 40, 30) == [(30, 0.2), (40, 0.0)]
    assert mixup_phases(0.2, 40, 40) == [(40, 0.2)]
    assert mixup_phases(0.2, 2, 0) == [(2, 0.0)]  # QAT after --mixup-epochs: plain
    assert mixup_phases(0.0, 40, 30) == [(40, 0.0)]  # no mixup: nothing to schedule


def test_qat_trains_on_plain_images_only_when_mixup_is_scheduled(tmp_path: Path) -> None:
    assert qat_mixup_epochs(TrainOptions(data=tmp_path, run_dir=tmp_path, mixup=0.2)) is None  # mixup in QAT too, as before
    assert qat_mixup_epochs(TrainOptions(data=tmp_path, run_dir=tmp_path, mixup=0.2, mixup_epochs=30)) == 0


def _spy_alphas(monkeypatch) -> list[float]:
    import qana.train as train

    alphas: list[float] = []
    real = train.make_dataset

    def spy(*args, **kwargs):
        alphas.append(args[8] if len(args) > 8 else kwargs.get("mixup", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "make_dataset", spy)
    return alphas


def test_mixup_epochs_split_one_fit_into_blended_then_plain_epochs(tmp_path: Path, monkeypatch) -> None:
    """One learning-rate schedule over both parts (not two restarts), one history, and epochs counted on."""
    alphas = _spy_alphas(monkeypatch)
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0, mixup=0.2, mixup_epochs=2)
    history = _fit(model, _data(64, 0), _data(21, 1), opts, epochs=3, lr=0.1, weights_path=tmp_path / "w.h5",
                   mixup_epochs=opts.mixup_epochs)
    assert alphas == [0.2, 0.0]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert int(model.optimizer.iterations.numpy()) == 3 * 8


@pytest.mark.parametrize("stopped_after", [1, 3])
def test_a_fit_with_mixup_epochs_resumes_in_the_part_it_stopped_in(tmp_path: Path, monkeypatch, stopped_after: int) -> None:
    """Stopped in the blended part (epoch 1 of 2) or in the plain part (epoch 3): the resumed fit
    trains exactly the missing epochs, each on the images its part names."""
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0, mixup=0.2, mixup_epochs=2)
    train, val = _data(64, 0), _data(21, 1)
    backup, best = tmp_path / "float.backup", tmp_path / "best.h5"
    keras.utils.set_random_seed(0)
    _stop_after_epoch(monkeypatch, stopped_after)
    with pytest.raises(_Stopped):
        _fit(_tiny_model(), train, val, opts, epochs=4, lr=0.1, weights_path=best, backup_dir=backup, mixup_epochs=2)
    monkeypatch.undo()

    alphas = _spy_alphas(monkeypatch)
    trained: list[int] = []
    monkeypatch.setattr(keras.callbacks.TerminateOnNaN, "on_epoch_end", lambda self, epoch, logs=None: trained.append(epoch + 1))
    model = _tiny_model()
    history = _fit(model, train, val, opts, epochs=4, lr=0.1, weights_path=best, backup_dir=backup, mixup_epochs=2)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert trained == list(range(stopped_after + 1, 5))
    assert alphas == [0.2, 0.0]  # the blended part's fit runs no epoch once it is past
    assert int(model.optimizer.iterations.numpy()) == 4 * 8


def test_mixup_epochs_with_a_weight_average_are_refused(tmp_path: Path) -> None:
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0, mixup=0.2, mixup_epochs=1)
    with pytest.raises(RunSettingsError, match="--weight-ema"):
        _fit(_tiny_model(), _data(16, 0), _data(8, 1), opts, epochs=2, lr=0.1, weights_path=tmp_path / "w.h5",
             ema=0.99, mixup_epochs=1)


def test_after_blends_only_a_plain_epoch_is_kept(tmp_path: Path, monkeypatch) -> None:
    """The best validation score of a blended epoch must not become the kept model: that would
    undo the plain epochs --mixup-epochs adds to sharpen it before quantization."""
    import qana.train as train

    scores = iter([0.9, 0.8, 0.5, 0.6])
    monkeypatch.setattr(train, "_val_scores", lambda model, x, y: {"top1": (s := next(scores)), "macro_f1": s, "balanced_accuracy": s})
    ckpt = train._MacroF1Checkpoint(np.zeros((1, 8, 8, 3)), np.zeros(1), tmp_path / "best.h5", keep_from=2)
    model = _tiny_model()
    for epoch in range(4):
        ckpt.score(model, epoch)
    assert ckpt.best == pytest.approx(1.2)  # epoch 4's 0.6 + 0.6, not epoch 1's 0.9 + 0.9
    assert [h["epoch"] for h in ckpt.history] == [1, 2, 3, 4]  # the blended epochs are still recorded
    assert (tmp_path / "best.h5").is_file()
