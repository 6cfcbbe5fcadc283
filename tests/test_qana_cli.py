"""`qana evaluate` and `qana info` as a person would run them (tiny real bundle, synthetic images)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from qana.cli import app
from tests.synthetic import as_dataverse_tab, make_synthetic_ham

TINY = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
runner = CliRunner()


def test_evaluate_writes_exactly_the_documented_json_and_a_plot(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=0, n_corrupt=1)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"top1", "macro_f1", "balanced_accuracy", "per_class", "confusion", "n", "backend"}
    assert metrics["n"] == 30 and metrics["backend"] == "akida"
    assert len(metrics["confusion"]) == 7 and sum(map(sum, metrics["confusion"])) == 30
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "skipped 1 image" in result.output


def test_evaluate_without_matplotlib_still_writes_the_json(tmp_path: Path, monkeypatch) -> None:
    """A clinic's core install has no matplotlib: the metrics are written, the PNG is skipped with a
    reason, and an explicit --plot is refused before any image is scored."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=2)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n"] == 12
    assert "no PNG, matplotlib is not installed" in result.output and not out.with_suffix(".png").exists()
    plot = tmp_path / "cm.png"
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--plot", str(plot)])
    assert result.exit_code == 2 and "matplotlib is not installed" in result.output and "top1" not in result.output


def test_evaluate_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "none"), "--model", str(TINY)])
    assert result.exit_code == 2 and "data folder not found" in result.output
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=10, image_size=40, seed=1)
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--backend", "float"])
    assert result.exit_code == 2 and "does not carry the float Keras model" in result.output
    # A Keras model placed in a bundle without a recorded hash is never loaded (helper-12, session 25).
    unhashed = Path(shutil.copytree(TINY, tmp_path / "unhashed"))
    (unhashed / "float.h5").write_bytes(b"anything")
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(unhashed), "--backend", "float"])
    assert result.exit_code == 2 and "float.h5 has no sha256" in result.output
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--backend", "gpu"])
    assert result.exit_code == 2 and "--backend must be one of" in result.output
    # Output paths that cannot work are refused before any image is scored.
    (tmp_path / "afile").write_text("kept")
    (tmp_path / "adir").mkdir()
    for outputs, message in (
        (["--json", tmp_path / "adir"], "is a directory"),
        (["--json", tmp_path / "afile" / "m.json"], "is a file, not a folder"),
        (["--plot", tmp_path / "cm.txt"], "give a path ending in .png"),
        (["--json", tmp_path / "m.png"], "ends in .png"),
    ):
        result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), *map(str, outputs)])
        assert result.exit_code == 2 and message in result.output and "top1" not in result.output, (outputs, result.output)
    assert (tmp_path / "afile").read_text() == "kept"


def test_a_model_file_akida_cannot_read_is_named(tmp_path: Path) -> None:
    """model.fbz replaced together with its recorded sha256: the hash check passes, akida cannot parse it."""
    import hashlib

    copy = Path(shutil.copytree(TINY, tmp_path / "b"))
    (copy / "model.fbz").write_bytes(b"not an akida model")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["model.fbz"] = hashlib.sha256(b"not an akida model").hexdigest()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=8, image_size=40, seed=3)
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(copy)])
    assert result.exit_code == 2 and "model.fbz is not a readable Akida model" in result.output, result.output
    from simulations.cli import app as sim_app

    result = runner.invoke(sim_app, ["run", "--data", str(clinic.root), "--bundle", str(copy), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "model.fbz is not a readable Akida model" in result.output, result.output
    assert "Traceback" not in result.output


def test_info_verifies_and_refuses_a_tampered_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(TINY)])
    assert result.exit_code == 0 and "verified" in result.output and "tiny" in result.output
    copy = Path(shutil.copytree(TINY, tmp_path / "b"))
    (copy / "head.npz").write_bytes(b"tampered")
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 2 and "head.npz has been modified" in result.output


def test_shipped_bundles_verify() -> None:
    for name, target in (("v2", "v2"), ("v1", "v1"), ("v2-sqrt", "v2"), ("v2-s7", "v2"), ("v2-s10", "v2")):
        path = Path(__file__).resolve().parents[1] / "qana" / "bundles" / name
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 0, result.output
        assert f"Akida {target}" in result.output


