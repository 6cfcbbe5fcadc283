"""`qana train` refuses what would lose stored work or waste a training run, before it changes
anything (helper-19's audit, session 29): a --bundle-out that is not a bundle, a mistyped
teacher, records without the settings that made them, a split too small to test on, data
changed under a split, damaged records; and --fresh leaves no old fit to be continued."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qana.cli import app
from tests.synthetic import make_synthetic_ham

pytest.importorskip("tensorflow")

from qana.data import DataError  # noqa: E402
from qana.distill import TeacherError  # noqa: E402
from qana.saliency import SaliencyError  # noqa: E402
from qana.train import (  # noqa: E402
    STAGES,
    RunRecordError,
    RunSettingsError,
    TrainOptions,
    make_dataset,
    run,
    stage_backup_dir,
)

runner = CliRunner()


def _opts(tmp_path: Path, n_images: int = 48, **kw) -> TrainOptions:
    root = tmp_path / "ham"
    if not root.exists():
        make_synthetic_ham(root, n_images=n_images, image_size=40, seed=4)
    kw = {"image_size": 32, "width": 8, "feature_dim": 16, "batch_size": 8, "epochs": 1, "command": "test", **kw}
    return TrainOptions(data=root, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", **kw)


def _finished_run(opts: TrainOptions) -> dict[str, str]:
    """A run directory that looks finished (every stage's record and options.json): what a
    refusal must leave exactly as it was."""
    opts.run_dir.mkdir(parents=True)
    files = {f"{s}.json": json.dumps({"stage": s}) for s in STAGES}
    files["options.json"] = json.dumps({"seed": opts.seed})
    for name, text in files.items():
        (opts.run_dir / name).write_text(text)
    return files


def _unchanged(opts: TrainOptions, files: dict[str, str]) -> bool:
    return all((opts.run_dir / n).read_text() == t for n, t in files.items())


def test_a_bundle_out_folder_of_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RunSettingsError, match="holds other files and no bundle.json"):
        run(replace(opts, bundle_out=mine))
    assert (mine / "notes.txt").read_text() == "keep me" and not opts.run_dir.exists()
    for folder, name in ((opts.run_dir, "--run-dir"), (tmp_path, "--run-dir"), (opts.data, "--data")):
        with pytest.raises(RunSettingsError, match=f"would replace {name}"):
            run(replace(opts, bundle_out=folder))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunSettingsError, match="is a file"):
        run(replace(opts, bundle_out=tmp_path / "afile"))


@pytest.mark.parametrize("fresh", [False, True])
def test_a_mistyped_teacher_is_refused_before_the_run_changes(tmp_path: Path, fresh: bool) -> None:
    opts = replace(_opts(tmp_path), resume=not fresh)
    files = _finished_run(opts)
    with pytest.raises(SaliencyError, match="saliency teacher not found"):
        run(replace(opts, saliency_teacher=str(tmp_path / "typo" / "float.h5")))
    with pytest.raises(SaliencyError, match="ResNet-50 weights file not found"):
        run(replace(opts, saliency_teacher=f"resnet50:{tmp_path / 'none.h5'}"))
    with pytest.raises(TeacherError, match="no float.h5"):
        run(replace(opts, teachers=(str(tmp_path / "typo"),)))
    assert _unchanged(opts, files)  # with --fresh the finished run used to be gone by now


def test_finished_stages_without_readable_settings_are_refused(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    files = _finished_run(opts)
    (opts.run_dir / "options.json").unlink()
    with pytest.raises(RunSettingsError, match="no options.json"):
        run(replace(opts, epochs=99))  # used to resume, then record settings that never ran
    (opts.run_dir / "options.json").write_text('{"seed": ')
    with pytest.raises(RunRecordError, match="options.json: not valid JSON"):
        run(opts)
    del files["options.json"]
    assert _unchanged(opts, files)


def test_fresh_removes_every_stage_backup(tmp_path: Path) -> None:
    """An interrupted fit's backup left by an earlier attempt would otherwise be continued by
    the next resume, with the old settings' (here: another seed's split's) weights."""
    opts = _opts(tmp_path)
    for stage in ("pretrain", "float", "quantized"):
        backup = stage_backup_dir(opts, stage)
        (backup / "keras").mkdir(parents=True)
        (backup / "progress.json").write_text("{}")
    run(replace(opts, resume=False, seed=1, stop_after="split"), progress=lambda m: None)
    assert not any(stage_backup_dir(opts, s).exists() for s in ("pretrain", "float", "quantized"))


def test_a_split_with_an_empty_part_is_refused_before_training(tmp_path: Path) -> None:
    opts = _opts(tmp_path, limit=3)
    with pytest.raises(DataError, match=r"give train \d+ / validation \d+ / test 0 images"):
        run(opts, progress=lambda m: None)
    assert not (opts.run_dir / "split.json").exists()


def test_changed_labels_or_a_damaged_split_are_caught_on_resume(tmp_path: Path) -> None:
    opts = _opts(tmp_path, stop_after="split")
    run(opts, progress=lambda m: None)
    metadata = opts.data / "HAM10000_metadata.csv"
    original = metadata.read_text()
    header, *rows = original.splitlines()
    dx = header.split(",").index("dx")
    cells = rows[0].split(",")
    cells[dx] = "mel" if cells[dx] != "mel" else "nv"  # a corrected diagnosis, same images
    metadata.write_text("\n".join([header, ",".join(cells), *rows[1:]]) + "\n")
    with pytest.raises(RunSettingsError, match="changed since"):
        run(replace(opts, stop_after="saliency"), progress=lambda m: None)
    metadata.write_text(original)
    (opts.run_dir / "split.npz").write_bytes(b"not a zip")
    with pytest.raises(RunRecordError, match="split.npz: unreadable"):
        run(replace(opts, stop_after="saliency"), progress=lambda m: None)


def test_a_stage_whose_output_is_gone_is_redone(tmp_path: Path) -> None:
    opts = _opts(tmp_path, stop_after="float")
    run(opts, progress=lambda m: None)
    (opts.run_dir / "float.h5").unlink()  # a partial copy of the run, a file cleaned up
    messages: list[str] = []
    run(opts, progress=messages.append)
    assert any("[float] is marked finished but" in m and "float.h5 is missing" in m for m in messages), messages
    assert (opts.run_dir / "float.h5").is_file()


def test_a_saliency_teacher_trained_on_another_split_is_refused(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    teacher = replace(opts, run_dir=tmp_path / "teacher", seed=3, stop_after="split")
    run(teacher, progress=lambda m: None)
    (teacher.run_dir / "float.h5").write_bytes(b"stands in for a model: the split is checked first")
    with pytest.raises(SaliencyError, match="trained on another split"):
        run(replace(opts, saliency_teacher=str(teacher.run_dir / "float.h5"), stop_after="saliency"), progress=lambda m: None)


def test_one_seed_gives_one_sequence_of_training_batches() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 7

    def batches() -> list[np.ndarray]:
        ds = make_dataset(images, labels, 8, True, 5, np.ones(40, np.float32), 0.2, True, 0.0)
        return [b[0].numpy() for b in ds]

    first, second = batches(), batches()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_cli_refuses_settings_that_would_have_no_effect(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=4, image_size=40, seed=1)
    run_dir = tmp_path / "run"
    for args, message in (
        (["--target", "v2", "--weight-bits", "4"], "cannot map a 4-bit v2 model"),
        (["--target", "v1", "--weight-bits", "4", "--blocks", "2"], "the v1 network is sequential"),
        (["--qat-epochs", "0", "--qat-distill"], "--qat-distill needs quantization-aware fine-tuning"),
        (["--qat-epochs", "0", "--keep-quantized", "agreement"], "--qat-epochs 0 fine-tunes none"),
        (["--focal-gamma", "5"], "--focal-gamma applies only with --loss focal"),
        (["--label-weight", "0.9"], "--label-weight applies only with --teacher"),
    ):
        result = runner.invoke(app, ["train", "--data", str(clinic.root), "--run-dir", str(run_dir), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not run_dir.exists()
    # 4-bit on v2 stays possible for scoring the quantized Keras model (README, "4-bit weights on Akida 2.0")
    ok = runner.invoke(app, ["train", "--data", str(clinic.root), "--run-dir", str(run_dir), "--weight-bits", "4",
                             "--stop-after", "quantized", "--limit", "1"])
    assert "cannot map" not in ok.output


def test_a_refused_data_folder_leaves_no_run_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "metadata file not found" in result.output, result.output
    assert not (tmp_path / "run").exists()
