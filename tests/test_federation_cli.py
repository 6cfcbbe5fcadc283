"""qana-server certs/nodes/start/status and qana-client keygen/start: files made, one-line errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from synthetic import as_dataverse_tab, make_synthetic_ham
from typer.testing import CliRunner

from client.cli import app as client_cli
from client.cli import node_config_string
from server.cli import app as server_cli

TINY_V2 = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
runner = CliRunner()


def run(app, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_certs_make_a_ca_a_server_cert_for_the_hosts_and_clinic_keys(tmp_path) -> None:
    out = tmp_path / "certs"
    result = run(server_cli, "certs", "--out", out, "--host", "coord.example.org", "--host", "10.0.0.5", "--clinic", "c1")
    assert result.exit_code == 0, result.output
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    names = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    assert {"coord.example.org", "10.0.0.5", "localhost", "127.0.0.1"} <= names
    for private in (out / "ca.key", out / "server.key", out / "clinics" / "c1" / "node.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = run(server_cli, "certs", "--out", out)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", ""], "--host '' is not a DNS name or IP address"),
        (["--host", "bad host/with slash"], "--host 'bad host/with slash' is not a DNS name"),
        (["--host", "coord.example.org:9092"], "give the name or IP only"),
        (["--host", "a" * 64 + ".example.org"], "labels of at most 63 characters"),
        (["--days", "5000000"], "--days 5000000: a certificate is valid for 1 to 36500 days"),
    ],
)
def test_certs_refuse_hosts_and_lifetimes_no_clinic_could_use(tmp_path, args, message) -> None:
    result = run(server_cli, "certs", "--out", tmp_path / "certs", *args)
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
    assert not (tmp_path / "certs").exists() or not any((tmp_path / "certs").iterdir())


def test_certs_for_a_long_host_name_put_it_in_the_san(tmp_path) -> None:
    """DNS names may be 253 characters long; only the certificate's common name is limited to 64."""
    host = "federation-coordinator-for-dermatology-clinics.hospital-network.example.org"
    result = run(server_cli, "certs", "--out", tmp_path / "certs", "--host", host)
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert host in san.get_values_for_type(x509.DNSName)


def test_certs_check_the_clinic_keys_before_writing_anything(tmp_path) -> None:
    out = tmp_path / "certs"
    assert run(client_cli, "keygen", "--out", out / "clinics" / "clinic-a" / "node.key").exit_code == 0
    result = run(server_cli, "certs", "--out", out, "--clinic", "clinic-a")
    assert result.exit_code == 2 and "node.key already exists" in result.output, result.output
    assert not (out / "ca.pem").exists() and not (out / "ca.key").exists() and not (out / "server.pem").exists()


def test_node_registry_without_a_running_superlink(tmp_path) -> None:
    state = tmp_path / "state"
    assert run(client_cli, "keygen", "--out", tmp_path / "a" / "node.key").exit_code == 0
    assert run(client_cli, "keygen", "--out", tmp_path / "b" / "node.key").exit_code == 0
    ok = run(server_cli, "nodes", "register", tmp_path / "a" / "node.key.pub", "--clinic", "clinic-a", "--state-dir", state)
    assert ok.exit_code == 0 and "applied when the SuperLink starts" in ok.output, ok.output
    dup = run(server_cli, "nodes", "register", tmp_path / "a" / "node.key.pub", "--clinic", "clinic-b", "--state-dir", state)
    assert dup.exit_code == 2 and "already registered for clinic 'clinic-a'" in dup.output
    other = run(server_cli, "nodes", "register", tmp_path / "b" / "node.key.pub", "--clinic", "clinic-a", "--state-dir", state)
    assert other.exit_code == 2 and "registered with another key" in other.output
    bad = run(server_cli, "nodes", "register", tmp_path / "a" / "node.key", "--clinic", "clinic-c", "--state-dir", state)
    assert bad.exit_code == 2 and "not an OpenSSH public key" in bad.output
    listed = json.loads(run(server_cli, "nodes", "list", "--json", "--state-dir", state).output)
    assert [r["clinic"] for r in listed] == ["clinic-a"]
    assert run(server_cli, "nodes", "revoke", "clinic-a", "--state-dir", state).exit_code == 0
    assert json.loads(run(server_cli, "nodes", "list", "--json", "--state-dir", state).output)[0]["status"] == "revoked"
    assert run(server_cli, "nodes", "revoke", "clinic-a", "--state-dir", state).exit_code == 2