def test_info_names_channels_the_chip_cuts_early() -> None:
    # v2-s10 is the shipped v2 model as converted before session 25 (qana.convert.keep_output_headroom);
    # qana/bundles/v2 is the same model converted after.
    bundles = Path(__file__).resolve().parents[1] / "qana" / "bundles"
    old = runner.invoke(app, ["info", str(bundles / "v2-s10")])
    assert old.exit_code == 0 and "141 output channel(s) of last_conv rescaled below shift -24" in old.output
    new = runner.invoke(app, ["info", str(bundles / "v2")])
    assert new.exit_code == 0 and "no output channel rescaled below shift -24" in new.output


def test_train_bad_inputs_are_one_line_errors_before_anything_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "none"), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "data folder not found" in result.output
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=4, image_size=40, seed=1)
    for args, message in (
        (["--target", "v3"], "--target must be v2 or v1"),
        (["--weight-bits", "6"], "--weight-bits must be 4 or 8"),
        (["--image-size", "96"], "--image-size must be a multiple of 8 from 16 to 88"),
        (["--val-fraction", "0.7"], "--val-fraction must be from 0.02 to 0.5"),
        (["--test-time-views", "3"], "--test-time-views must be one of 1, 2, 4, 8"),
        (["--target", "v1", "--weight-bits", "8"], "Akida 1.0 (v1) supports at most 4-bit weights"),
        (["--class-weighting", "inverse"], "--class-weighting must be sqrt, balanced or none"),
        (["--loss", "hinge"], "--loss must be one of ce, focal"),
        (["--loss", "focal", "--focal-gamma", "-1"], "--focal-gamma must be from 0 to 10"),
        (["--mixup", "-0.2"], "--mixup must be from 0 (off) to 10, not -0.2"),
        (["--mixup", "0.2", "--epochs", "5", "--mixup-epochs", "6"], "--mixup-epochs must be from 1 to --epochs (5), not 6"),
        (["--mixup", "0.2", "--mixup-epochs", "0"], "--mixup-epochs must be from 1 to --epochs (20), not 0"),
        (["--mixup-epochs", "10"], "--mixup-epochs says how long mixup lasts; without --mixup there is none"),
        (["--mixup", "0.2", "--mixup-epochs", "10", "--weight-ema", "0.99"], "--mixup-epochs cannot be combined with --weight-ema"),
        (["--stop-after", "floats"], "--stop-after must be one of split, saliency, pretrain, float"),
        (["--seed", str(2**32)], "--seed must be from 0 to 4294967295, not 4294967296"),  # helper-30 P16: crashed in the float stage
        (["--target", "v1", "--weight-bits", "4", "--image-size", "16"], "--image-size must be at least 24 for --target v1"),  # helper-35 P4
        (["--attention", "both-unsigned"], "--attention must be one of both, seca, se, none, both-signed"),
        (["--pretrain-epochs", "-1"], "--pretrain-epochs must be 0 (off) or more, not -1"),
        (["--epochs", "0"], "--epochs must be at least 1, not 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
        (["--limit", "-1"], "--limit must be at least 0, not -1 (0 = all images)"),
        (["--seed", "-1"], "--seed must be at least 0, not -1"),
        (["--learning-rate", "-1"], "--learning-rate must be above 0 and at most 1, not -1.0"),
        (["--attention", "bogus"], "--attention must be one of both, seca, se, none, both-signed, seca-signed, se-signed, not 'bogus'"),
        (["--head-smote", "bogus"], "--head-smote must be auto, on or off, not 'bogus'"),
        (["--contrast", "gray"], "--contrast must be one of per-channel, grey, not 'gray'"),
        (["--clinical-prior", "on"], "--clinical-prior must be auto or off, not 'on'"),
        (["--colour-constancy", "retinex"], "--colour-constancy must be one of none, shades-of-gray, not 'retinex'"),
        (["--colour-constancy", "shades-of-gray", "--target", "v1", "--weight-bits", "4"], "applied by the Akida 2.0 runtime only"),
    ):
        result = runner.invoke(app, ["train", "--data", str(clinic.root), "--run-dir", str(run_dir), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not run_dir.exists()  # refused before a stage wrote anything


def test_train_resumed_with_other_settings_is_a_one_line_error(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=2)
    base = ["train", "--data", str(clinic.root), "--run-dir", str(tmp_path / "run"), "--image-size", "32", "--stop-after", "split"]
    first = runner.invoke(app, base)
    assert first.exit_code == 0 and "finished stages: split" in first.output, first.output
    again = runner.invoke(app, [*base, "--loss", "focal"])
    assert again.exit_code == 2 and "was started with other settings: --loss 'ce' (now 'focal')" in again.output
    assert "Traceback" not in again.output
    # A --fresh start refused on its data leaves the run as it was: the first settings still resume.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(clinic.root, bad)
    metadata = bad / "HAM10000_metadata.csv"
    header, first_row, *rows = metadata.read_text().splitlines()
    dx = header.split(",").index("dx")
    cells = first_row.split(",")
    cells[dx] = "foo"
    metadata.write_text("\n".join([header, ",".join(cells), *rows]) + "\n")
    fresh = runner.invoke(app, [*[bad if a == str(clinic.root) else a for a in base], "--fresh", "--loss", "focal"])
    assert fresh.exit_code == 2 and "unknown diagnosis 'foo'" in fresh.output, fresh.output
    resumed = runner.invoke(app, base)
    assert resumed.exit_code == 0 and "[split] already finished (resume)" in resumed.output, resumed.output
    # Other images under the same folder, and a --run-dir that is a file: one line each.
    shutil.rmtree(clinic.root)
    make_synthetic_ham(clinic.root, n_images=24, image_size=40, seed=5)
    changed = runner.invoke(app, [*base[:-2], "--stop-after", "saliency"])
    assert changed.exit_code == 2 and "changed since" in changed.output and "Traceback" not in changed.output, changed.output
    (tmp_path / "afile").write_text("kept")
    on_file = runner.invoke(app, ["train", "--data", str(clinic.root), "--run-dir", str(tmp_path / "afile"), "--stop-after", "split"])
    assert on_file.exit_code == 2 and "--run-dir" in on_file.output and (tmp_path / "afile").read_text() == "kept", on_file.output


# ----------------------------------------------------------------------------- helper-15's audit (session 27)


def test_an_unreadable_metadata_file_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    import qana.data

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=1)
    real_open = Path.open

    def refuse_metadata(self, *args, **kwargs):
        if self.name == "HAM10000_metadata.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_metadata)
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY)])
    assert result.exit_code == 2, result.output
    assert "cannot read" in result.output and "Permission denied" in result.output and "Traceback" not in result.output
    assert qana.data.DataError  # the error type the CLI reports


