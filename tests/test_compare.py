"""`qana-sim compare`: four experiments (gradient / akida-edge x standard / new-class) and one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from live_bundles import spiking_tiny_v1
from synthetic import HAM_CENTRES, make_synthetic_ham
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.timeout(900)
def test_compare_runs_both_learning_modes_in_both_scenarios_and_tabulates_them(tmp_path: Path) -> None:
    from simulations.cli import app

    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=160, image_size=32, seed=12, centres=HAM_CENTRES)
    bundle = spiking_tiny_v1(tmp_path / "live")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--data", str(data), "--bundle", str(bundle), "--rounds", "2",
                                      "--local-epochs", "5", "--new-class", "df", "--new-class-round", "2",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert [(r["learning"], r["scenario"]) for r in runs] == [
        ("gradient", "standard"), ("akida-edge", "standard"), ("gradient", "new-class"), ("akida-edge", "new-class")]
    for r in runs:
        assert r["status"] == "finished"
        assert (Path(r["report"])).is_file()
        assert r["federated"]["macro_f1"] is not None and r["local_only"]["balanced_accuracy"] is not None
        if r["scenario"] == "new-class":
            assert r["new_class"]["appeared_in_round"] == 2 and r["new_class"]["old_macro_f1_change"] is not None
    # the table's numbers are the experiments' own results
    table = (out / "comparison.md").read_text()
    g = json.loads((out / "gradient-standard" / "results.json").read_text())["headline"]["metrics"]["federated"]
    assert f"| gradient | {g['macro_f1']:.3f} | {g['balanced_accuracy']:.3f} |" in table
    assert "## New-class scenario" in table and "| akida-edge | df (" in table


def test_compare_refuses_a_v2_bundle_before_running_anything(tmp_path: Path) -> None:
    """Both learning modes use the one bundle and akida-edge needs Akida 1.0: say so up front."""
    from simulations.cli import app

    tiny_v2 = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--bundle", str(tiny_v2), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "needs a v1 bundle" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [({"new_class": "zzz"}, "new class 'zzz' is not a class of the data"),
     ({"new_class_clinic": "nope"}, "new-class clinic 'nope' is not one of")],
)
def test_compare_checks_the_new_class_before_the_first_experiment(ham: Path, tmp_path: Path, flags: dict, message: str) -> None:
    """helper-17 F3: a misspelt --new-class / --new-class-clinic used to be refused by the third
    experiment, after two whole runs."""
    from simulations.compare import run_comparison
    from simulations.config import resolve
    from simulations.scenario import ScenarioError

    base = resolve(None, {"data": str(ham), "bundle": str(Path(__file__).resolve().parent / "fixtures" / "bundles" / "tiny-v1"),
                          "rounds": 1, "new_class_round": 1, "split": "iid", **flags}, varied=("learning", "scenario"))

    def never(cfg):
        raise AssertionError(f"an experiment ran ({cfg.learning}, {cfg.scenario}) before the scenario was checked")

    with pytest.raises(ScenarioError, match=message):
        run_comparison(base, tmp_path / "compare", never)


def test_each_compared_run_keeps_only_the_settings_it_uses(tmp_path: Path) -> None:
    """The base settings serve all four runs: an akida-edge run gets no strategy and a standard
    run no new class (they would be refused as unused), but a split setting no run uses is refused."""
    from simulations.compare import plan
    from simulations.config import ConfigError, resolve

    base = resolve(None, {"strategy": "fedprox", "strategy_options": "proximal_mu=0.1", "new_class": "mel", "rounds": 4},
                   varied=("learning", "scenario"))
    runs = {(c.learning, c.scenario): c for c in plan(base, tmp_path)}
    assert runs[("gradient", "new-class")].strategy == "fedprox" and runs[("gradient", "new-class")].new_class == "mel"
    assert runs[("akida-edge", "new-class")].strategy == "fedavg" and runs[("akida-edge", "new-class")].new_class == "mel"
    assert runs[("gradient", "standard")].strategy == "fedprox" and runs[("gradient", "standard")].new_class == "df"
    with pytest.raises(ConfigError, match="alpha=0.3 applies only to split 'dirichlet'"):
        resolve(None, {"alpha": 0.3}, varied=("learning", "scenario"))


def test_compare_checks_every_results_folder_before_the_first_experiment(ham: Path, tmp_path: Path) -> None:
    """helper-18 F8: a folder the 4th run may not use was refused only after three whole runs."""
    from simulations.compare import run_comparison, run_name
    from simulations.config import resolve
    from simulations.out_folder import OutFolderError

    base = resolve(None, {"data": str(ham), "bundle": str(Path(__file__).resolve().parent / "fixtures" / "bundles" / "tiny-v1"),
                          "rounds": 1, "new_class_round": 1, "split": "iid"}, varied=("learning", "scenario"))
    (tmp_path / "compare" / run_name("akida-edge", "new-class") / "work").mkdir(parents=True)  # not a qana-sim run's

    def never(cfg):
        raise AssertionError(f"an experiment ran ({cfg.learning}, {cfg.scenario}) before every folder was checked")

    with pytest.raises(OutFolderError, match="already has work/ but no results.json"):
        run_comparison(base, tmp_path / "compare", never)
