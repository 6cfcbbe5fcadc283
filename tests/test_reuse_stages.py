"""`qana train --reuse-from`: a new run starts from another run's finished stages (its split, or
up to its float model), so two recipes can be compared on the same lesions without copying
files by hand into a run directory that then has records but no settings of its own."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qana.cli import app
from tests.synthetic import make_synthetic_ham

pytest.importorskip("tensorflow")

from qana.train import RunRecordError, RunSettingsError, TrainOptions, run  # noqa: E402

runner = CliRunner()


def _opts(tmp_path: Path, name: str, **kw) -> TrainOptions:
    root = tmp_path / "ham"
    if not root.exists():
        make_synthetic_ham(root, n_images=48, image_size=40, seed=4)
    kw = {"image_size": 32, "width": 8, "feature_dim": 16, "batch_size": 8, "epochs": 1, "command": "test", **kw}
    return TrainOptions(data=root, run_dir=tmp_path / name, cache_dir=tmp_path / "cache", **kw)


@pytest.fixture
def source(tmp_path: Path) -> TrainOptions:
    """A run finished through its float stage, with seed 3."""
    opts = _opts(tmp_path, "source", seed=3, stop_after="float")
    run(opts, progress=lambda m: None)
    return opts


def test_a_new_run_reuses_the_split_and_resumes_with_the_same_command(tmp_path: Path, source: TrainOptions) -> None:
    opts = _opts(tmp_path, "mixup", seed=5, mixup=0.2, reuse_from=source.run_dir, stop_after="saliency")
    messages: list[str] = []
    run(opts, progress=messages.append)
    assert (opts.run_dir / "split.npz").read_bytes() == (source.run_dir / "split.npz").read_bytes()
    assert json.loads((opts.run_dir / "split.json").read_text())["reused_from"] == str(source.run_dir)
    assert f"[split] reused from {source.run_dir}" in messages
    note = next(m for m in messages if m.startswith("note: the reused stages were made with"))
    assert "--seed 3" in note and "--mixup 0.0" in note, note
    assert not (opts.run_dir / "float.json").exists()  # only the split was reused
    # an interrupted run is resumed by the same command, or by the command without --reuse-from
    for again in (opts, replace(opts, reuse_from=None)):
        messages.clear()
        run(again, progress=messages.append)
        assert "[split] already finished (resume)" in messages, messages


def test_reusing_through_the_float_stage_copies_the_model(tmp_path: Path, source: TrainOptions) -> None:
    opts = _opts(tmp_path, "qat", seed=3, qat_epochs=5, reuse_from=source.run_dir, reuse_through="float", stop_after="float")
    messages: list[str] = []
    run(opts, progress=messages.append)
    assert (opts.run_dir / "float.h5").read_bytes() == (source.run_dir / "float.h5").read_bytes()
    assert [m for m in messages if m.endswith("reused from " + str(source.run_dir))] == [
        f"[{s}] reused from {source.run_dir}" for s in ("split", "saliency", "pretrain", "float")
    ]
    assert not any("[float] running" in m for m in messages)
    with pytest.raises(RunSettingsError, match=r"another shape \(--width 8 there, 16 here\)"):
        run(_opts(tmp_path, "wider", seed=3, width=16, reuse_from=source.run_dir, reuse_through="float"))
    assert not (tmp_path / "wider").exists()


def test_what_cannot_be_reused_is_refused_and_nothing_is_changed(tmp_path: Path, source: TrainOptions) -> None:
    with pytest.raises(RunRecordError, match="no such run directory"):
        run(_opts(tmp_path, "a", reuse_from=tmp_path / "nowhere"))
    with pytest.raises(RunSettingsError, match="is the run directory itself"):
        run(replace(source, reuse_from=source.run_dir))
    half = _opts(tmp_path, "half", stop_after="split")
    run(half, progress=lambda m: None)
    with pytest.raises(RunRecordError, match="its saliency stage is not finished"):
        run(_opts(tmp_path, "b", reuse_from=half.run_dir, reuse_through="saliency"))
    # a run with a split of its own keeps it
    own = (half.run_dir / "split.npz").read_bytes()
    with pytest.raises(RunSettingsError, match="already has a split stage of its own"):
        run(replace(half, reuse_from=source.run_dir))
    assert (half.run_dir / "split.npz").read_bytes() == own
    # a split made from other images (another --limit) does not fit this run's data
    with pytest.raises(RunSettingsError, match="its split was made from other data"):
        run(_opts(tmp_path, "c", limit=40, reuse_from=source.run_dir, stop_after="split"), progress=lambda m: None)
    assert not (tmp_path / "c" / "split.json").exists()
    # copying the files by hand is refused, and the message points to --reuse-from
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    for name in ("split.npz", "split.json"):
        shutil.copy(source.run_dir / name, by_hand / name)
    with pytest.raises(RunSettingsError, match="--reuse-from THAT_RUN"):
        run(_opts(tmp_path, "by-hand"))


def test_cli_checks_the_reuse_options(tmp_path: Path) -> None:
    root = tmp_path / "ham"
    root.mkdir()
    result = runner.invoke(app, ["train", "--data", str(root), "--run-dir", str(tmp_path / "r"), "--reuse-through", "float"])
    assert result.exit_code == 2 and "--reuse-through applies only with --reuse-from" in result.output, result.output
    result = runner.invoke(app, ["train", "--data", str(root), "--run-dir", str(tmp_path / "r"), "--reuse-from", str(tmp_path), "--reuse-through", "head"])
    assert result.exit_code == 2 and "--reuse-through must be one of split, saliency, pretrain, float" in result.output, result.output
