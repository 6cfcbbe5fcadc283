"""qana-sim's inputs. The --out folder (simulations.out_folder): a new run replaces only what an
earlier qana-sim run made, and only once it has written its own results; a refused run puts
the earlier run's audit log, key and plots back. Skipped images are named with their reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.out_folder import PREVIOUS, OutFolderError, check_out_folder, replacing_earlier_run

REPO = Path(__file__).resolve().parents[1]
TINY_V2 = REPO / "tests" / "fixtures" / "bundles" / "tiny-v2"


def _earlier_run(out: Path) -> dict[Path, bytes]:
    files = {out / "results.json": b"{}", out / "report.md": b"# earlier", out / "run" / "audit.db": b"signed log",
             out / "run" / "audit_key.pem": b"key", out / "plots" / "f1.png": b"png"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _contents(files: dict[Path, bytes]) -> dict[Path, bytes | None]:
    return {path: path.read_bytes() if path.is_file() else None for path in files}


def test_a_run_that_raises_puts_the_earlier_run_back_and_leaves_nothing_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = _earlier_run(out)
    with pytest.raises(RuntimeError, match="refused half-way"):
        with replacing_earlier_run(out):
            assert not (out / "run").exists() and (out / PREVIOUS / "run" / "audit.db").is_file()
            (out / "run").mkdir()
            (out / "run" / "audit.db").write_bytes(b"new, unfinished")
            (out / "work").mkdir()
            raise RuntimeError("refused half-way")
    assert _contents(files) == files
    assert not (out / "work").exists() and not (out / PREVIOUS).exists()


def test_a_run_that_ends_normally_replaces_the_earlier_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _earlier_run(out)
    with replacing_earlier_run(out):
        (out / "run").mkdir()
        (out / "run" / "audit.db").write_bytes(b"new log")
    assert (out / "run" / "audit.db").read_bytes() == b"new log"
    assert not (out / "plots").exists() and not (out / PREVIOUS).exists()
    assert not (out / "report.md").exists()  # the earlier run's results went with it


def test_folders_no_qana_sim_run_made_are_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    (out / "work").mkdir(parents=True)
    (out / "work" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutFolderError, match=r"already has work/ but no results.json"):
        with replacing_earlier_run(out):
            pass
    assert (out / "work" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutFolderError, match="is a file, not a folder"):
        check_out_folder(tmp_path / "file")
    check_out_folder(tmp_path / "new")  # a new or empty folder is fine
    assert not (tmp_path / "new").exists()


def test_a_killed_run_is_named_instead_of_guessed_at(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _earlier_run(out)
    (out / PREVIOUS / "run").mkdir(parents=True)  # a SIGKILL after the new run wrote its results.json
    with pytest.raises(OutFolderError, match="the last run finished but was stopped while tidying up"):
        check_out_folder(out)
    (out / "results.json").unlink()  # a SIGKILL before it: the earlier run's results.json is aside
    with pytest.raises(OutFolderError, match="was stopped before it finished"):
        check_out_folder(out)


def test_writing_the_results_half_way_is_undone_whole(tmp_path: Path) -> None:
    """helper-18 F1: a second Ctrl-C while the plots were drawn left the new results.json beside
    the earlier report.md, audit log and plots."""
    out = tmp_path / "out"
    files = _earlier_run(out)
    with pytest.raises(KeyboardInterrupt):
        with replacing_earlier_run(out):
            (out / "config.toml").write_text("new")
            (out / "plots").mkdir()
            raise KeyboardInterrupt  # in write_results, before its last file (results.json)
    assert _contents(files) == files
    assert not (out / "config.toml").exists() and not (out / PREVIOUS).exists()


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """helper-18 F6: two runs in one new folder both passed the checks, and one's failure
    deleted the other's folders."""
    import multiprocessing

    out = tmp_path / "out"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    first = multiprocessing.get_context("fork").Process(target=_hold, args=(out, ready, release))
    first.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutFolderError, match="another qana-sim run is writing into"):
            check_out_folder(out)
        with pytest.raises(OutFolderError, match="another qana-sim run is writing into"):
            with replacing_earlier_run(out):
                raise AssertionError("a second run got in")
        assert (out / "run" / "audit.db").read_bytes() == b"first run's"
    finally:
        release.set()
        first.join(30)
    assert first.exitcode == 0
    with replacing_earlier_run(out):  # once the first has finished, a new run may go ahead
        pass


