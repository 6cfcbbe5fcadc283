"""qana-sim end to end: the deployment's ServerApp and ClientApp on Flower's simulation engine.

Tiny synthetic HAM10000-style data and the tiny real Akida bundle. Checks that a two-round
federation finishes under a timeout and writes every result file; that the clinics really ran
(their chip's evaluations equal the driver's scores of the same heads, bit for bit) without
re-running the backbone; that the same seed gives the same result; that Ctrl-C leaves a
readable partial result and no Ray process behind; and that bad settings are one error line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
TINY_V2 = REPO / "tests" / "fixtures" / "bundles" / "tiny-v2"


pytestmark = pytest.mark.usefixtures("private_cache")


def _config(ham: Path, out: Path, **overrides):
    from simulations.config import resolve

    flags = {"data": str(ham), "bundle": str(TINY_V2), "rounds": 2, "local_epochs": 10, "learning_rate": 0.05,
             "out": str(out), "keep_work": True, **overrides}
    return resolve(None, flags)


# --------------------------------------------------------------------------- settings


def test_flags_override_the_toml_file_and_the_resolved_config_reads_back(tmp_path: Path) -> None:
    from simulations.config import load_toml, resolve

    exp = tmp_path / "exp.toml"
    exp.write_text('split = "dirichlet"\nclinics = 16\nalpha = 0.3\nlocal-epochs = 7\nrounds = 4\n')
    cfg = resolve(exp, {"rounds": 9, "alpha": None})
    assert (cfg.split, cfg.clinics, cfg.alpha, cfg.local_epochs, cfg.rounds) == ("dirichlet", 16, 0.3, 7, 9)
    written = tmp_path / "config.toml"
    written.write_text(cfg.to_toml())
    assert resolve(written, {}) == cfg
    assert load_toml(written)["rounds"] == 9


@pytest.mark.parametrize(
    "toml,flags,message",
    [
        ('split = "centre"\nclinicz = 4\n', {}, "unknown key(s) clinicz"),
        ("rounds = \"ten\"\n", {}, "rounds = 'ten' must be int"),
        ("[simulation]\nrounds = 3\n", {}, "tables are not used (simulation)"),
        ("rounds = 3\n", {"split": "random"}, "unknown split 'random'"),
        ("", {"split": "dirichlet", "alpha": 0.0}, "alpha=0.0: the Dirichlet concentration must be > 0"),
        ("", {"dropout": 1.0}, "dropout=1.0: must be in [0, 1)"),
        ("", {"strategy": "fedfoo"}, "unknown strategy 'fedfoo'"),
        ("", {"strategy": "fedprox", "strategy_options": "mu=0.1"}, "does not take option(s) mu"),
        ("", {"strategy": "fedtrimmedavg", "strategy_options": "beta=0.5"}, "beta=0.5: must be a number >= 0 and < 0.5"),
        ("", {"strategy": "fedprox", "strategy_options": "proximal_mu=-1"}, "proximal_mu=-1: must be a number >= 0"),
        ("", {"strategy": "krum", "strategy_options": "num_malicious_nodes=-3"}, "num_malicious_nodes=-3: must be a whole number >= 0"),
        ("", {"strategy": "krum", "strategy_options": "num_malicious_nodes=1.5"}, "num_malicious_nodes=1.5: must be a whole number"),
        ("", {"strategy": "fedprox", "strategy_options": "proximal_mu=0.1,proximal-mu=0.9"}, "strategy option proximal_mu is given twice"),
        ("", {"strategy": "fedadam", "strategy_options": "eta=0"}, "eta=0: must be a number > 0"),
        ("", {"strategy": "fedadam", "strategy_options": "beta_2=nan"}, "beta_2=nan: must be a number >= 0 and < 1"),
        ("rounds = 3\nrounds = 4\n", {}, "not valid TOML"),
        # helper-17: accepted before, then a degenerate split or a refusal only inside the ServerApp
        ("", {"split": "dirichlet", "alpha": float("inf")}, "alpha=inf: the Dirichlet concentration must be > 0 and at most 10000"),
        ("l2 = nan\n", {}, "l2=nan: must be a number from 0 to 1e+06"),
        ("l2 = inf\n", {}, "l2=inf: must be a number from 0 to 1e+06"),
        ("", {"batch_size": 70000}, "batch-size=70000: must be between 1 and 65536"),
        ("", {"learning_rate": 1e-12}, "learning-rate=1e-12: must be from 1e-09 to 10"),
        # settings the run would not use (helper-17 F7): refused as qana-server refuses edge keys in a gradient run
        ("", {"alpha": 0.3}, "alpha=0.3 applies only to split 'dirichlet' (split is 'centre')"),
        ("", {"split": "iid", "classes_per_clinic": 3}, "classes-per-clinic=3 applies only to split 'pathological'"),
        ("", {"learning": "akida-edge", "strategy": "krum", "local_epochs": 50},
         "strategy='krum', local-epochs=50 apply only to learning 'gradient' (learning is 'akida-edge')"),
        ("", {"new_class": "mel", "new_class_round": 2}, "new-class='mel', new-class-round=2 apply only to scenario 'new-class'"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path: Path, toml: str, flags: dict, message: str) -> None:
    from simulations.config import ConfigError, resolve

    exp = tmp_path / "exp.toml"
    exp.write_text(toml)
    with pytest.raises(ConfigError) as err:
        resolve(exp, flags)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--split", "random"], "error: unknown split 'random'; choose one of centre, dirichlet, iid, pathological"),
        (["--split", "dirichlet", "--alpha", "0"], "error: alpha=0.0: the Dirichlet concentration must be > 0"),
        (["--split", "dirichlet", "--alpha", "1e308"], "error: alpha=1e+308: the Dirichlet concentration must be > 0 and at most 10000"),
        (["--split", "iid", "--clinics", "500"], "error: 500 clinics but the data has only"),
        (["--split", "centre", "--clinics", "3"], "error: split 'centre' makes one clinic per source centre and the data has 4"),
        (["--config", "MISSING.toml"], "error: config file not found"),
        (["--config", "BAD.toml"], "error: "),
        (["--bundle", "/nonexistent/bundle"], "error: no model bundle at /nonexistent/bundle"),
        # qana-server's repeatable spelling is accepted too, and every occurrence reaches the check
        (["--strategy", "fedavg", "--strategy-option", "proximal_mu=1", "--strategy-option", "eta=0.1"], "error: fedavg does not take option(s) eta, proximal_mu"),
    ],
)
def test_cli_refuses_bad_input_with_one_line_and_no_traceback(ham: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from simulations.cli import app

    (tmp_path / "BAD.toml").write_text("clinics = 4\nsplti = \"iid\"\n")
    args = [a.replace("MISSING.toml", str(tmp_path / "missing.toml")).replace("BAD.toml", str(tmp_path / "BAD.toml")) for a in args]
    bundle = [] if "--bundle" in args else ["--bundle", str(TINY_V2)]
    previous = {tmp_path / "out" / "run" / "audit.db": b"earlier run", tmp_path / "out" / "plots" / "f1.png": b"png",
                tmp_path / "out" / "results.json": b"{}"}  # as an earlier qana-sim run left them
    for path, data in previous.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    result = CliRunner().invoke(app, ["run", "--data", str(ham), *bundle, "--out", str(tmp_path / "out"), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert {path: path.read_bytes() for path in previous} == previous  # a refused run keeps the previous one
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines[-1].startswith(message), result.output
    assert sum(l.startswith("error:") for l in lines) == 1
    assert "Traceback" not in result.output


def test_without_data_the_embedded_sample_is_used_or_its_absence_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    from simulations import workspace
    from simulations.cli import app

    monkeypatch.setattr(workspace, "EMBEDDED_DATA", tmp_path / "not-installed")
    result = CliRunner().invoke(app, ["run", "--bundle", str(TINY_V2), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: the embedded HAM10000 sample is not installed")


# --------------------------------------------------------------------------- the simulation


@pytest.fixture(scope="module")
def two_runs(ham: Path, tmp_path_factory):
    """The same two-round experiment twice (same seed, dropout 0.3): both results and the first's work dir."""
    from simulations.experiment import run_experiment

    cache = tmp_path_factory.mktemp("cache")
    results = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"run-{name}")
        cfg = _config(ham, out, dropout=0.3, seed=3)
        t0 = time.perf_counter()
        result = run_experiment(cfg, cache_root=cache, echo=lambda _m: None, progress=False)
        results.append((result, out, time.perf_counter() - t0))
    return results