def test_no_command_line_prints_local_variables_in_a_traceback() -> None:
    """A bug's traceback printed every local: image arrays, patient age/sex/site, keys (helper-15)."""
    from client.cli import app as client_app
    from server.cli import app as server_app
    from simulations.cli import app as sim_app

    for typer_app in (app, client_app, server_app, sim_app):
        assert typer_app.pretty_exceptions_show_locals is False, typer_app.info.name


def test_a_failed_metrics_write_keeps_the_previous_file_whole(tmp_path: Path) -> None:
    """Written in place, a full disk left 1,024 bytes of invalid JSON where good metrics were.
    The second run here may write at most 1 KiB per file (RLIMIT_FSIZE); the metrics are more."""
    import os
    import resource
    import subprocess

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=3)
    out = tmp_path / "m.json"
    env = {**os.environ, "QANA_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-c", "from qana.cli import app; app()", "evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    assert len(before) > 1024 and json.loads(before)["n"] == 12

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, preexec_fn=small_files)
    assert second.returncode == 2, second.stderr
    assert f"--json {out}" in second.stderr and "Traceback" not in second.stderr
    assert out.read_bytes() == before


def test_images_the_metadata_does_not_list_are_named(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=8, image_size=40, seed=4)
    extra = clinic.root / "images" / "ISIC_9999999.jpg"
    shutil.copyfile(next((clinic.root / "images").glob("ISIC_*.jpg")), extra)
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY)])
    assert result.exit_code == 0, result.output
    assert "8 images (skipped 1 image(s): ISIC_9999999 (not in HAM10000_metadata.csv" in result.output


def test_output_and_backend_problems_are_refused_before_any_image_is_decoded(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    import qana.data

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=5)
    decoded: list[object] = []
    monkeypatch.setattr(qana.data, "load_images", lambda *a, **k: decoded.append(a) or ({}, {}, {}))
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--backend", "akidda"])
    assert result.exit_code == 2 and "--backend must be one of akida, quantized, float, not 'akidda'" in result.output
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.TemporaryFile

    def refuse_in_locked(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_in_locked)
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(locked / "m.json")])
    assert result.exit_code == 2 and f"cannot write to {locked} (Permission denied)" in result.output
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(tmp_path / "m.png")])
    assert result.exit_code == 2 and "ends in .png" in result.output
    assert not decoded


