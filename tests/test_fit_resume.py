"""A training stage stopped mid-way continues from its last finished epoch, not from epoch 1."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tf_keras as keras  # noqa: E402

from qana.train import TrainOptions, _fit  # noqa: E402
from tests.test_weight_ema import _data, _tiny_model  # noqa: E402


class _Stopped(Exception):
    """Stands in for a session stop or a reboot."""


def _stop_after_epoch(monkeypatch: pytest.MonkeyPatch, last: int) -> None:
    """Interrupt fit once the backup of epoch `last` (1-based) has been written."""
    original = keras.callbacks.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch + 1 == last:
            raise _Stopped

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", on_epoch_end)


def test_an_interrupted_fit_continues_from_its_last_finished_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0)
    train, val = _data(64, 0), _data(21, 1)
    backup, best = tmp_path / "float.backup", tmp_path / "best.h5"
    keras.utils.set_random_seed(0)
    _stop_after_epoch(monkeypatch, 2)
    with pytest.raises(_Stopped):
        _fit(_tiny_model(), train, val, opts, epochs=4, lr=0.1, weights_path=best, backup_dir=backup)
    monkeypatch.undo()
    progress = json.loads((backup / "progress.json").read_text())
    assert [h["epoch"] for h in progress["history"]] == [1, 2]

    model = _tiny_model()  # a new process builds the model afresh; the backup restores it
    history = _fit(model, train, val, opts, epochs=4, lr=0.1, weights_path=best, backup_dir=backup)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h.get("resumed", False) for h in history] == [False, False, True, False]
    # The optimizer continued where it stopped: 4 epochs of 8 steps in all, so the learning-rate
    # schedule ran its course once rather than restarting.
    assert int(model.optimizer.iterations.numpy()) == 4 * 8

    # Stopped after the last epoch, before the stage was marked finished (`run` removes the
    # backup only then): the fit counts as done and no epoch is trained again.
    again = _tiny_model()
    assert _fit(again, train, val, opts, epochs=4, lr=0.1, weights_path=best, backup_dir=backup) == history
    assert int(again.optimizer.iterations.numpy()) == 4 * 8  # restored, not one step further


def test_scores_without_an_epoch_checkpoint_are_not_continued(tmp_path: Path) -> None:
    """A stop can leave the scores of an attempt whose Keras checkpoint is gone (written first
    each epoch, or an older version deleted the checkpoint when the fit ended). Keras then
    trains from epoch 1, so the old best score must not decide which weights are kept."""
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0)
    train, val = _data(64, 0), _data(21, 1)
    backup, best = tmp_path / "float.backup", tmp_path / "best.h5"
    old_weights = _tiny_model()
    old_weights.save_weights(str(best))
    backup.mkdir()
    stale = [{"epoch": e, "top1": 1.0, "macro_f1": 1.0, "balanced_accuracy": 1.0} for e in (1, 2, 3)]
    (backup / "progress.json").write_text(json.dumps({"best": 2.0, "history": stale}))
    model = _tiny_model()
    history = _fit(model, train, val, opts, epochs=3, lr=0.1, weights_path=best, backup_dir=backup)
    assert [h["epoch"] for h in history] == [1, 2, 3] and not any(h.get("resumed") for h in history)
    assert all(h["top1"] < 1.0 for h in history)  # this fit's own scores, not the stale ones
    kept = _tiny_model()
    kept.load_weights(str(best))  # this fit's best epoch replaced the stale weights file
    assert not all(np.array_equal(a, b) for a, b in zip(kept.get_weights(), old_weights.get_weights()))


def test_fresh_does_not_continue_an_earlier_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0)
    train, val = _data(64, 0), _data(21, 1)
    backup, best = tmp_path / "float.backup", tmp_path / "best.h5"
    _stop_after_epoch(monkeypatch, 1)
    with pytest.raises(_Stopped):
        _fit(_tiny_model(), train, val, opts, epochs=3, lr=0.1, weights_path=best, backup_dir=backup)
    monkeypatch.undo()
    model = _tiny_model()
    history = _fit(model, train, val, replace(opts, resume=False), epochs=3, lr=0.1, weights_path=best, backup_dir=backup)
    assert [h["epoch"] for h in history] == [1, 2, 3] and not any(h.get("resumed") for h in history)
    assert int(model.optimizer.iterations.numpy()) == 3 * 8


def test_a_run_stopped_while_saving_its_float_model_does_not_train_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float fit's backup outlives the fit until the stage is marked finished, so a stop in
    between (saving float.h5, a session's end) resumes with the fit done, not from epoch 1."""
    from qana.train import run
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=48, image_size=40, seed=4)
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=32, width=8, feature_dim=16,
                        batch_size=8, epochs=2, cache_dir=tmp_path / "cache", command="test", stop_after="float")
    original_save = keras.Model.save

    def stopped_save(self, path, *args, **kwargs):
        if str(path).endswith("float.h5"):
            raise _Stopped
        return original_save(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", stopped_save)
    with pytest.raises(_Stopped):
        run(opts, progress=lambda m: None)
    monkeypatch.undo()
    backup = opts.run_dir / "float.backup"
    assert backup.is_dir() and not (opts.run_dir / "float.json").exists()

    trained: list[int] = []
    original_end = keras.callbacks.BackupAndRestore.on_epoch_end

    def counting_end(self, epoch, logs=None):
        trained.append(epoch)
        original_end(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", counting_end)
    info = run(opts, progress=lambda m: None)["float"]
    assert trained == []  # no epoch trained again
    assert [h["epoch"] for h in info["history"]] == [1, 2] and not any(h.get("resumed") for h in info["history"])
    assert (opts.run_dir / "float.h5").is_file() and not backup.exists()