@pytest.mark.timeout(600)
def test_two_round_simulation_finishes_and_writes_every_result(two_runs) -> None:
    result, out, seconds = two_runs[0]
    assert result.status == "finished", (result.message, result.federated and result.federated.error)
    fed = result.federated
    assert [r.round for r in fed.rounds] == [0, 1, 2]
    assert all(r.head_version for r in fed.rounds)
    for name in ("config.toml", "results.json", "rounds.csv", "clinics.csv", "partition.csv", "report.md",
                 "plots/curves.png", "plots/clinics.png", "plots/confusion.png", "plots/communication.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "finished" and data["config"]["rounds"] == 2
    assert set(data["headline"]["metrics"]) == {"federated", "pooled", "local_only"}
    assert "federated/pooled" in data["headline"]["ratios"]
    rounds_csv = (out / "rounds.csv").read_text().splitlines()
    assert rounds_csv[0].startswith("round,method,top1,macro_f1,balanced_accuracy")
    assert len(rounds_csv) == 1 + 3 * 3  # rounds 0..2 x (federated, pooled, local-only)
    # round 0 carries the bundle to every clinic; later rounds only heads
    assert fed.rounds[0].bytes_sent > 4 * TINY_V2.joinpath("model.fbz").stat().st_size
    assert 0 < fed.rounds[1].bytes_sent < fed.rounds[0].bytes_sent and fed.rounds[1].bytes_received > 0
    # Flower's Ray utilities import TensorFlow when installed; the simulation processes must not
    assert "tensorflow/core" not in (out / "run" / "simulation.log").read_text()
    assert "HAM10000-style folder" in data["data"] and "160 images" in data["data"]
    assert f"**Data**: {data['data']}" in (out / "report.md").read_text()


@pytest.mark.timeout(600)
def test_clinics_ran_the_deployment_clientapp_on_chip_without_rerunning_the_backbone(two_runs) -> None:
    from qana.bundle import load_bundle
    from simulations.workspace import ClinicSite, feature_cache_file

    result, out, _ = two_runs[0]
    fed = result.federated
    # every clinic evaluation came from its Akida model and equals the driver's score of the same head
    assert fed.consistency["ok"], fed.consistency
    assert fed.consistency["checked"] == 4 * 3  # every clinic evaluates every round (dropout loses updates only)
    bundle = load_bundle(TINY_V2)
    for p in result.partition:
        cache = out / "work" / "cache" / p["clinic"]
        site = ClinicSite(p["clinic"], out / "work" / "clinics" / p["clinic"], cache)
        # the clinic installed the bundle from the coordinator, and kept the global head deployed
        assert (cache / "bundles" / bundle.bundle_id / "model.fbz").is_file()
        assert json.loads((cache / "deployed" / bundle.bundle_id / "deployed.json").read_text())["server_round"] == 2
        # features were written before the federation started and never recomputed (that replaces the file)
        started = json.loads((out / "run" / "timings.json").read_text())["started"]
        assert feature_cache_file(site, bundle).stat().st_mtime < started


@pytest.mark.timeout(600)
def test_same_seed_same_result(two_runs) -> None:
    from simulations.engine import dropped_out

    (a, out_a, _), (b, out_b, _) = two_runs
    assert [r.head_version for r in a.federated.rounds] == [r.head_version for r in b.federated.rounds]
    for ra, rb in zip(a.federated.rounds, b.federated.rounds):
        assert ra.scores.to_dict() == rb.scores.to_dict()
        assert ra.reported_by_clinic == rb.reported_by_clinic
        assert ra.failed == rb.failed
        # Flower's simulation gives nodes random 64-bit ids, which travel (varint-coded) in every
        # message's metadata: sizes may differ by a few bytes per message, nothing else may.
        assert abs(ra.bytes_sent - rb.bytes_sent) <= 16 * len(ra.bytes_by_clinic) * 3
        assert abs(ra.bytes_received - rb.bytes_received) <= 16 * len(ra.bytes_by_clinic) * 3
    heads_a, heads_b = a.federated.heads, b.federated.heads
    for r in heads_a:
        assert np.array_equal(heads_a[r].weights, heads_b[r].weights) and np.array_equal(heads_a[r].bias, heads_b[r].bias)
    assert [s.to_dict() for s in a.pooled] == [s.to_dict() for s in b.pooled]
    assert [s.to_dict() for s in a.local_only] == [s.to_dict() for s in b.local_only]
    # dropout: exactly the clinics the seeded draw says, reported as failed by the coordinator
    names = [p["clinic"] for p in a.partition]
    for r in a.federated.rounds[1:]:
        expected = {names[i] for i in range(len(names)) if dropped_out(3, r.round, i, 0.3)}
        assert set(r.failed) == expected
        assert all("dropped out" in reason for reason in r.failed.values())
        assert set(r.participants) == set(names) - expected
    assert [sorted(r.failed) for r in a.federated.rounds[1:]] == [[], [names[0]]]  # seed 3: one clinic drops in round 2
    strip = lambda p: [l for l in p.read_text().splitlines()]  # noqa: E731
    assert strip(out_a / "rounds.csv") != [] and [l.split(",")[:6] for l in strip(out_a / "rounds.csv")] == [
        l.split(",")[:6] for l in strip(out_b / "rounds.csv")
    ]


def _marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries this test's marker (the CLI, the simulation, Ray's)."""
    found = []
    needle = f"QANA_SIM_TEST_MARKER={marker}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(600)
def test_ctrl_c_leaves_a_readable_partial_result_and_no_ray_processes(ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(REPO), QANA_SIM_TEST_MARKER=marker, QANA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "run", "--data", str(ham), "--bundle", str(TINY_V2), "--rounds", "50",
         "--local-epochs", "2", "--out", str(out), "--quiet"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # As a terminal's Ctrl-C finds it: a test runner started in the background (`cmd &` in a
        # script) hands SIGINT down as ignored, and Python then keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        status = out / "run" / "server" / "status.json"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                history = json.loads(status.read_text()).get("history", [])
            except (OSError, json.JSONDecodeError):
                history = []
            if any(h.get("round", 0) >= 2 for h in history):
                break
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the simulation did not reach round 2")
        running = _marked_processes(marker)
        assert len(running) >= 4, running  # qana-sim, the simulation process, Ray's own processes and workers
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert "partial results written" in output
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "interrupted"
    rounds = [r["round"] for r in data["federated"]["rounds"]]
    assert rounds[:3] == [0, 1, 2] and max(rounds) < 50
    compared = data["headline"]["round"]
    assert compared == max(r["round"] for r in data["federated"]["rounds"] if r["scores"])
    assert set(data["headline"]["metrics"]) == {"federated", "pooled", "local_only"}
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("**INTERRUPTED**") and f"compared at round {compared}" in report
    for _ in range(30):  # Ray's processes leave with the simulation process
        left = _marked_processes(marker)
        if not left:
            break
        time.sleep(1)
    assert not left, f"processes left behind: {left}"


# --------------------------------------------------------------------------- new-class scenario


@pytest.mark.timeout(600)
def test_new_class_scenario_grows_the_head_at_its_round_and_reports_old_and_new_classes(ham: Path, tmp_path: Path) -> None:
    """`--scenario new-class`: the federation starts without df; one clinic brings it at round 2."""
    from simulations.experiment import run_experiment

    out = tmp_path / "out"
    cfg = _config(ham, out, rounds=3, scenario="new-class", new_class="df", new_class_round=2, keep_work=False)
    result = run_experiment(cfg, cache_root=tmp_path / "cache", echo=lambda _m: None, progress=False)
    assert result.status == "finished", (result.message, result.federated and result.federated.error)
    sc = result.scenario
    assert sc is not None and sc["class"] == "df" and sc["round"] == 2
    has = {int(r): s["has_class"] for r, s in sc["rounds"].items()}
    assert has == {0: False, 1: False, 2: True, 3: True}
    assert sc["appeared_in_round"] == 2 and "old_macro_f1_change" in sc
    heads = result.federated.heads
    assert "df" not in heads[1].classes and heads[3].classes[-1] == "df"
    # the clinics' own on-chip evaluations agree with the driver's scores, before and after the class arrived
    assert result.federated.consistency["ok"], result.federated.consistency
    # only the introducing clinic trains on df; the others hold their df images for testing only
    table = {p["clinic"]: p for p in json.loads((out / "results.json").read_text())["partition"]["clinics"]}
    assert sc["clinic"] in table
    report = (out / "report.md").read_text()
    assert "## New-class scenario: `df`" in report and "Old classes: macro-F1" in report
    # the audit log recorded the class addition
    from server.audit import AuditLog

    log = AuditLog.open(f"sqlite:///{out / 'run' / 'audit.db'}", create=False, sign=False)
    try:
        additions = [e for e in log.entries() if e.kind == "class_addition"]
        assert [(e.body["class_name"], e.body["clinic_id"], e.body["round"]) for e in additions] == [("df", sc["clinic"], 2)]
    finally:
        log.close()
