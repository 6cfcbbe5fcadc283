"""A training stage stopped mid-way continues from its last finished epoch, not from epoch 1."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

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
    assert not backup.exists()  # a finished fit leaves no backup to be mistaken for an unfinished one


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
