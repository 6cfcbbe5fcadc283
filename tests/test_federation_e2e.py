"""A real federation on loopback: `qana-server start` (SuperLink, TLS, node auth) + three `qana-client start`.

Everything runs as separate processes through Flower's deployment engine, exactly as on two
machines: certificates from `qana-server certs`, clinic keys registered with
`qana-server nodes register`, a SuperLink with a persistent database, three SuperNodes with
the real Akida ClientApp on small synthetic clinics. One clinic is SIGKILLed (its whole
process group) after it has received its round-2 training message.

Asserts: the run completes; the federated accuracy of the global head improves; the audit
log holds every version (and verifies); round 2 is aggregated from the two survivors; only
the declared head arrays crossed the wire from the clinics; the backbone was sent once per
clinic and its features computed once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import make_synthetic_ham
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
TINY_V2 = Path(os.environ.get("QANA_TEST_BUNDLE_V2", REPO / "tests" / "fixtures" / "bundles" / "tiny-v2"))
CLINICS = ("clinic-a", "clinic-b", "clinic-c")
ROUND_TIMEOUT_SECONDS = 30
# Liveness guards, not speed targets: each phase gets its own budget, so a slow start under CI
# load (the coordinator and three clinics, each several processes importing Flower and Akida, on
# 2 cores beside another test worker) cannot eat the time the server needs after the kill.
# Alone on an idle machine the kill comes about 75 s after the start, and the server finishes
# about 40 s after it.
REACH_ROUND_2_SECONDS = 200
# After the kill the server waits out the round timeout for clinic-c's reply, aggregates the
# survivors' heads and runs one evaluation round on cached features.
FINISH_AFTER_KILL_SECONDS = ROUND_TIMEOUT_SECONDS + 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True
        )
    finally:
        handle.close()


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg(0); look for a live member
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(REACH_ROUND_2_SECONDS + FINISH_AFTER_KILL_SECONDS + 60)
def test_real_federation_over_tls_survives_a_killed_clinic(tmp_path: Path) -> None:
    from server.cli import app as server_cli

    assert (TINY_V2 / "bundle.json").is_file(), f"tiny test bundle missing: {TINY_V2}"
    state = tmp_path / "server"
    runner = CliRunner()
    result = runner.invoke(server_cli, ["certs", "--out", str(state / "certs"), *sum((["--clinic", c] for c in CLINICS), [])])
    assert result.exit_code == 0, result.output
    for clinic in CLINICS:
        result = runner.invoke(
            server_cli,
            ["nodes", "register", str(state / "certs" / "clinics" / clinic / "node.key.pub"), "--clinic", clinic, "--state-dir", str(state)],
        )
        assert result.exit_code == 0, result.output
    size = json.loads((TINY_V2 / "bundle.json").read_text())["input_shape"][0]
    for i, clinic in enumerate(CLINICS):
        make_synthetic_ham(tmp_path / "data" / clinic, n_images=60, image_size=size, seed=31 + i)

    port = free_port()
    audit_db = f"sqlite:///{tmp_path / 'audit.db'}"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = spawn(
            [
                "-m", "server.cli", "start", "--state-dir", str(state), "--bundle", str(TINY_V2), "--port", str(port),
                "--rounds", "2", "--min-clinics", "3", "--round-timeout", str(ROUND_TIMEOUT_SECONDS), "--wait-for-clinics", "120",
                "--local-epochs", "30", "--learning-rate", "0.05",
                "--audit-db", audit_db, "--audit-key", str(tmp_path / "audit_key.pem"), "--wire-log",
            ],
            tmp_path / "server.log",
        )
        for i, clinic in enumerate(CLINICS):
            procs[clinic] = spawn(
                [
                    "-m", "client.cli", "start", "--server", f"127.0.0.1:{port}", "--data", str(tmp_path / "data" / clinic),
                    "--clinic-id", clinic, "--root-certificates", str(state / "certs" / "ca.pem"),
                    "--auth-key", str(state / "certs" / "clinics" / clinic / "node.key"), "--device", "software",
                    "--cache-dir", str(tmp_path / "cache" / clinic), "--runtime-port", str(free_port()),
                ],
                tmp_path / f"{clinic}.log",
            )
        # Kill clinic-c (SuperNode, SuperExec and ClientApp) once its round-2 training message has arrived.
        victim = procs["clinic-c"]
        victim_log = tmp_path / "clinic-c.log"
        deadline = time.monotonic() + REACH_ROUND_2_SECONDS
        killed_at = None
        while time.monotonic() < deadline and procs["server"].poll() is None:
            if victim_log.read_text(errors="replace").count("Receiving: train message") >= 2:
                kill_group(victim)
                killed_at = time.monotonic()
                break
            time.sleep(0.2)
        assert killed_at is not None, "clinic-c never received its round-2 training message:\n" + (tmp_path / "server.log").read_text()
        victim.wait(10)
        assert procs["server"].wait(timeout=FINISH_AFTER_KILL_SECONDS) == 0, (tmp_path / "server.log").read_text()
        assert not group_alive(victim.pid)
    finally:
        for proc in procs.values():
            kill_group(proc, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.wait(5)

    output = (tmp_path / "server.log").read_text()
    assert "finished:completed" in output, output

    # --- the audit log holds each version, and verifies
    from server.audit import AuditLog, EntryFilter

    with AuditLog.open(audit_db, tmp_path / "audit_key.pem", create=False) as audit:
        heads = [e.version for e in audit.entries(EntryFilter(kinds=("head",)))]
        assert heads == ["h1", "h2", "h3"]
        h1, h2, h3 = (audit.version(v) for v in heads)
        assert h3.parent == "h2" and h2.parent == "h1" and h1.backbone == h3.backbone == "b1"
        assert sorted(p.clinic_id for p in h2.participants) == list(CLINICS)
        # round 2 went on without the killed clinic
        assert sorted(p.clinic_id for p in h3.participants) == ["clinic-a", "clinic-b"]
        assert "no reply" in h3.aggregate_metrics["failed"]["clinic-c"]
        assert audit.current_version() == "h3"
        assert sorted(d.clinic_id for d in audit.deployments("b1")) == list(CLINICS)
        assert audit.verify().ok
        # global head accuracy improves, measured on the same held-out images (the survivors')
        def top1(info) -> float:
            by_clinic = info.metrics["evaluate_by_clinic"]
            n = sum(by_clinic[c]["num-examples"] for c in ("clinic-a", "clinic-b"))
            return sum(by_clinic[c]["top1"] * by_clinic[c]["num-examples"] for c in ("clinic-a", "clinic-b")) / n

        assert top1(h3) > top1(h1) + 0.15, (top1(h1), top1(h3))
        assert all(m["device-agreement"] == 1.0 for m in h3.metrics["evaluate_by_clinic"].values())

    # --- only head arrays crossed the wire from the clinics (the coordinator's log of real replies)
    wire = [json.loads(line) for line in (state / "wire.jsonl").read_text().splitlines()]
    replies = [e for e in wire if e["direction"] == "in" and "content" in e]
    assert {e["message_type"] for e in replies} == {"query.hello", "query.deploy", "train", "evaluate"}
    bundle = json.loads((TINY_V2 / "bundle.json").read_text())
    d, c = int(bundle["feature_dim"]), len(bundle["classes"])
    allowed_records = {
        "query.hello": {"clinic"}, "query.deploy": {"clinic"}, "train": {"head", "metrics", "clinic"}, "evaluate": {"metrics", "clinic"},
    }
    for e in replies:
        content = e["content"]
        assert set(content) == allowed_records[e["message_type"]], e
        arrays = {name: rec for name, rec in content.items() if rec["kind"] == "arrays"}
        if e["message_type"] == "train":
            shapes = {k: (v["dtype"], v["shape"]) for k, v in arrays["head"]["items"].items()}
            assert shapes == {"weights-q": ("int8", [d, c]), "bias-q": ("int32", [c]), "scale": ("float32", [1])}
            assert set(content["metrics"]["items"]) == {"num-examples", "train-top1", "num-synthetic", "device-agreement"}
        else:
            assert arrays == {}
        for rec in content.values():
            if rec["kind"] == "config":
                assert not any(str(t).startswith("bytes") for t in rec["items"].values()), e
    trains = [e for e in replies if e["message_type"] == "train"]
    assert len(trains) == 5  # 3 in round 1, 2 in round 2
    # the backbone went to each clinic exactly once, and features were computed once per clinic
    deploys = [e for e in wire if e["direction"] == "out" and e["message_type"] == "query.deploy"]
    assert sorted(e["node_id"] for e in deploys) == sorted({e["node_id"] for e in deploys}) and len(deploys) == 3
    for clinic in CLINICS:
        assert len(list((tmp_path / "cache" / clinic / "features").glob("*.npz"))) == 1
        assert (tmp_path / "cache" / clinic / "deployed").is_dir()