def test_a_folder_where_the_png_would_go_skips_the_png_not_the_evaluation(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=6)
    (tmp_path / "result.png").mkdir()
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(tmp_path / "result.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "result.json").read_text())["n"] == 6
    assert "no PNG beside --json" in result.output and "--plot" not in result.output


def test_outputs_follow_links_keep_the_umask_and_nothing_is_created_for_a_failed_run(tmp_path: Path) -> None:
    """helper-16: the atomic write replaced a link instead of its target, ignored the umask, and
    the early writability check created output folders for a run that then failed."""
    import os
    import stat

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=6, image_size=40, seed=7)
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "none"), "--model", str(TINY), "--json", str(tmp_path / "new" / "a" / "m.json")])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()

    real = tmp_path / "real.json"
    real.write_text('{"old": 1}')
    (tmp_path / "latest.json").symlink_to(real)
    old_umask = os.umask(0o077)
    try:
        result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", str(tmp_path / "latest.json")])
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "latest.json").is_symlink() and json.loads(real.read_text())["n"] == 6
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_train_left_out_late_flags_keep_the_runs_own_values(tmp_path: Path) -> None:
    """Left out on a resumed run, settings read only after the float stage keep the recorded
    values (as --test-time-views does): re-exporting a bundle without repeating --qat-epochs 1
    must not redo the run's quantized stage onwards with the default 3 (helper-21's F1)."""
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=2)
    base = ["train", "--data", str(clinic.root), "--run-dir", str(tmp_path / "run"), "--image-size", "32", "--stop-after", "split"]
    late = ["--qat-epochs", "1", "--qat-distill", "--weight-bits", "8", "--keep-quantized", "agreement",
            "--head-smote", "off", "--clinical-prior", "off"]
    first = runner.invoke(app, [*base, *late])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, base)
    assert again.exit_code == 0 and "finished stages: split" in again.output, again.output
    recorded = json.loads((tmp_path / "run" / "options.json").read_text())
    assert (recorded["qat_epochs"], recorded["qat_distill"], recorded["keep_quantized"], recorded["head_smote"],
            recorded["clinical_prior"]) == (1, True, "agreement", "off", "off")
    # given, it is the new value; no stage that reads it has run yet, so nothing is redone
    changed = runner.invoke(app, [*base, "--no-qat-distill"])
    assert changed.exit_code == 0 and "redoing" not in changed.output, changed.output
    assert json.loads((tmp_path / "run" / "options.json").read_text())["qat_distill"] is False


def test_info_says_what_it_verified_and_prints_the_preprocessing(tmp_path: Path) -> None:
    """helper-30 P2/P3: files absent from a copy were listed with a hash and called verified;
    the preprocessing (colour constancy included) was never printed."""
    copy = Path(shutil.copytree(TINY, tmp_path / "b"))
    manifest = json.loads((copy / "bundle.json").read_text())
    listed = len(manifest["files"])
    manifest["files"]["float.h5"] = "0" * 64  # listed, as in the shipped v2-s10, but not in this copy
    (copy / "bundle.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 0, result.output
    assert f"file       float.h5  sha256 {'0' * 64}  (not in this copy)" in result.output
    assert f"verified: the {listed} file(s) in this copy match their recorded sha256 (1 listed file(s) not in this copy" in result.output
    assert "\npreprocess crop centre square; resize 32x32 box filter; colour constancy none\n" in result.output


def test_info_names_a_model_made_for_the_other_akida(tmp_path: Path) -> None:
    """helper-30 P15: a v2 bundle holding a v1 model (hash updated) was shown as v2 and verified."""
    import hashlib

    copy = Path(shutil.copytree(TINY, tmp_path / "b"))
    shutil.copyfile(TINY.parent / "tiny-v1" / "model.fbz", copy / "model.fbz")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["model.fbz"] = hashlib.sha256((copy / "model.fbz").read_bytes()).hexdigest()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["info", str(copy)])
    assert result.exit_code == 2 and "'target' is v2 but model.fbz is an Akida v1 model" in result.output, result.output