def _hold(out: Path, ready, release) -> None:
    with replacing_earlier_run(out):
        (out / "run").mkdir()
        (out / "run" / "audit.db").write_bytes(b"first run's")
        (out / "results.json").write_text("{}")
        ready.set()
        release.wait(30)


@pytest.mark.usefixtures("private_cache")
def test_qana_sim_refused_after_the_features_keeps_the_earlier_run(ham: Path, tmp_path: Path, monkeypatch) -> None:
    """The helper-17 case: a run refused after the earlier run's folders made way (here: by the
    features step) used to leave a report whose audit log and plots were gone."""
    import simulations.experiment as experiment
    from simulations.cli import app
    from simulations.workspace import SourceError

    out = tmp_path / "out"
    files = _earlier_run(out)

    def refuse(*args, **kwargs):
        raise SourceError("the backbone emits nothing for these images")

    monkeypatch.setattr(experiment, "source_features", refuse)
    result = CliRunner().invoke(app, ["run", "--data", str(ham), "--bundle", str(TINY_V2), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "error: the backbone emits nothing" in result.output and "Traceback" not in result.output
    assert _contents(files) == files
    assert not (out / "work").exists() and not (out / PREVIOUS).exists()


@pytest.mark.usefixtures("private_cache")
def test_qana_sim_refuses_a_foreign_out_folder_before_loading_data(ham: Path, tmp_path: Path, monkeypatch) -> None:
    import simulations.experiment as experiment
    from simulations.cli import app

    out = tmp_path / "victim"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "figure1.png").write_bytes(b"mine")

    def never(*args, **kwargs):
        raise AssertionError("the data was loaded for a run that could not write its results")

    monkeypatch.setattr(experiment, "load_source", never)
    result = CliRunner().invoke(app, ["run", "--data", str(ham), "--bundle", str(TINY_V2), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "already has plots/ but no results.json" in result.output
    assert (out / "plots" / "figure1.png").read_bytes() == b"mine"



@pytest.mark.usefixtures("private_cache")
def test_skipped_images_are_named_with_their_reason(tmp_path: Path) -> None:
    """helper-17 F6: qana-sim said only "3 image(s) skipped (unreadable, or not in the metadata)"."""
    from simulations.config import resolve
    from simulations.workspace import load_source
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=32, seed=0, n_corrupt=1, n_missing=1)
    source = load_source(resolve(None, {"data": str(clinic.root), "bundle": str(TINY_V2)}), tmp_path / "cache")
    assert "skipped 2 image(s): " in source.description
    for image_id, reason in source.dataset.skipped.items():
        assert f"{image_id} ({reason})" in source.description


def test_a_config_file_with_settings_its_run_does_not_use_still_runs_with_a_note(tmp_path: Path, monkeypatch) -> None:
    """helper-18 F2: qana-sim compare wrote config.toml files whose akida-edge runs carry the
    gradient strategy; `--config` must still rerun them, saying what it ignores. The same
    setting as a flag is refused."""
    import simulations.experiment as experiment
    from simulations.cli import app
    from simulations.config import ConfigError, resolve
    from simulations.workspace import SourceError

    old = tmp_path / "config.toml"
    old.write_text('learning = "akida-edge"\nstrategy = "fedprox"\nstrategy_options = "proximal_mu=1.0"\nrounds = 2\n')
    cfg = resolve(old, {})
    assert cfg.settings_without_effect() == ["strategy", "strategy_options"]
    with pytest.raises(ConfigError, match="strategy='fedprox' applies only to learning 'gradient'"):
        resolve(None, {"learning": "akida-edge", "strategy": "fedprox"})

    def stop(*args, **kwargs):
        raise SourceError("stopped here by the test")

    monkeypatch.setattr(experiment, "run_experiment", stop)
    result = CliRunner().invoke(app, ["run", "--config", str(old), "--out", str(tmp_path / "out"), "--quiet"])
    assert "note: strategy='fedprox', strategy-options='proximal_mu=1.0' apply only to learning 'gradient'" in result.output
    assert f"from {old}, they are ignored" in result.output
    assert "error: stopped here by the test" in result.output
