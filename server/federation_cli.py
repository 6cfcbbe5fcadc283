"""``qana-server start | certs | nodes | status``: running a real federation from a terminal.

Mistakes (missing certificate, unknown strategy, port in use, bad key ...) print one
``error: ...`` line on stderr and exit with status 2, like the audit commands; nothing the
coordinator already stored (audit log, SuperLink database, registered keys) is touched by a
command that fails.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from qana.atomic import write_atomic
from qana.cli_errors import fail, reported_errors

DEFAULT_STATE = Path.home() / ".qana" / "server"

StateOption = Annotated[
    Path,
    typer.Option("--state-dir", metavar="DIR", help="Coordinator state: SuperLink database, certificates, registered keys, run status."),
]


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Expected failures become one stderr line and exit status 2, without a traceback."""
    from protocols.auth import AuthError
    from qana.bundle import BundleError
    from server.audit.errors import AuditError
    from server.certs import CertError
    from server.deployment import DeploymentError
    from server.federation import FederationError
    from server.strategies import StrategyError

    with reported_errors(AuditError, AuthError, BundleError, CertError, DeploymentError, FederationError, StrategyError):
        yield


# --------------------------------------------------------------------------- certs


def certs_command(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where to write ca.pem, server.pem/.key and clinic keys.")] = DEFAULT_STATE / "certs",
    host: Annotated[
        list[str] | None,
        typer.Option("--host", metavar="NAME_OR_IP", help="Name or IP clinics dial to reach the SuperLink (repeatable). localhost and 127.0.0.1 are always included."),
    ] = None,
    clinic: Annotated[
        list[str] | None,
        typer.Option("--clinic", metavar="CLINIC_ID", help="Also make a SuperNode key pair for this clinic (repeatable). Better: each clinic runs `qana-client keygen` and sends only its .pub file."),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity of the SuperLink certificate, in days.")] = 397,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = False,
) -> None:
    """Create a CA and the SuperLink's TLS certificate for a pilot (and optional clinic key pairs)."""
    from server.certs import create_pilot_certificates

    hosts = list(dict.fromkeys([*(host or []), "localhost", "127.0.0.1"]))
    with _reported_errors():
        paths = create_pilot_certificates(out, hosts, list(clinic or []), overwrite=overwrite, days=days)
    typer.echo(f"CA certificate   {paths.ca_cert}   (give this file to every clinic: --root-certificates)")
    typer.echo(f"CA private key   {paths.ca_key}   (keep offline)")
    typer.echo(f"SuperLink cert   {paths.server_cert}   for {', '.join(hosts)}")
    typer.echo(f"SuperLink key    {paths.server_key}")
    for name, (private, public) in paths.clinic_keys.items():
        typer.echo(f"clinic {name}: private key {private} (send securely to the clinic), public key {public}")


# --------------------------------------------------------------------------- nodes

nodes_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print clinic data or keys
    name="nodes",
    no_args_is_help=True,
    help="Clinic keys for SuperNode authentication: only registered clinics can connect.",
)


def _state(state_dir: Path):
    from server.deployment import StateDir

    return StateDir(state_dir.expanduser().resolve())


def _superlink_running(state) -> bool:
    from server.deployment import client_host, port_open

    info = state.read_json(state.server_file)
    return bool(info) and port_open(client_host(info.get("host", "127.0.0.1")), int(info.get("port", 0)))


