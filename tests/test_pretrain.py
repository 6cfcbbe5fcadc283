"""Self-supervised pretraining (`qana train --pretrain-epochs`, qana.pretrain): the VICReg loss,
the two random views, and the stage that hands its backbone to the float stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana import pretrain  # noqa: E402
from qana.train import RunRecordError, RunSettingsError, TrainOptions, initial_float_model, run  # noqa: E402
from tests.synthetic import make_synthetic_ham  # noqa: E402
from tests.test_augment import _hues  # noqa: E402


def _reference_terms(z1: np.ndarray, z2: np.ndarray) -> tuple[float, float, float]:
    """VICReg's three terms written out with numpy, straight from the paper's definitions."""
    n, d = z1.shape
    invariance = float(np.mean((z1 - z2) ** 2))
    variance = covariance = 0.0
    for z in (z1, z2):
        std = np.sqrt(z.var(axis=0, ddof=1) + 1e-4)
        variance += float(np.mean(np.maximum(0.0, 1.0 - std)))
        cov = np.cov(z, rowvar=False)
        covariance += float((cov**2).sum() - (np.diag(cov) ** 2).sum()) / d
    return invariance, variance, covariance


def test_vicreg_terms_match_the_papers_definitions() -> None:
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(32, 6)) * np.array([0.2, 0.5, 1, 2, 3, 0.1])
    z2 = z1 + rng.normal(scale=0.3, size=z1.shape)
    got = [float(t) for t in pretrain.vicreg_terms(z1, z2)]
    np.testing.assert_allclose(got, _reference_terms(z1, z2), rtol=1e-4)
    weights = (pretrain.INVARIANCE_WEIGHT, pretrain.VARIANCE_WEIGHT, pretrain.COVARIANCE_WEIGHT)
    assert float(pretrain.vicreg_loss(z1, z2)) == pytest.approx(float(np.dot(weights, got)), rel=1e-5)


def test_the_loss_punishes_collapse_and_rewards_agreement() -> None:
    rng = np.random.default_rng(1)
    spread = rng.normal(size=(64, 8)) * 2.0
    invariance, variance, _ = (float(t) for t in pretrain.vicreg_terms(spread, spread))
    assert invariance == 0.0 and variance == 0.0  # identical views, every dimension spread out: nothing to fix
    collapsed = np.ones((64, 8))
    _, variance, covariance = (float(t) for t in pretrain.vicreg_terms(collapsed, collapsed))
    assert variance == pytest.approx(2 * (1 - 0.01), abs=1e-4)  # both views, std 0 in every dimension
    correlated = np.repeat(rng.normal(size=(64, 1)), 8, axis=1) * 2.0  # every dimension the same feature
    _, _, covariance = (float(t) for t in pretrain.vicreg_terms(correlated, correlated))
    _, _, independent = (float(t) for t in pretrain.vicreg_terms(spread, spread))
    assert covariance > 10 * independent


def test_views_are_independent_random_crops_in_range_and_grey_keeps_no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    v1, v2 = next(iter(pretrain.view_pairs(images, batch=8, seed=0)))
    assert v1.shape == v2.shape == (8, 16, 16, 3)
    assert float(tf.reduce_min(v1)) >= 0.0 and float(tf.reduce_max(v1)) <= 255.0
    assert not np.allclose(v1.numpy(), v2.numpy())  # the two views of a pair are drawn separately
    monkeypatch.setattr(pretrain, "GREY_PROBABILITY", 1.0)
    grey = pretrain.random_view(tf.constant(images[0], tf.float32), seed=0, stream=0).numpy()
    np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-4)
    np.testing.assert_allclose(grey[..., 1], grey[..., 2], atol=1e-4)
    monkeypatch.setattr(pretrain, "GREY_PROBABILITY", 0.0)
    colour = pretrain.random_view(tf.constant(images[0], tf.float32), seed=0, stream=0).numpy()
    assert not np.allclose(colour[..., 0], colour[..., 1])


def test_grey_contrast_views_keep_every_pixels_hue(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--contrast grey` reaches the pretraining views: with the whole image as the crop and no
    grey view, a view is the image turned, flipped, brightened and contrasted about one grey
    level, so it has exactly the image's hues; tf.image's per-channel contrast moves them.
    The contrast is held near the range's low end, so that no draw (they depend on the global
    seed, i.e. on the tests run before) comes close to 1 and leaves the hues nearly as they were."""
    import tensorflow as tf

    monkeypatch.setattr(pretrain, "MIN_CROP_AREA", 1.0)
    monkeypatch.setattr(pretrain, "GREY_PROBABILITY", 0.0)
    monkeypatch.setattr(pretrain, "CONTRAST_RANGE", (0.6, 0.62))  # tf.image.random_contrast needs upper > lower
    rng = np.random.default_rng(3)  # a skin-like colour cast that brightness and contrast never clip
    image = np.stack([rng.integers(lo, lo + 20, (16, 16)) for lo in (130, 70, 100)], axis=-1).astype(np.float32)
    for seed in range(4):
        grey = pretrain.random_view(tf.constant(image), seed=seed, stream=0, contrast="grey").numpy()
        assert np.abs(np.sort(grey.ravel()) - np.sort(image.ravel())).max() > 1  # the view did change
        np.testing.assert_allclose(_hues(grey), _hues(image), atol=1e-5)
        per_channel = pretrain.random_view(tf.constant(image), seed=seed, stream=0).numpy()
        assert np.abs(_hues(per_channel) - _hues(image)).max() > 0.005
    with pytest.raises(ValueError, match="--contrast must be one of per-channel, grey, not 'gray'"):
        pretrain.view_pairs(image[None].astype(np.uint8), batch=1, seed=0, contrast="gray")