def test_info_names_what_is_wrong_with_the_folder(tmp_path: Path) -> None:
    """helper-30 P4/P11: every one of these said "has no bundle.json", or was a traceback."""
    (tmp_path / "dir-manifest" / "bundle.json").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    version = Path(shutil.copytree(TINY, tmp_path / "version"))
    manifest = json.loads((version / "bundle.json").read_text())
    (version / "bundle.json").write_text(json.dumps({**manifest, "format_version": "1"}))
    for path, message in (
        (tmp_path / "none", "bundle folder not found"),
        (tmp_path / "afile", "is a file, not a bundle folder"),
        (tmp_path / "dir-manifest", "bundle.json is not a file"),
        (version, "format_version '1' is not supported"),
        (tmp_path / ("a" * 300), "File name too long"),
    ):
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 2 and message in result.output and result.exception is None or isinstance(result.exception, SystemExit), (path, result.output)
        assert message in result.output, (path, result.output)


def test_evaluate_outputs_never_damage_inputs_or_stored_files(tmp_path: Path) -> None:
    """helper-30 P4/P5/P8/P9/P14: outputs that would replace the bundle's manifest or the metadata,
    a looping or dangling link, a too-long name: refused before evaluating, nothing replaced;
    eval.v2 and eval.v1 no longer share one PNG."""
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=10, image_size=40, seed=5)
    bundle = Path(shutil.copytree(TINY, tmp_path / "b"))
    manifest = (bundle / "bundle.json").read_bytes()
    metadata = clinic.metadata.read_bytes()
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    (tmp_path / "res").symlink_to(tmp_path / "nowhere" / "dir")
    (tmp_path / "kept.json").write_text('{"earlier": "results"}')
    evaluate = ["evaluate", "--data", str(clinic.root), "--model", str(bundle)]
    for outputs, message in (
        (["--json", bundle / "bundle.json"], "is inside the bundle folder"),
        (["--json", bundle / "m.json"], "is inside the bundle folder"),
        (["--json", clinic.metadata], "data folder's own files (HAM10000_metadata.csv)"),
        (["--json", tmp_path / "loop.json"], "Too many levels of symbolic links"),
        (["--json", tmp_path / "res" / "m.json"], "res is a link to"),
        (["--json", tmp_path / "kept.json", "--plot", tmp_path / "res" / "p.png"], "res is a link to"),
        (["--json", tmp_path / ("a" * 300 + ".json")], "File name too long"),
    ):
        result = runner.invoke(app, [*evaluate, *map(str, outputs)])
        assert result.exit_code == 2 and message in result.output and "top1" not in result.output, (outputs, result.output)
        assert "Traceback" not in result.output
    assert (bundle / "bundle.json").read_bytes() == manifest and clinic.metadata.read_bytes() == metadata
    assert (tmp_path / "kept.json").read_text() == '{"earlier": "results"}'
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in TINY.iterdir())
    for name in ("eval.v2", "eval.v1"):
        result = runner.invoke(app, [*evaluate, "--json", str(tmp_path / name)])
        assert result.exit_code == 0 and f"confusion matrix: {tmp_path / name}.png" in result.output, result.output
    assert (tmp_path / "eval.v2.png").is_file() and (tmp_path / "eval.v1.png").is_file()
    assert (tmp_path / "eval.v2").read_text().endswith("}\n")
    tab = as_dataverse_tab(clinic)  # Dataverse's form of the metadata is as much the data's own
    tab_bytes = tab.read_bytes()
    result = runner.invoke(app, [*evaluate, "--json", str(tab)])
    assert result.exit_code == 2 and "data folder's own files (HAM10000_metadata.tab)" in result.output, result.output
    assert tab.read_bytes() == tab_bytes


def test_evaluate_json_to_stdout_is_json_alone() -> None:
    """helper-30 P12: the report was printed into the JSON on stdout."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        clinic = make_synthetic_ham(Path(tmp) / "ham", n_images=8, image_size=40, seed=6)
        done = subprocess.run(
            [sys.executable, "-m", "qana.cli", "evaluate", "--data", str(clinic.root), "--model", str(TINY), "--json", "/dev/stdout"],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 8
    assert "top1" in done.stderr and "metrics: /dev/stdout" in done.stderr


def test_a_bundle_folder_akida_cannot_open_is_named_for_its_name(tmp_path: Path) -> None:
    """helper-30 P10: an intact bundle under a non-UTF-8 folder name was "not a readable Akida model"."""
    import os
    import subprocess

    odd = os.fsencode(str(tmp_path)) + b"/b-\xff"
    shutil.copytree(TINY, os.fsdecode(odd))
    done = subprocess.run([sys.executable, "-m", "qana.cli", "info", odd], capture_output=True, timeout=300)
    assert done.returncode == 2 and b"akida can only open files whose path is valid UTF-8" in done.stderr, done.stderr