@pytest.mark.parametrize("damage", ["{not json", "[1]", '{"clinics": [1]}', '{"clinics": {"clinic-a": 3}}'])
def test_a_damaged_node_registry_is_one_error_line_in_every_command(tmp_path, damage) -> None:
    state = tmp_path / "state"
    assert run(client_cli, "keygen", "--out", tmp_path / "a" / "node.key").exit_code == 0
    state.mkdir()
    (state / "nodes.json").write_text(damage)
    (state / "server.json").write_text(json.dumps({"host": "127.0.0.1", "port": 9092, "run_id": "1", "stopped_at": "x"}))
    commands = [
        ("nodes", "list"),
        ("nodes", "register", tmp_path / "a" / "node.key.pub", "--clinic", "clinic-a"),
        ("nodes", "revoke", "clinic-a"),
        ("status", "--audit-db", f"sqlite:///{tmp_path / 'audit.db'}"),
    ]
    from server.audit import AuditLog

    AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "audit_key.pem").close()
    for command in commands:
        result = run(server_cli, *command, "--state-dir", state)
        assert result.exit_code == 2, (command, result.output)
        assert result.output.startswith("error: ") and "nodes.json" in result.output, (command, result.output)
        assert "Traceback" not in result.output
    assert (state / "nodes.json").read_text() == damage  # nothing stored is overwritten


def test_a_key_revoked_while_the_superlink_was_down_is_unregistered_after_a_new_key_replaces_it(tmp_path, monkeypatch) -> None:
    import server.deployment as deployment
    from server.federation_cli import _apply_registry, _state

    state = tmp_path / "state"
    for who in ("a", "b"):
        assert run(client_cli, "keygen", "--out", tmp_path / who / "node.key").exit_code == 0
    assert run(server_cli, "nodes", "register", tmp_path / "a" / "node.key.pub", "--clinic", "clinic-a", "--state-dir", state).exit_code == 0
    nodes = json.loads((state / "nodes.json").read_text())
    nodes["clinics"]["clinic-a"]["node_id"] = "123"  # as an earlier start registered it
    (state / "nodes.json").write_text(json.dumps(nodes))
    assert run(server_cli, "nodes", "revoke", "clinic-a", "--state-dir", state).exit_code == 0  # SuperLink down
    new = run(server_cli, "nodes", "register", tmp_path / "b" / "node.key.pub", "--clinic", "clinic-a", "--state-dir", state)
    assert new.exit_code == 0, new.output
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(deployment, "flwr", lambda _state, *args, **_kw: calls.append(args) or {})
    monkeypatch.setattr(deployment, "register_with_superlink", lambda _state, clinic, _key: calls.append(("register", clinic)) or "456")
    _apply_registry(_state(state))  # what the next `start` does
    assert ("supernode", "unregister", "123", deployment.CONNECTION) in calls and ("register", "clinic-a") in calls
    calls.clear()
    _apply_registry(_state(state))
    assert not any("unregister" in c for c in calls)  # done once, not at every start


def test_registering_the_same_key_again_keeps_its_superlink_node(tmp_path, monkeypatch) -> None:
    """A re-run of `nodes register` while the SuperLink is down must not forget the node id a start
    stored: Flower answers "already in use" for that key, so the id could never be learnt again and
    a later revoke would leave the key registered at the SuperLink."""
    import server.deployment as deployment
    import server.federation_cli as federation_cli

    state = tmp_path / "state"
    assert run(client_cli, "keygen", "--out", tmp_path / "a" / "node.key").exit_code == 0
    key = tmp_path / "a" / "node.key.pub"
    assert run(server_cli, "nodes", "register", key, "--clinic", "clinic-a", "--state-dir", state).exit_code == 0
    nodes = json.loads((state / "nodes.json").read_text())
    nodes["clinics"]["clinic-a"]["node_id"] = "123"  # as an earlier start registered it
    (state / "nodes.json").write_text(json.dumps(nodes))
    again = run(server_cli, "nodes", "register", key, "--clinic", "clinic-a", "--state-dir", state)
    assert again.exit_code == 0 and "SuperLink node 123" in again.output, again.output
    assert json.loads((state / "nodes.json").read_text())["clinics"]["clinic-a"]["node_id"] == "123"

    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(deployment, "flwr", lambda _state, *args, **_kw: calls.append(args) or {})
    monkeypatch.setattr(federation_cli, "_superlink_running", lambda _state: True)
    assert run(server_cli, "nodes", "revoke", "clinic-a", "--state-dir", state).exit_code == 0
    assert ("supernode", "unregister", "123", deployment.CONNECTION) in calls