def test_a_partial_last_batch_is_dropped() -> None:
    images = np.zeros((20, 8, 8, 3), dtype=np.uint8)
    sizes = [int(v1.shape[0]) for v1, _ in pretrain.view_pairs(images, batch=8, seed=0)]
    assert sizes == [8, 8]


def _opts(tmp_path: Path, **kw) -> TrainOptions:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=48, image_size=40, seed=4)
    return TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, width=8, feature_dim=16,
                        batch_size=8, epochs=1, cache_dir=tmp_path / "cache", command="test", **kw)


def test_the_float_stage_starts_from_the_pretrained_backbone(tmp_path: Path) -> None:
    opts = _opts(tmp_path, pretrain_epochs=2, stop_after="pretrain")
    infos = run(opts, progress=lambda m: None)
    info = infos["pretrain"]
    assert info["enabled"] and info["epochs"] == 2 and [h["epoch"] for h in info["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in info["history"])
    saved = opts.run_dir / "pretrain.weights.h5"
    assert saved.is_file() and not (opts.run_dir / "pretrain.backup").exists()

    from qana.model import build_model
    from qana.train import set_seeds

    set_seeds(opts.seed)
    random_start = build_model(opts.model_spec())  # the pretrain stage's starting point (same seed)
    started = initial_float_model(opts)
    pretrained_stem = started.get_layer("stem_conv").get_weights()[0]
    assert not np.allclose(pretrained_stem, random_start.get_layer("stem_conv").get_weights()[0])  # pretraining moved it
    reference = build_model(opts.model_spec())
    reference.load_weights(str(saved))
    np.testing.assert_array_equal(pretrained_stem, reference.get_layer("stem_conv").get_weights()[0])
    # Without pretraining the float stage starts from a random model and needs no weights file.
    assert initial_float_model(replace(opts, pretrain_epochs=0, run_dir=tmp_path / "none")) is not None

    # A redone pretrain stage means the float stage (and everything after it) is redone too.
    after = run(replace(opts, stop_after="float"), progress=lambda m: None)
    assert after["float"]["pretrained"] is True
    saved.unlink()
    with pytest.raises(RunRecordError, match="pretrain.weights.h5 is missing"):
        initial_float_model(opts)


def test_the_pretrain_stage_uses_the_runs_contrast_and_reusing_it_needs_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    original = pretrain.view_pairs

    def view_pairs(images, batch, seed, contrast="per-channel"):
        asked.append(contrast)
        return original(images, batch, seed, contrast)

    monkeypatch.setattr(pretrain, "view_pairs", view_pairs)
    opts = _opts(tmp_path, pretrain_epochs=1, contrast="grey", stop_after="pretrain")
    infos = run(opts, progress=lambda m: None)
    assert asked == ["grey"] and infos["pretrain"]["contrast"] == "grey"
    # the pretrained weights were made with grey contrast: a run asking for per-channel cannot reuse them
    other = replace(opts, run_dir=tmp_path / "other", contrast="per-channel", reuse_from=opts.run_dir, reuse_through="pretrain")
    with pytest.raises(RunSettingsError, match="its pretrain stage was made with other settings \\(--contrast 'grey' there, 'per-channel' here\\)"):
        run(other, progress=lambda m: None)
    assert not (tmp_path / "other" / "pretrain.weights.h5").exists()


def test_runs_made_before_the_pretrain_stage_resume_without_redoing_their_float_stage(tmp_path: Path) -> None:
    opts = _opts(tmp_path, stop_after="float")
    run(opts, progress=lambda m: None)
    (opts.run_dir / "pretrain.json").unlink()  # what a run directory from before this stage looks like
    float_record = (opts.run_dir / "float.json").read_text()
    messages: list[str] = []
    infos = run(opts, progress=messages.append)
    assert infos["pretrain"] == {"enabled": False}
    assert "[float] already finished (resume)" in messages
    assert (opts.run_dir / "float.json").read_text() == float_record
    assert json.loads((opts.run_dir / "pretrain.json").read_text()) == {"enabled": False}


def test_an_interrupted_pretraining_continues_from_its_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stopped(Exception):
        pass

    original = keras.callbacks.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise Stopped

    opts = _opts(tmp_path, pretrain_epochs=3, stop_after="pretrain")
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", on_epoch_end)
    with pytest.raises(Stopped):
        run(opts, progress=lambda m: None)
    monkeypatch.undo()
    assert (opts.run_dir / "pretrain.backup").is_dir() and not (opts.run_dir / "pretrain.json").exists()
    info = run(opts, progress=lambda m: None)["pretrain"]
    assert [h["epoch"] for h in info["history"]] == [2, 3] and info["resumed_at_epoch"] == 2


def test_the_probe_script_scores_random_and_pretrained_backbones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.benchmark_scripts import load_benchmark

    probe = load_benchmark("pretrain_probe")
    opts = _opts(tmp_path, pretrain_epochs=1, stop_after="pretrain")
    run(opts, progress=lambda m: None)
    capsys.readouterr()  # the training run's own output
    probe.main(["--data", str(opts.data), str(opts.run_dir)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[1] for r in rows] == ["random", "pretrained"]
    assert all(0.0 <= float(x) <= 1.0 for r in rows for x in r[2:])
    # Features that separate the classes perfectly are probed as such; constant ones are not.
    labels = np.arange(70) % 7
    separable = np.eye(7)[labels] * 3 + np.random.default_rng(0).normal(scale=0.1, size=(70, 7))
    assert probe.probe_scores(separable, labels, separable, labels, seed=0)["top1"] == 1.0
    assert probe.probe_scores(np.ones((70, 7)), labels, np.ones((70, 7)), labels, seed=0)["top1"] < 0.3
    # A run without pretraining is refused with a message naming it.
    plain = _opts(tmp_path / "plain", stop_after="split")
    run(plain, progress=lambda m: None)
    with pytest.raises(SystemExit, match="no finished pretrain stage"):
        probe.main(["--data", str(plain.data), str(plain.run_dir)])


def test_the_docs_say_what_the_colour_jitter_does_to_hue() -> None:
    """No hue rotation is used, and no docstring, README or experiment-record sentence claims hue
    is never shifted: tf.image's per-channel contrast moves a blue-grey region's hue by the
    degrees the docs quote."""
    import colorsys
    import inspect

    import tensorflow as tf

    import qana.augment
    from qana.train import make_dataset

    for source in (inspect.getsource(pretrain.random_view), inspect.getsource(make_dataset)):
        assert "random_hue" not in source and "adjust_hue" not in source
    root = Path(__file__).resolve().parents[1]
    docs = [(root / name).read_text(encoding="utf-8") for name in ("README.md", "benchmarks/EXPERIMENTS.md")]
    for text in (pretrain.__doc__, qana.augment.__doc__, make_dataset.__doc__, *docs):
        assert "no hue shift" not in text.lower() and "no hue is ever shifted" not in text.lower()

    def hue(rgb: np.ndarray) -> float:
        return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))[0]

    image = np.zeros((16, 16, 3), np.float32)
    image[:] = (200, 150, 130)  # pink skin
    image[:8, :8] = (110, 120, 140)  # a blue-grey, veil-like region
    for factor, quoted, text in ((0.8, 16, make_dataset.__doc__), (0.6, 80, pretrain.__doc__)):
        veil = tf.clip_by_value(tf.image.adjust_contrast(tf.constant(image), factor), 0, 255).numpy()[0, 0]
        assert round(abs(hue(veil) - hue(image[0, 0]))) == quoted and f"up to {quoted} degrees" in text