@nodes_app.command("register")
def nodes_register(
    public_key: Annotated[Path, typer.Argument(metavar="PUBLIC_KEY", help="The clinic's .pub file (from `qana-client keygen`).")],
    clinic: Annotated[str, typer.Option("--clinic", metavar="CLINIC_ID", help="The clinic's id (its --clinic-id).")],
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Allow a clinic to connect. Registered with the SuperLink now if it runs, else at the next `start`."""
    from protocols.auth import check_clinic_name, key_fingerprint, load_public_key
    from server.deployment import read_nodes, register_with_superlink, write_nodes

    state = _state(state_dir)
    with _reported_errors():
        check_clinic_name(clinic)
        key = load_public_key(public_key)
        fingerprint = key_fingerprint(key)
        nodes = read_nodes(state)
        for name, entry in nodes.items():
            if entry.get("fingerprint") == fingerprint and name != clinic and not entry.get("revoked"):
                raise fail(f"this key is already registered for clinic {name!r}")
        if clinic in nodes and not nodes[clinic].get("revoked") and nodes[clinic].get("fingerprint") != fingerprint:
            raise fail(f"clinic {clinic!r} is registered with another key; revoke it first")
        stored = state.root / "nodes" / f"{clinic}.pub"
        write_atomic(stored, public_key.expanduser().read_bytes())  # a re-run must not leave half a key in place
        entry = {"public_key": str(stored.relative_to(state.root)), "fingerprint": fingerprint, "registered_at": _now(), "node_id": None, "revoked": False}
        previous = nodes.get(clinic, {})
        if not previous.get("revoked") and previous.get("fingerprint") == fingerprint:
            # The same key again (a re-run): the SuperLink already knows it under the stored node id
            # and answers "already in use" without one, so dropping the id would leave `revoke`
            # nothing to unregister.
            entry["node_id"] = previous.get("node_id")
            entry["registered_at"] = previous.get("registered_at", entry["registered_at"])
        if previous.get("revoked"):
            # The revoked key's node may still be registered with the SuperLink (revoked while it was
            # down): keep its id so the next start unregisters it, as `revoke` promised.
            stale = [*previous.get("stale_node_ids", []), *([previous["node_id"]] if previous.get("node_id") else [])]
            if stale:
                entry["stale_node_ids"] = stale
        if _superlink_running(state):
            node_id = register_with_superlink(state, clinic, stored)
            entry["node_id"] = node_id or nodes.get(clinic, {}).get("node_id")
        nodes[clinic] = entry
        write_nodes(state, nodes)
    where = f"SuperLink node {entry['node_id']}" if entry["node_id"] else "applied when the SuperLink starts"
    typer.echo(f"registered {clinic} ({fingerprint}); {where}")


@nodes_app.command("list")
def nodes_list(
    state_dir: StateOption = DEFAULT_STATE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Registered clinics, with their SuperLink node id and whether they are online now."""
    from server.deployment import read_nodes, superlink_nodes

    state = _state(state_dir)
    with _reported_errors():
        nodes = read_nodes(state)
        live = {n["node-id"]: n for n in superlink_nodes(state)} if _superlink_running(state) else {}
    rows = []
    for clinic, entry in sorted(nodes.items()):
        node = live.get(str(entry.get("node_id")), {})
        rows.append({
            "clinic": clinic,
            "node_id": entry.get("node_id"),
            "fingerprint": entry.get("fingerprint"),
            "status": "revoked" if entry.get("revoked") else node.get("status", "unknown (SuperLink not running)" if not live else "not connected"),
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no clinics registered (qana-server nodes register KEY.pub --clinic ID)")
    for r in rows:
        typer.echo(f"{r['clinic']:<20} node {r['node_id'] or '-'!s:<22} {r['status']:<14} {r['fingerprint']}")


@nodes_app.command("revoke")
def nodes_revoke(
    clinic: Annotated[str, typer.Argument(metavar="CLINIC_ID", help="The clinic id its key was registered under.")],
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Remove a clinic's key: it can no longer connect (unregistered at the SuperLink now, or at the next start)."""
    from server.deployment import CONNECTION, flwr, read_nodes, write_nodes

    state = _state(state_dir)
    with _reported_errors():
        nodes = read_nodes(state)
        if clinic not in nodes or nodes[clinic].get("revoked"):
            raise fail(f"clinic {clinic!r} is not registered")
        node_id = nodes[clinic].get("node_id")
        if _superlink_running(state) and node_id:
            flwr(state, "supernode", "unregister", str(node_id), CONNECTION)
        nodes[clinic]["revoked"] = True
        nodes[clinic]["revoked_at"] = _now()
        write_nodes(state, nodes)
    typer.echo(f"revoked {clinic}" + (f" (SuperLink node {node_id} unregistered)" if node_id and _superlink_running(state) else ""))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- start


def _apply_registry(state) -> None:
    """Register every non-revoked key with the (new or restarted) SuperLink; unregister revoked ones,
    including the revoked keys a clinic's new key replaced."""
    from server.deployment import (
        CONNECTION,
        DeploymentError,
        flwr,
        read_nodes,
        register_with_superlink,
        write_nodes,
    )

    nodes = read_nodes(state)
    for clinic, entry in nodes.items():
        for stale in entry.pop("stale_node_ids", []):  # nodes of keys revoked before this one was registered
            try:
                flwr(state, "supernode", "unregister", str(stale), CONNECTION)
            except DeploymentError:
                pass  # already gone
        if entry.get("revoked"):
            if entry.get("node_id"):
                try:
                    flwr(state, "supernode", "unregister", str(entry["node_id"]), CONNECTION)
                except DeploymentError:
                    pass  # already gone
            continue
        node_id = register_with_superlink(state, clinic, state.root / entry["public_key"])
        if node_id:
            entry["node_id"] = node_id
    write_nodes(state, nodes)


def start_command(
    state_dir: StateOption = DEFAULT_STATE,
    bundle: Annotated[Path | None, typer.Option("--bundle", metavar="DIR", help="Model bundle to federate (default: the package's v2 bundle; v1 with --learning akida-edge).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 3,
    strategy: Annotated[str, typer.Option("--strategy", help="fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg or krum (Flower's implementations).")] = "fedavg",
    strategy_option: Annotated[list[str] | None, typer.Option("--strategy-option", "--strategy-options", metavar="KEY=VALUE", help="Strategy constructor option, e.g. proximal_mu=0.1 (repeatable, or comma-separated).")] = None,
    min_clinics: Annotated[int, typer.Option("--min-clinics", min=1, help="Clinics needed before a round starts.")] = 2,
    round_timeout: Annotated[float, typer.Option("--round-timeout", help="Seconds to wait for clinics' replies in a round; late clinics are left out of it.")] = 600.0,
    wait_for_clinics: Annotated[float, typer.Option("--wait-for-clinics", help="Seconds to wait for --min-clinics clinics before giving up.")] = 3600.0,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1, help="Gradient: epochs each clinic trains the head per round.")] = 20,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Gradient: the clinics' head learning rate.")] = 0.01,
    learning: Annotated[str, typer.Option("--learning", help="gradient (train the head, Flower strategy) or akida-edge (Akida 1.0 on-chip learning, v1 bundle; edge-* keys via --run-config).")] = "gradient",
    run_config: Annotated[list[str] | None, typer.Option("--run-config", metavar="KEY=VALUE", help="Any other run-config key (see server.federation.RUN_CONFIG_DEFAULTS), TOML value syntax.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address the SuperLink listens on (0.0.0.0 for clinics on other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="SuperLink port (Fleet, Control and Runtime APIs share it).")] = 9092,
    certs: Annotated[Path | None, typer.Option("--certs", metavar="DIR", help="Directory with ca.pem, server.pem, server.key (default: STATE_DIR/certs).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS and no clinic authentication. Only for local experiments.")] = False,
    no_node_auth: Annotated[bool, typer.Option("--no-node-auth", help="TLS, but accept any clinic (no registered keys needed).")] = False,
    audit_db: Annotated[str | None, typer.Option("--audit-db", "--db", metavar="URL", help="Audit database URL (default: $QANA_AUDIT_DB, else sqlite:///~/.qana/audit.db).")] = None,
    audit_key: Annotated[Path | None, typer.Option("--audit-key", metavar="PATH", help="Audit signing key (default: $QANA_AUDIT_KEY, else ~/.qana/audit_key.pem).")] = None,
    wire_log: Annotated[bool, typer.Option("--wire-log", help="Record the structure and size of every message in STATE_DIR/wire.jsonl.")] = False,
    keep_running: Annotated[bool, typer.Option("--keep-running", help="Keep the SuperLink up after the run (for more `flwr run`s).")] = False,
) -> None:
    """Start a SuperLink (TLS by default) and run the QANA ServerApp on it until the rounds are done."""
    from flwr.common.config import parse_config_args

    from server.audit import AuditLog
    from server.audit.db import DB_ENV_VAR, default_db_url
    from server.audit.signing import KEY_ENV_VAR, default_key_path
    from server.certs import CA_CERT, SERVER_CERT, SERVER_KEY, check_server_certificates
    from server.deployment import (
        CONNECTION,
        DeploymentError,
        app_run_config,
        check_port_free,
        client_host,
        flwr,
        start_superlink,
        write_flower_app,
        write_flwr_config,
    )
    from server.federation import ENV_BUNDLE, ENV_STATE_DIR, ENV_WIRE_LOG
    from server.strategies import build_strategy, parse_options

    state = _state(state_dir)
    with _reported_errors():
        # Check everything before starting anything.
        options = parse_options(",".join(strategy_option or []))
        build_strategy(strategy, options, min_clinics=min_clinics)
        config: dict[str, Any] = {
            "num-rounds": rounds,
            "strategy": strategy,
            "strategy-options": ",".join(f"{k}={v}" for k, v in options.items()),
            "min-clinics": min_clinics,
            "round-timeout": float(round_timeout),
            "wait-for-clinics": float(wait_for_clinics),
            "local-epochs": local_epochs,
            "learning-rate": float(learning_rate),
            "learning": learning,
        }
        try:
            extra = parse_config_args(run_config or [])
        except Exception as exc:  # flwr raises ValueError/TOML errors for bad syntax
            raise fail(f"--run-config: {exc}") from None
        # A key with its own option would silently override it (and `start` would announce the option's value).
        doubled = sorted(key for key in extra if key in config)
        if doubled:
            flags = [{"num-rounds": "--rounds", "strategy-options": "--strategy-option"}.get(key, f"--{key}") for key in doubled]
            raise fail(f"--run-config {', '.join(doubled)}: use {', '.join(flags)} instead")
        config.update(extra)
        for secret in ("audit-db", "audit-key", "state-dir", "bundle"):
            if secret in config:
                raise fail(f"--run-config {secret}: use the --{secret} option instead (the run config is visible to clinics)")
        from server.edge_rounds import check_edge_bundle, read_run_config

        settings, edge = read_run_config(config, run_id="check")
        from qana.bundle import load_bundle, load_default_bundle

        loaded = load_bundle(bundle) if bundle else load_default_bundle("v1" if settings.learning == "akida-edge" else "v2")
        if settings.learning == "akida-edge":
            check_edge_bundle(loaded, edge)
        tls: tuple[Path, Path, Path] | None = None
        if not insecure:
            cdir = (certs or state.certs).expanduser().resolve()
            tls = (cdir / CA_CERT, cdir / SERVER_CERT, cdir / SERVER_KEY)
            for path in tls:
                if not path.is_file():
                    raise fail(f"{path} not found: run `qana-server certs --out {cdir} --host <this machine's name>` first, or pass --insecure")
            check_server_certificates(*tls)
        app_run_config(config)
        check_port_free(host, port)  # before anything is written; start_superlink checks again
        audit_db = _absolute_sqlite(audit_db)
        # $QANA_AUDIT_DB / $QANA_AUDIT_KEY are pinned like the options: the ServerApp runs in the
        # state directory, where a relative path would name another log and another signing key.
        log_url = audit_db or _absolute_sqlite(default_db_url())
        key_path = (audit_key or default_key_path()).expanduser().resolve()
        with AuditLog.open(log_url, key_path, create=True):
            pass  # creates/migrates the database and the signing key now, not in the middle of a run
        env = {ENV_STATE_DIR: str(state.root), ENV_BUNDLE: str(loaded.path.resolve()), DB_ENV_VAR: log_url, KEY_ENV_VAR: str(key_path)}
        if wire_log:
            env[ENV_WIRE_LOG] = "1"
        node_auth = tls is not None and not no_node_auth
        link = start_superlink(state, host, port, tls, node_auth, env)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a process started in the background by a script inherits an ignored
    # SIGINT, and the SuperLink must be stopped on SIGTERM (systemd, docker stop) as well.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run_id = None
    try:
        with _reported_errors():
            # Only now, with the SuperLink up, replace what a coordinator already running from this
            # state directory would still be using (its status, Flower App and `flwr` connection).
            state.status_file.unlink(missing_ok=True)
            app_dir = write_flower_app(state, config)
            write_flwr_config(state, f"{client_host(host)}:{port}", tls[0] if tls else None)
            if node_auth:
                _apply_registry(state)
            typer.echo(
                f"SuperLink on {host}:{port} ({'TLS, registered clinics only' if node_auth else 'TLS, any clinic' if tls else 'INSECURE'}); "
                f"state {state.root}; log {state.superlink_log}"
            )
            answer = flwr(state, "run", str(app_dir), CONNECTION)
            run_id = str(answer["run-id"])
            state.write_json(state.server_file, {
                "pid": link.process.pid, "host": host, "port": port, "tls": tls is not None, "node_auth": node_auth,
                "run_id": run_id, "started_at": _now(), "bundle": str(loaded.path), "bundle_id": loaded.bundle_id,
                "audit_db": "(set)" if audit_db else None,
            })
            typer.echo(f"run {run_id}: {rounds} round(s) of {strategy} on bundle {loaded.bundle_id[:12]}…, waiting for {min_clinics} clinic(s)")
            final = _follow(state, link, run_id)
            status = str(final.get("status", "")) if final else "unknown"
            typer.echo(f"run {run_id} {status}")
            if final and "fail" in status:
                raise DeploymentError(f"run {run_id} failed: {final.get('status-details') or 'see ' + str(state.superlink_log)}")
        if keep_running:
            typer.echo("SuperLink keeps running; stop it with Ctrl-C")
            while link.alive():
                time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping", err=True)
        if run_id is not None and link.alive():
            try:
                flwr(state, "stop", run_id, CONNECTION, timeout=20)
            except DeploymentError:
                pass
        raise typer.Exit(130) from None
    finally:
        link.stop()
        info = state.read_json(state.server_file)
        if info:
            info["stopped_at"] = _now()
            state.write_json(state.server_file, info)


def _follow(state, link, run_id: str) -> dict[str, Any] | None:
    """Print progress from the ServerApp's status file until Flower reports the run finished."""
    from server.deployment import DeploymentError, run_info

    printed_rounds: set[int] = set()
    last_phase = ""
    info: dict[str, Any] | None = None
    last_poll = 0.0
    while True:
        if not link.alive():
            raise DeploymentError(f"flower-superlink stopped unexpectedly:\n{link.log_tail()}")
        status = state.read_json(state.status_file) if state.status_file.exists() else {}
        phase = str(status.get("phase", ""))
        if phase and phase != last_phase:
            last_phase = phase
            if phase.startswith("waiting"):
                ready = sum(1 for c in status.get("clinics", {}).values() if c.get("has_bundle"))
                typer.echo(f"  waiting for clinics ({ready} ready)")
        for item in status.get("history", []):
            if item["round"] in printed_rounds:
                continue
            printed_rounds.add(item["round"])
            ev = item.get("evaluate") or {}
            top1 = f"federated top1 {ev['top1']:.3f} on {ev.get('num-examples', '?')} held-out images" if "top1" in ev else "no evaluation"
            extra = ""
            if item.get("rejected"):
                extra += f"; rejected {', '.join(item['rejected'])}"
            if item.get("failed"):
                extra += f"; no update from {', '.join(item['failed'])}"
            version = item.get("head_version") or "unchanged"
            typer.echo(f"  round {item['round']}: head {version}; {top1}{extra}")
        if time.monotonic() - last_poll > 3.0:
            last_poll = time.monotonic()
            info = run_info(state, run_id)
            if info and str(info.get("status", "")).startswith("finished"):
                return info
        time.sleep(1.0)


def _absolute_sqlite(url: str | None) -> str | None:
    """A relative SQLite path would resolve against the ServerApp's working directory; pin it."""
    from server.audit.db import parse_url, sqlite_file

    if url is None:
        return None
    path = sqlite_file(parse_url(url))
    if path is None or path.is_absolute():
        return url
    return parse_url(url).set(database=str(path.resolve())).render_as_string(hide_password=False)


# --------------------------------------------------------------------------- status


def status_command(
    state_dir: StateOption = DEFAULT_STATE,
    audit_db: Annotated[str | None, typer.Option("--audit-db", "--db", metavar="URL", help="Audit database (default: $QANA_AUDIT_DB, else ~/.qana/audit.db).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The run, connected clinics and the current model version."""
    from server.audit import AuditLog
    from server.deployment import DeploymentError, read_nodes, run_info, superlink_nodes

    state = _state(state_dir)
    with _reported_errors():
        server_info = state.read_json(state.server_file)
        if not server_info:
            raise fail(f"no coordinator state in {state.root} (start one with `qana-server start`)")
        running = _superlink_running(state) and "stopped_at" not in server_info
        run = None
        live: list[dict[str, Any]] = []
        if running:
            try:
                run = run_info(state, str(server_info["run_id"]))
                live = superlink_nodes(state)
            except DeploymentError as exc:
                typer.echo(f"warning: {exc}", err=True)
        progress = state.read_json(state.status_file)
        current_head = current_backbone = None
        if audit_db is None and server_info.get("audit_db"):
            # The run wrote to an --audit-db whose URL `start` does not store (it may hold a password).
            typer.echo("note: this run used its own --audit-db; pass it to see the current model version", err=True)
        else:
            with AuditLog.open(audit_db, None, create=False, sign=False) as audit:
                current_head = audit.current_version("head")
                current_backbone = audit.current_version("backbone")
        registered = read_nodes(state)
    names = {str(c.get("node_id")): name for name, c in registered.items() if c.get("node_id")}
    for node_id, c in progress.get("clinics", {}).items():
        names.setdefault(str(node_id), c["clinic_id"])
    clinics = [
        {"node_id": n["node-id"], "clinic": names.get(n["node-id"], "?"), "status": n["status"]}
        for n in live
    ]
    result = {
        "superlink": f"{'running' if running else 'stopped'} on {server_info.get('host')}:{server_info.get('port')}"
        + (" (TLS)" if server_info.get("tls") else " (insecure)"),
        "run_id": server_info.get("run_id"),
        "run_status": (run or {}).get("status") or ("unknown (SuperLink stopped)" if not running else "unknown"),
        "phase": progress.get("phase"),
        "round": progress.get("round"),
        "num_rounds": progress.get("num_rounds"),
        "strategy": progress.get("strategy"),
        "bundle_id": server_info.get("bundle_id"),
        "current_head": current_head,
        "current_backbone": current_backbone,
        "clinics": clinics,
        "history": progress.get("history", []),
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(f"SuperLink     {result['superlink']}")
    typer.echo(f"run           {result['run_id']}: {result['run_status']}; {result['phase'] or '-'} (round {result['round']}/{result['num_rounds']}, {result['strategy']})")
    typer.echo(f"model         head {current_head or '-'} on backbone {current_backbone or '-'} (bundle {str(result['bundle_id'])[:12]}…)")
    if running:
        online = [c for c in clinics if c["status"] == "online"]
        typer.echo(f"clinics       {len(online)} connected of {len(clinics)} known to the SuperLink")
        for c in clinics:
            typer.echo(f"  {c['clinic']:<20} node {c['node_id']:<22} {c['status']}")
    for item in result["history"]:
        ev = item.get("evaluate") or {}
        typer.echo(f"  round {item['round']}: head {item.get('head_version') or 'unchanged'}" + (f", top1 {ev['top1']:.3f}" if "top1" in ev else ""))
