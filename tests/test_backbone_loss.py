"""The backbone loss options (focal loss: γ = 0 is cross-entropy), stopping after a stage,
refusing to resume a run with other settings, and reading a run's settings back."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.run_record import RunRecordError, RunSettingsError, TrainOptions, recorded_options  # noqa: E402
from qana.train import _fit, backbone_loss, run  # noqa: E402
from tests.synthetic import make_synthetic_ham  # noqa: E402
from tests.test_weight_ema import _data, _tiny_model  # noqa: E402


def _loss(opts: TrainOptions, labels: np.ndarray, logits: np.ndarray) -> float:
    one_hot = np.eye(logits.shape[1], dtype=np.float32)[labels]
    soft = opts.loss == "focal"
    return float(backbone_loss(opts, soft_targets=soft)(one_hot if soft else labels, logits))


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_gamma_down_weights_easy_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (32, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 32)
    ce = _loss(TrainOptions(data=tmp_path, run_dir=tmp_path), labels, logits)
    focal0 = _loss(TrainOptions(data=tmp_path, run_dir=tmp_path, loss="focal", focal_gamma=0.0), labels, logits)
    assert focal0 == pytest.approx(ce, rel=1e-5)
    # An image the model already gets right with confidence counts far less under γ = 2.
    easy = np.full((1, 7), -5.0, np.float32)
    easy[0, 3] = 5.0
    opts2 = TrainOptions(data=tmp_path, run_dir=tmp_path, loss="focal", focal_gamma=2.0)
    ce_easy = _loss(TrainOptions(data=tmp_path, run_dir=tmp_path), np.array([3]), easy)
    assert _loss(opts2, np.array([3]), easy) < 1e-3 * ce_easy
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        backbone_loss(TrainOptions(data=tmp_path, run_dir=tmp_path, loss="hinge"), soft_targets=False)


def test_training_with_focal_loss_runs_and_moves_the_weights(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    start = [w.copy() for w in model.get_weights()]
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0, loss="focal")
    history = _fit(model, _data(64, 0), _data(21, 1), opts, epochs=1, lr=0.5, weights_path=tmp_path / "w.h5")
    assert len(history) == 1
    assert max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start)) > 0.01


def test_stop_after_finishes_that_stage_and_nothing_later(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=40, image_size=40, seed=0)
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, cache_dir=tmp_path / "cache",
                        command="test", stop_after="saliency")
    messages: list[str] = []
    infos = run(opts, progress=messages.append)
    assert list(infos) == ["split", "saliency"]
    assert sorted(p.name for p in opts.run_dir.glob("*.json")) == ["options.json", "saliency.json", "split.json"]
    assert any("stopped after [saliency]" in m for m in messages)
    # Rerun: the finished stages are resumed, still nothing later.
    assert list(run(opts, progress=lambda m: None)) == ["split", "saliency"]
    with pytest.raises(ValueError, match="unknown stage 'floats'"):
        run(TrainOptions(data=clinic.root, run_dir=tmp_path / "other", stop_after="floats"), progress=lambda m: None)


def test_resuming_with_other_settings_is_refused_and_keeps_the_record(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=40, image_size=40, seed=0)
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, cache_dir=tmp_path / "cache",
                        command="test", stop_after="split")
    run(opts, progress=lambda m: None)
    recorded = (opts.run_dir / "options.json").read_text()
    for changed, flags in ((replace(opts, loss="focal"), ["--loss 'ce' (now 'focal')"]),
                           (replace(opts, val_fraction=0.05, epochs=3), ["--val-fraction 0.15 (now 0.05)", "--epochs 20 (now 3)"])):
        with pytest.raises(RunSettingsError, match="was started with other settings") as info:
            run(changed, progress=lambda m: None)
        assert all(flag in str(info.value) for flag in flags), str(info.value)
        assert (opts.run_dir / "options.json").read_text() == recorded  # the record of the finished stages stays
    # Settings that only steer the run may change; --fresh (resume=False) starts over with the new ones.
    run(replace(opts, stop_after="saliency", command="other", test_time_views=2), progress=lambda m: None)
    run(replace(opts, loss="focal", resume=False), progress=lambda m: None)
    assert '"loss": "focal"' in (opts.run_dir / "options.json").read_text()
    # An older run's options.json without a newer setting counts as that setting's default.
    (opts.run_dir / "options.json").write_text(recorded.replace('  "loss": "ce",\n', ""))
    run(opts, progress=lambda m: None)


def test_recorded_options_read_a_run_back_as_it_was_trained(tmp_path: Path) -> None:
    """Benchmarks score a run with the settings it was trained with, on this machine's paths."""
    trained = TrainOptions(data=Path("/elsewhere/ham"), run_dir=Path("/elsewhere/run"), image_size=48, feature_dim=128,
                           test_time_views=8, affine=True, teachers=("runs/a", "runs/b"), learning_rate=1e-3,
                           cache_dir=Path("/elsewhere/cache"), command="qana train ...")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "options.json").write_text(json.dumps(asdict(trained), default=str))
    back = recorded_options(run_dir, tmp_path / "ham")
    assert back == replace(trained, data=tmp_path / "ham", run_dir=run_dir, cache_dir=TrainOptions(data=back.data, run_dir=run_dir).cache_dir)
    assert isinstance(back.teachers, tuple)
    # An older record: missing settings are their defaults, settings since removed are ignored.
    (run_dir / "options.json").write_text(json.dumps({"image_size": 32, "epochs": 40, "retired_setting": 1}))
    older = recorded_options(run_dir, tmp_path / "ham")
    assert (older.image_size, older.epochs, older.loss, older.test_time_views) == (32, 40, "ce", 1)
    # Bad records are named, not half-read.
    (run_dir / "options.json").write_text("{not json")
    with pytest.raises(RunRecordError, match="not valid JSON"):
        recorded_options(run_dir, tmp_path / "ham")
    (run_dir / "options.json").write_text(json.dumps({"epochs": "many"}))
    with pytest.raises(RunRecordError, match="epochs is 'many', expected a number"):
        recorded_options(run_dir, tmp_path / "ham")
    with pytest.raises(RunRecordError, match="no options.json"):
        recorded_options(tmp_path / "nowhere", tmp_path / "ham")