def test_registering_again_on_a_full_disk_keeps_the_stored_key(tmp_path, monkeypatch) -> None:
    """The re-run copied the key over the stored one in place: a full disk left half a key that no
    longer loads while nodes.json still listed the clinic."""
    import qana.atomic

    state = tmp_path / "state"
    assert run(client_cli, "keygen", "--out", tmp_path / "a" / "node.key").exit_code == 0
    key = tmp_path / "a" / "node.key.pub"
    assert run(server_cli, "nodes", "register", key, "--clinic", "clinic-a", "--state-dir", state).exit_code == 0
    stored = state / "nodes" / "clinic-a.pub"
    before = stored.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_sendfile = os.sendfile

    def sendfile_until_full(out_fd, in_fd, offset, count):  # how shutil.copyfile copies on Linux
        real_sendfile(out_fd, in_fd, offset, min(count, 20))
        disk_full()

    monkeypatch.setattr(qana.atomic.os, "fsync", disk_full)  # a full disk, whichever way the key is written
    monkeypatch.setattr(os, "sendfile", sendfile_until_full)
    again = run(server_cli, "nodes", "register", key, "--clinic", "clinic-a", "--state-dir", state)
    assert again.exit_code != 0
    assert stored.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--strategy", "fedavg", "--strategy-option", "eta=0.1"], "fedavg does not take option(s) eta"),
        (["--strategy", "fedavg", "--strategy-options", "eta=0.1,tau=0.01"], "fedavg does not take option(s) eta, tau"),  # qana-sim's spelling
        (["--strategy", "krum", "--strategy-option", "num_malicious_nodes=-3"], "krum option num_malicious_nodes=-3: must be a whole number >= 0"),
        (["--run-config", "num-round=3"], "unknown run-config key"),
        (["--run-config", 'num-rounds=10', "--run-config", 'strategy="krum"'], "--run-config num-rounds, strategy: use --rounds, --strategy instead"),
        (["--run-config", 'smote="false"'], "run-config smote='false' must be true or false"),
        (["--run-config", "wire-log=1"], "run-config wire-log=1 must be true or false"),
        (["--run-config", 'audit-db="postgresql://u:secret@h/db"'], "--run-config audit-db: use the --audit-db option"),
        (["--bundle", "/nonexistent"], "bundle folder not found"),
        ([], "ca.pem not found"),  # TLS by default: certificates are required
    ],
)
def test_start_refuses_bad_settings_before_starting_anything(tmp_path, args, message) -> None:
    state = tmp_path / "state"
    base = ["start", "--state-dir", state, "--bundle", TINY_V2, "--audit-db", f"sqlite:///{tmp_path / 'a.db'}", "--audit-key", tmp_path / "k.pem"]
    result = run(server_cli, *base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert not (state / "superlink.db").exists()


def test_start_pins_relative_audit_paths_from_the_environment(tmp_path, monkeypatch) -> None:
    """The ServerApp runs in the state directory: a relative $QANA_AUDIT_DB / $QANA_AUDIT_KEY must
    reach it as the absolute paths `start` checked, or it writes another log with another key."""
    import server.deployment as deployment

    seen: dict[str, str] = {}

    def fake_superlink(_state, _host, _port, _tls, _node_auth, env):
        seen.update(env)
        raise deployment.DeploymentError("stopped by the test")

    monkeypatch.setattr(deployment, "start_superlink", fake_superlink)
    monkeypatch.setattr(deployment, "check_port_free", lambda _host, _port: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QANA_AUDIT_DB", "sqlite:///ops/audit.db")
    monkeypatch.setenv("QANA_AUDIT_KEY", "ops/audit_key.pem")
    result = run(server_cli, "start", "--insecure", "--state-dir", tmp_path / "state", "--bundle", TINY_V2)
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert (tmp_path / "ops" / "audit.db").is_file() and (tmp_path / "ops" / "audit_key.pem").is_file()
    assert seen["QANA_AUDIT_DB"] == f"sqlite:///{tmp_path / 'ops' / 'audit.db'}"
    assert seen["QANA_AUDIT_KEY"] == str(tmp_path / "ops" / "audit_key.pem")


def test_start_refuses_tls_files_that_do_not_belong_together(tmp_path) -> None:
    """A server key that is not the certificate's, or a certificate another CA issued, would only
    show as every clinic's failed handshake while the coordinator waits: refused before starting."""
    state = tmp_path / "state"
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert run(server_cli, "certs", "--out", out).exit_code == 0
    base = ["start", "--state-dir", state, "--bundle", TINY_V2, "--audit-db", f"sqlite:///{tmp_path / 'a.db'}", "--audit-key", tmp_path / "k.pem"]
    mixed = tmp_path / "mixed"
    for case, (ca, cert, key), message in [
        ("other key", (first, first, second), "is not the private key of"),
        ("other CA", (second, first, first), "was not issued by"),
        ("garbage key", (first, first, None), "is not an unencrypted PEM private key"),
    ]:
        mixed.mkdir(exist_ok=True)
        (mixed / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
        (mixed / "server.pem").write_bytes((cert / "server.pem").read_bytes())
        (mixed / "server.key").write_bytes((key / "server.key").read_bytes() if key else b"not a key")
        result = run(server_cli, *base, "--certs", mixed)
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, (case, result.output)
    assert not (state / "superlink.db").exists()


def test_start_on_a_port_in_use_leaves_the_state_directory_as_it_was(tmp_path) -> None:
    """A second `start` must not rewrite the files a coordinator already running from this state uses."""
    import socket

    state = tmp_path / "state"
    kept = {state / "status.json": b'{"phase": "round 2 done"}', state / "flwr-home" / "config.toml": b"[superlink]\n",
            state / "flower-app" / "pyproject.toml": b"[project]\n"}
    for path, data in kept.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(server_cli, "start", "--insecure", "--port", port, "--state-dir", state, "--bundle", TINY_V2,
                     "--audit-db", f"sqlite:///{tmp_path / 'a.db'}", "--audit-key", tmp_path / "k.pem")
    assert result.exit_code == 2 and result.output.startswith("error: ") and "already in use" in result.output, result.output
    assert {path: path.read_bytes() for path in kept} == kept


def test_start_refuses_an_audit_key_that_did_not_sign_the_log(tmp_path) -> None:
    """Found at start, before any clinic connects, not at the run's first audit write."""
    from server.audit import AuditLog

    db = f"sqlite:///{tmp_path / 'a.db'}"
    with AuditLog.open(db, tmp_path / "right.pem") as log:
        log.record_backbone(b"bundle")
    base = ["start", "--insecure", "--state-dir", tmp_path / "state", "--bundle", TINY_V2, "--audit-db", db]
    typo = run(server_cli, *base, "--audit-key", tmp_path / "rigth.pem")
    assert typo.exit_code == 2 and typo.output.startswith("error: signing key not found"), typo.output
    assert not (tmp_path / "rigth.pem").exists()
    from server.audit.signing import load_or_create_signer

    load_or_create_signer(tmp_path / "other.pem")
    other = run(server_cli, *base, "--audit-key", tmp_path / "other.pem")
    assert other.exit_code == 2 and "this log is signed by key" in other.output, other.output
    assert not (tmp_path / "state" / "superlink.db").exists()


@pytest.mark.parametrize(("args", "option"), [(["start", "--port", "70000"], "--port"), (["certs", "--days", "0"], "--days")])
def test_out_of_range_numbers_are_refused_by_name(tmp_path, args, option) -> None:
    result = run(server_cli, *args, "--state-dir" if args[0] == "start" else "--out", tmp_path / "x")
    assert result.exit_code == 2 and option in result.output and "range" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_status_of_a_run_with_its_own_audit_db_needs_no_audit_db_option(tmp_path) -> None:
    """`start --audit-db URL` does not store the URL (it may hold a password): status still shows the run."""
    from server.audit import AuditLog

    state = tmp_path / "state"
    state.mkdir()
    (state / "server.json").write_text(json.dumps({"host": "127.0.0.1", "port": 1, "run_id": "7", "audit_db": "(set)", "stopped_at": "x"}))
    (state / "status.json").write_text(json.dumps({"phase": "finished", "round": 2, "num_rounds": 2, "history": []}))
    shown = run(server_cli, "status", "--state-dir", state)
    assert shown.exit_code == 0 and "run           7:" in shown.output and "pass it to see the current model version" in shown.output, shown.output
    db = f"sqlite:///{tmp_path / 'own.db'}"
    with AuditLog.open(db, tmp_path / "k.pem") as log:
        log.record_backbone(b"bundle")
    with_db = run(server_cli, "status", "--state-dir", state, "--audit-db", db)
    assert with_db.exit_code == 0 and "on backbone b1" in with_db.output, with_db.output


def test_the_generated_flower_app_is_valid_for_flwr(tmp_path) -> None:
    from flwr.cli.config_utils import load_and_validate

    from server.deployment import StateDir, write_flower_app

    app_dir = write_flower_app(StateDir(tmp_path), {"num-rounds": 4, "strategy": "fedprox", "strategy-options": "proximal_mu=0.1"})
    config, _warnings = load_and_validate(app_dir / "pyproject.toml", check_module=True)
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert app["config"]["num-rounds"] == 4 and app["config"]["audit-db"] == ""
    assert sorted(p.name for p in app_dir.iterdir()) == ["pyproject.toml"]  # no code travels to clinics


def test_status_without_a_coordinator_is_a_clear_error(tmp_path) -> None:
    result = run(server_cli, "status", "--state-dir", tmp_path / "nothing")
    assert result.exit_code == 2 and "no coordinator state" in result.output


def test_client_start_checks_before_connecting(tmp_path) -> None:
    data = tmp_path / "data"
    make_synthetic_ham(data, n_images=4, image_size=16, seed=1)
    missing = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", tmp_path / "nope", "--clinic-id", "c")
    assert missing.exit_code == 2 and "data folder not found" in missing.output
    (tmp_path / "bad.key").write_text("not a key")
    badkey = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--auth-key", tmp_path / "bad.key")
    assert badkey.exit_code == 2 and "not an unencrypted OpenSSH private key" in badkey.output
    badca = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--root-certificates", tmp_path / "ca.pem")
    assert badca.exit_code == 2 and "CA certificate not found" in badca.output
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    garbage_ca = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--root-certificates", tmp_path / "ca.pem")
    assert garbage_ca.exit_code == 2 and "is not a PEM certificate file" in garbage_ca.output, garbage_ca.output
    for address in ("", "coord.example.org", "coord.example.org:70000", ":9092", "http://127.0.0.1:1", "coord example.org:9092"):
        bad_address = run(client_cli, "start", "--server", address, "--data", data, "--clinic-id", "c")
        assert bad_address.exit_code == 2 and "is not HOST:PORT" in bad_address.output, (address, bad_address.output)
    bad_port = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--runtime-port", "70000")
    assert bad_port.exit_code == 2 and "70000" in bad_port.output
    typo = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--new-class", "melanoma")
    assert typo.exit_code == 2 and "--new-class melanoma: no image in" in typo.output, typo.output
    tab = as_dataverse_tab(make_synthetic_ham(tmp_path / "dataverse", n_images=4, image_size=16, seed=1))
    typo_tab = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", tmp_path / "dataverse", "--clinic-id", "c", "--new-class", "melanoma")
    assert typo_tab.exit_code == 2 and f"no image in {tab} has that diagnosis" in typo_tab.output.replace("\n", ""), typo_tab.output
    import socket

    with socket.socket() as busy:  # another clinic's SuperNode on this machine
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c", "--insecure",
                    "--cache-dir", tmp_path / "cache", "--runtime-port", port)
    assert taken.exit_code == 2 and f"--runtime-port {port} is in use" in taken.output, taken.output
    (tmp_path / "a-file").write_text("keep me")
    for command in ("start", "learn"):
        args = ["--server", "127.0.0.1:1"] if command == "start" else []
        blocked = run(client_cli, command, *args, "--data", data, "--clinic-id", "c", "--cache-dir", tmp_path / "a-file" / "cache")
        assert blocked.exit_code == 2 and "a-file is a file, not a folder" in blocked.output, blocked.output
    assert (tmp_path / "a-file").read_text() == "keep me"
    for image in (data / "images").glob("*.jpg"):
        image.unlink()
    no_images = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c")
    assert no_images.exit_code == 2 and "none of the 4 images listed" in no_images.output, no_images.output
    (data / "HAM10000_metadata.csv").write_text("lesion_id,image_id\n")
    badcsv = run(client_cli, "start", "--server", "127.0.0.1:1", "--data", data, "--clinic-id", "c")
    assert badcsv.exit_code == 2 and "missing column(s) dx" in badcsv.output


def test_keygen_never_leaves_a_half_replaced_pair(tmp_path) -> None:
    key = tmp_path / "node.key"
    assert run(client_cli, "keygen", "--out", key).exit_code == 0
    pair = (key.read_bytes(), (tmp_path / "node.key.pub").read_bytes())
    (tmp_path / "node.key.pub").unlink()
    (tmp_path / "node.key.pub").mkdir()  # the public half cannot be replaced: nothing may be
    blocked = run(client_cli, "keygen", "--out", key, "--overwrite")
    assert blocked.exit_code == 2 and "node.key.pub is a folder" in blocked.output, blocked.output
    assert key.read_bytes() == pair[0] and sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.key.pub"]
    for folder in ("/", tmp_path):
        refused = run(client_cli, "keygen", "--out", folder)
        assert refused.exit_code == 2 and "names a folder" in refused.output and "Traceback" not in refused.output
    slash = run(client_cli, "keygen", "--out", f"{tmp_path / 'k4'}/")  # meant as a folder: no key file named k4
    assert slash.exit_code == 2 and "names a folder" in slash.output and not (tmp_path / "k4").exists(), slash.output
    blocked_by_file = run(client_cli, "keygen", "--out", key / "node.key")  # node.key is a file
    assert blocked_by_file.exit_code == 2 and f"{key} is a file, not a folder" in blocked_by_file.output


def test_keygen_writes_a_lost_or_mismatched_public_key_again_from_the_private_one(tmp_path) -> None:
    """The .pub can always be made again; --overwrite would replace the registered identity."""
    key, public = tmp_path / "node.key", tmp_path / "node.key.pub"
    assert run(client_cli, "keygen", "--out", key).exit_code == 0
    private, original = key.read_bytes(), public.read_bytes()
    again = run(client_cli, "keygen", "--out", key)  # a matching pair is left alone
    assert again.exit_code == 2 and "already exists" in again.output
    public.unlink()
    lost = run(client_cli, "keygen", "--out", key)
    assert lost.exit_code == 0 and "written again from" in lost.output and "(it was missing)" in lost.output, lost.output
    assert public.read_bytes() == original and key.read_bytes() == private
    assert run(client_cli, "keygen", "--out", tmp_path / "other.key").exit_code == 0
    public.write_bytes((tmp_path / "other.key.pub").read_bytes())  # as a stopped --overwrite can leave it
    mismatched = run(client_cli, "keygen", "--out", key)
    assert mismatched.exit_code == 0 and "(it was another key's)" in mismatched.output, mismatched.output
    assert public.read_bytes() == original and key.read_bytes() == private


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_superlink_dies_with_a_killed_coordinator(tmp_path) -> None:
    """`qana-server start` starts the SuperLink in its own session with `die_with_parent`: killed
    with SIGKILL (no finally runs), the coordinator must not leave it holding the port."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time, pathlib\n"
        "from server.deployment import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True, preexec_fn=die_with_parent)\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
        "time.sleep(60)\n"
    )], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 30
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{child}/stat").exists() else "Z"
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its SIGKILLed parent")


def test_node_config_string_round_trips_through_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    config = {"data-dir": "/data/with space/ünï", "cache-dir": 'C:\\cache\\"q"', "clinic-id": "c-1", "eval-fraction": 0.25}
    assert parse_config_args([node_config_string(config)]) == config
