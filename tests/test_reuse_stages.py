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
    assert json.loads((opts.run_dir / "split.json").read_text())["reused_from"] == str(source.run_dir.resolve())
    assert f"[split] reused from {source.run_dir}" in messages
    note = next(m for m in messages if m.startswith(f"note: {source.run_dir} was made with"))
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
    # the float model was made with settings this run would otherwise record as its own
    for name, value, shown in (("width", 16, "--width 8 there, 16 here"), ("mixup", 0.2, "--mixup 0.0 there, 0.2 here"),
                               ("colour_constancy", "shades-of-gray", "--colour-constancy 'none' there, 'shades-of-gray' here")):
        other = _opts(tmp_path, "other", seed=3, reuse_from=source.run_dir, reuse_through="float", **{name: value})
        with pytest.raises(RunSettingsError, match=f"its float stage was made with other settings \\({shown}\\)"):
            run(other)
        assert not other.run_dir.exists()
    # the saliency stage (off in the source) does not depend on the network's shape
    run(_opts(tmp_path, "wide", seed=3, width=16, reuse_from=source.run_dir, reuse_through="saliency", stop_after="saliency"), progress=lambda m: None)
    # a run made before the optional stages existed had them off
    legacy = tmp_path / "legacy"
    shutil.copytree(source.run_dir, legacy)
    for name in ("saliency.json", "pretrain.json"):
        (legacy / name).unlink()
    run(replace(opts, run_dir=tmp_path / "from-legacy", reuse_from=legacy), progress=lambda m: None)
    assert json.loads((tmp_path / "from-legacy" / "pretrain.json").read_text())["enabled"] is False


def test_a_reusing_run_resumes_after_the_source_moved_and_recopies_a_lost_file(tmp_path: Path, source: TrainOptions) -> None:
    opts = _opts(tmp_path, "b", seed=3, reuse_from=source.run_dir, stop_after="split")
    run(opts, progress=lambda m: None)
    moved = tmp_path / "moved"
    source.run_dir.rename(moved)
    messages: list[str] = []
    run(opts, progress=messages.append)  # the same command: its reused stages are kept
    assert "[split] already finished (resume)" in messages, messages
    (opts.run_dir / "split.npz").unlink()
    messages.clear()
    run(replace(opts, reuse_from=moved), progress=messages.append)  # copied again, not made anew with seed 3
    assert f"[split] reused from {moved}" in messages, messages
    assert (opts.run_dir / "split.npz").read_bytes() == (moved / "split.npz").read_bytes()
    # the source's split replaced since: this run's later stages were made on the old one
    other = _opts(tmp_path, "seed7", seed=7, stop_after="split")
    run(other, progress=lambda m: None)
    shutil.copy(other.run_dir / "split.npz", moved / "split.npz")
    (opts.run_dir / "split.npz").unlink()
    with pytest.raises(RunSettingsError, match="is no longer the one .* reused"):
        run(replace(opts, reuse_from=moved), progress=lambda m: None)


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
    # a split made from other images (another --limit) does not fit this run's data; with --fresh
    # too, the refusal leaves the run's own records as they were
    with pytest.raises(RunSettingsError, match="its split was made from other data"):
        run(_opts(tmp_path, "c", limit=40, reuse_from=source.run_dir, stop_after="split"), progress=lambda m: None)
    assert not (tmp_path / "c").exists()
    before = {p.name: p.read_bytes() for p in half.run_dir.iterdir() if p.is_file()}
    with pytest.raises(RunSettingsError, match="its split was made from other data"):
        run(replace(half, limit=40, resume=False, reuse_from=source.run_dir), progress=lambda m: None)
    assert {p.name: p.read_bytes() for p in half.run_dir.iterdir() if p.is_file()} == before
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
