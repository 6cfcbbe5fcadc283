"""`qana-sim run --learning akida-edge`: the deployment's ServerApp and ClientApp with Akida on-chip learning.

Tiny synthetic HAM10000-style data and the tiny v1 bundle with its last firing thresholds
lowered so that its random backbone spikes (the fixture as shipped is silent; see
tests/test_edge.py). Checks that a two-round edge federation finishes under a timeout, that
every round's audit-logged edge head is scored by the driver exactly as the clinics' Akida
evaluations reported it, that pooled and local-only edge baselines are in the results, and
that dropout applies to `train.edge` messages too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
TINY_V1 = REPO / "tests" / "fixtures" / "bundles" / "tiny-v1"
TINY_V2 = REPO / "tests" / "fixtures" / "bundles" / "tiny-v2"

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def live_v1(tmp_path_factory) -> Path:
    """tiny-v1 whose last three layers fire (threshold 0), written as a verified bundle."""
    from live_bundles import spiking_tiny_v1

    return spiking_tiny_v1(tmp_path_factory.mktemp("live"))


def test_learning_setting_is_checked(tmp_path: Path) -> None:
    from simulations.config import ConfigError, resolve

    assert resolve(None, {"learning": "akida-edge"}).learning == "akida-edge"
    with pytest.raises(ConfigError, match="learning='edge': use gradient or akida-edge"):
        resolve(None, {"learning": "edge"})
    with pytest.raises(ConfigError, match="initial-head='bundle' does not apply to learning akida-edge"):
        resolve(None, {"learning": "akida-edge", "initial_head": "bundle"})


def test_akida_edge_refuses_a_v2_bundle_and_a_silent_backbone_with_one_line(ham: Path, tmp_path: Path) -> None:
    from simulations.cli import app

    for bundle, message in ((TINY_V2, "error: --learning akida-edge needs a v1 bundle"),
                            (TINY_V1, "error: no clinic could choose edge-learning settings")):
        result = CliRunner().invoke(app, ["run", "--data", str(ham), "--bundle", str(bundle), "--learning", "akida-edge",
                                          "--out", str(tmp_path / "out"), "--quiet", "--rounds", "1"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith(message), result.output
        assert "Traceback" not in result.output


@pytest.mark.timeout(400)
def test_edge_simulation_runs_the_deployment_apps_and_scores_every_audited_edge_head(ham: Path, live_v1: Path, tmp_path: Path) -> None:
    from qana.edge import EdgeHead
    from simulations.cli import app
    from simulations.engine import dropped_out

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--data", str(ham), "--bundle", str(live_v1), "--learning", "akida-edge",
                                      "--rounds", "2", "--dropout", "0.3", "--seed", "3", "--out", str(out), "--quiet", "--keep-work"])
    assert result.exit_code == 0, result.output
    assert "Edge settings (clinics' choices combined)" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "finished" and data["config"]["learning"] == "akida-edge"
    assert set(data["headline"]["metrics"]) == {"federated", "pooled", "local_only"}
    fed = data["federated"]
    rounds = fed["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["head_version"] for r in rounds)
    # the clinics' Akida evaluations equal the driver's scores of the audit-logged edge heads
    assert fed["consistency"]["ok"], fed["consistency"]
    assert fed["consistency"]["checked"] == 4 * 3
    # dropout hits train.edge exactly as the seeded draw says (seed 3: one clinic in round 2)
    names = [p["clinic"] for p in data["partition"]["clinics"]]
    for r in rounds[1:]:
        assert set(r["failed"]) == {names[i] for i in range(4) if dropped_out(3, r["round"], i, 0.3)}
    assert [sorted(r["failed"]) for r in rounds[1:]] == [[], [names[0]]]
    # what crossed the wire in rounds 1-2 is edge neurons (bits), not the bundle
    assert 0 < rounds[1]["bytes_sent"] < rounds[0]["bytes_sent"]
    wire = [json.loads(l) for l in (out / "run" / "server" / "wire.jsonl").read_text().splitlines()]
    kinds = {e["message_type"] for e in wire}
    assert {"train.edge", "evaluate.edge"} <= kinds and "train" not in kinds
    up = [e for e in wire if e["message_type"] == "train.edge" and e["direction"] == "in" and "content" in e]
    assert up and all(set(e["content"]) == {"edge", "edge-head", "metrics", "clinic"} for e in up)
    assert all(e["content"]["edge"]["items"]["weights-packed"]["dtype"] == "uint8" for e in up)
    # every audited head is an edge head; the last was learned (round 0 is fresh neurons)
    from server.audit import AuditLog, EntryFilter

    log = AuditLog.open(f"sqlite:///{out / 'run' / 'audit.db'}", create=False, sign=False)
    try:
        entries = log.entries(EntryFilter(kinds=("head",)))
        heads = [EdgeHead.from_npz(log.get_artifact(e.body["sha256"])) for e in entries]
        assert len(heads) == 3 and not heads[0].learned.any() and heads[-1].learned.any()
        assert entries[-1].body["strategy"] == "akida-edge-kmedoids"
    finally:
        log.close()
    report = (out / "report.md").read_text()
    assert "learning `akida-edge`" in report and "(f.w - threshold) / act_step" in report
    for name in ("plots/curves.png", "rounds.csv", "clinics.csv"):
        assert (out / name).stat().st_size > 0, name
