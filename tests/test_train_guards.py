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
    # no attention blocks: these tests are about stages and settings, and the plain net quantizes in half the time
    kw = {"image_size": 32, "width": 8, "feature_dim": 16, "batch_size": 8, "epochs": 1, "command": "test", "attention": "none", **kw}
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
    with pytest.raises(TeacherError, match="teacher run directory not found"):
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
    (opts.run_dir / "split.npz").write_bytes(b"")  # emptied by a full disk: numpy raises EOFError
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
    (teacher.run_dir / "float.json").write_text("{}")  # stands in for its finished float stage
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


# ----------------------------------------------------------------------------- helper-19's later findings


def test_a_run_directory_in_use_is_refused(tmp_path: Path) -> None:
    import os

    from qana.atomic import try_lock
    from qana.train import RUN_LOCK

    opts = _opts(tmp_path)
    opts.run_dir.mkdir()
    held = try_lock(opts.run_dir / RUN_LOCK)  # stands in for a live `qana train`
    try:
        with pytest.raises(RunSettingsError, match="another qana train is running in"):
            run(replace(opts, stop_after="split"), progress=lambda m: None)
    finally:
        os.close(held)
    run(replace(opts, stop_after="split"), progress=lambda m: None)  # released: the run goes on


def test_a_stop_while_saving_the_best_weights_keeps_the_earlier_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tf_keras as keras

    from qana.train import _MacroF1Checkpoint
    from tests.test_weight_ema import _data, _tiny_model

    best = tmp_path / "float.best.weights.h5"
    best.write_bytes(b"the earlier best epoch")
    val = _data(14, 1)
    ckpt = _MacroF1Checkpoint(val.images, val.labels, best)

    def stopped_mid_write(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save_weights", stopped_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.score(_tiny_model(), 0)
    assert best.read_bytes() == b"the earlier best epoch"


def test_a_diverged_fit_is_refused_not_marked_finished(tmp_path: Path) -> None:
    from qana.train import _fit
    from tests.test_weight_ema import _data, _tiny_model

    opts = TrainOptions(data=tmp_path, run_dir=tmp_path, batch_size=8, seed=0)
    backup = tmp_path / "float.backup"
    with pytest.raises(RunSettingsError, match="training diverged"):
        _fit(_tiny_model(), _data(32, 0), _data(14, 1), opts, epochs=2, lr=float("inf"), weights_path=tmp_path / "b.h5", backup_dir=backup)
    assert not backup.exists()  # a resume starts the fit afresh rather than continuing the diverged one


def test_metadata_the_prior_cannot_read_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from qana.clinical import ClinicalDataError

    opts = _opts(tmp_path)
    metadata = opts.data / "HAM10000_metadata.csv"
    header, first, *rows = metadata.read_text().splitlines()
    cells = first.split(",")
    cells[header.split(",").index("localization")] = "elbow"
    metadata.write_text("\n".join([header, ",".join(cells), *rows]) + "\n")
    with pytest.raises(ClinicalDataError, match="elbow"):
        run(opts, progress=lambda m: None)
    assert not opts.run_dir.exists()
    # the advice in the error then works: nothing was recorded that would refuse it
    run(replace(opts, clinical_prior="off", stop_after="split"), progress=lambda m: None)


def test_a_resumed_command_keeps_the_runs_test_time_views(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=2)
    base = ["train", "--data", str(clinic.root), "--run-dir", str(tmp_path / "run"), "--image-size", "32", "--stop-after", "split"]
    assert runner.invoke(app, [*base, "--test-time-views", "2"]).exit_code == 0
    again = runner.invoke(app, base)  # the flag left out: 2 views, not a redo with 1
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "options.json").read_text())["test_time_views"] == 2


def test_cli_refuses_values_that_fail_later(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=4, image_size=40, seed=1)
    (tmp_path / "afile").write_text("x")
    for args, message in (
        (["--width", "3"], "--width must be even on v2"),
        (["--learning-rate", "inf"], "--learning-rate must be above 0 and at most 1"),
        (["--learning-rate", "1e6"], "--learning-rate must be above 0 and at most 1"),
        (["--bundle-out", str(tmp_path / "afile" / "bundle")], f"cannot be made: {tmp_path / 'afile'} is a file"),
    ):
        result = runner.invoke(app, ["train", "--data", str(clinic.root), "--run-dir", str(tmp_path / "run"), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "run").exists()


def test_a_changed_late_setting_redoes_only_the_stages_that_read_it(tmp_path: Path, float_copy_quantizer: None) -> None:
    """helper-19's F10: settings read only after the float stage (LATE_SETTINGS) no longer need
    --fresh; the float model is kept and the quantized stage onwards is redone with them.
    (float_copy_quantizer: which stages are redone does not depend on quantizeml, which took
    most of this test's four minutes in CI.)"""
    opts = _opts(tmp_path, qat_epochs=0, stop_after="quantized")
    run(opts, progress=lambda m: None)
    float_model = (opts.run_dir / "float.h5").read_bytes()
    assert not json.loads((opts.run_dir / "quantized.json").read_text()).get("history")  # calibration only
    messages: list[str] = []
    run(replace(opts, qat_epochs=1, clinical_prior="off"), progress=messages.append)
    assert "[quantized] and the stages after it were made with other settings (--qat-epochs 0 (now 1); --clinical-prior 'auto' (now 'off')); redoing them" in messages, messages
    assert "[float] already finished (resume)" in messages and "[quantized] running ..." in messages
    assert (opts.run_dir / "float.h5").read_bytes() == float_model
    assert len(json.loads((opts.run_dir / "quantized.json").read_text())["history"]) == 1  # one QAT epoch this time
    assert json.loads((opts.run_dir / "options.json").read_text())["qat_epochs"] == 1
    # a change that --stop-after would stop before: refused, not half-applied (records unmarked, nothing redone)
    with pytest.raises(RunSettingsError, match=r"--qat-epochs 1 \(now 2\) changes the quantized stage onwards, but --stop-after float stops before it"):
        run(replace(opts, qat_epochs=2, clinical_prior="off", stop_after="float"), progress=lambda m: None)
    # an earlier stage's setting among them: refused as before, nothing changed
    with pytest.raises(RunSettingsError, match=r"--epochs 1 \(now 2\).*--head-smote 'auto' \(now 'off'\)"):
        run(replace(opts, qat_epochs=1, clinical_prior="off", epochs=2, head_smote="off"), progress=lambda m: None)
    assert (opts.run_dir / "quantized.json").is_file()


def test_a_run_directory_changed_while_the_data_loaded_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings are checked before the data loads and again under the run's lock: another
    `qana train` that finished in the directory meanwhile (helper-21's F2) is not overwritten."""
    import qana.train as train

    opts = _opts(tmp_path, stop_after="split")
    real = train.run_dataset

    def load_while_another_run_finishes(o, progress=False):
        monkeypatch.setattr(train, "run_dataset", real)
        dataset = real(o, progress=progress)
        run(replace(opts, seed=9), progress=lambda m: None)  # the other command, done while this one loaded
        return dataset

    monkeypatch.setattr(train, "run_dataset", load_while_another_run_finishes)
    # here the other run's settings differ, so the second check names them (a run it left with the
    # same settings but other stages to redo gets "changed while this command loaded the data")
    with pytest.raises(RunSettingsError, match=r"was started with other settings: --seed 9 \(now 0\)"):
        run(opts, progress=lambda m: None)
    assert json.loads((opts.run_dir / "options.json").read_text())["seed"] == 9
