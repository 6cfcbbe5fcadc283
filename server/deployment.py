"""Running the coordinator on Flower's deployment engine: SuperLink process, Flower App, flwr CLI.

`qana-server start` does what a Flower operator would do by hand, with QANA-FL's settings:

1. start `flower-superlink` (TLS unless `--insecure`, SuperNode authentication when TLS is on,
   a persistent SQLite state database, no runtime `uv` installs);
2. register the clinics' public keys kept in the state dir (`nodes.json`);
3. write a Flower App directory whose `pyproject.toml` names `server.app:app` and
   `client.app:app` and carries the run's federation settings, and submit it with
   `flwr run <app> qana` (the Flower App Bundle holds only that pyproject: clinics run their
   own installed `client.app`, no code travels to them);
4. follow the run until it finishes.

Everything the ServerApp must know but clinics must not see (audit database URL, which may
hold a password; signing key path; state dir; bundle path) reaches it through environment
variables of the SuperLink process, not through the run config (which Flower also gives to
every ClientApp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

import server
from qana.atomic import write_atomic
from server.federation import RUN_CONFIG_DEFAULTS

CONNECTION = "qana"
APP_NAME = "qana-fl"
APP_PUBLISHER = "qana"
DEFAULT_PORT = 9092
REPO_ROOT = Path(server.__file__).resolve().parents[1]


class DeploymentError(RuntimeError):
    """The SuperLink or the flwr CLI failed; the message says what and where the log is."""


def executable(name: str) -> str:
    """A console script of this environment (the venv's, not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found; is flwr 1.41 installed in this environment?")
    return found


def python_path_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: they must import this very qana-fl code.

    Flower starts its helpers (`flower-superexec`, `flwr-serverapp`) by name from PATH, so
    this environment's script directory goes first even when the venv is not activated.
    """
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    paths = [str(Path(sys.executable).parent)] + [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class StateDir:
    """The coordinator's files: `qana-server start` creates them, `status`/`nodes` read them."""

    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.root / "flower-app"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def superlink_log(self) -> Path:
        return self.root / "superlink.log"

    @property
    def server_file(self) -> Path:
        return self.root / "server.json"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def nodes_file(self) -> Path:
        return self.root / "nodes.json"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def read_json(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DeploymentError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DeploymentError(f"{path} is not a JSON object (damaged or edited by hand?)")
        return data

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- Flower App + CLI config


def app_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run config the Flower App declares: every default, overridden by `run_config`,
    whose keys must all be known (checked before `start` touches anything stored)."""
    from server.edge_rounds import EDGE_RUN_CONFIG_DEFAULTS

    defaults = {**RUN_CONFIG_DEFAULTS, **EDGE_RUN_CONFIG_DEFAULTS}  # Flower only overrides keys the app declares
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise DeploymentError(f"unknown run-config key(s): {', '.join(unknown)}")
    return {**defaults, **run_config}


def write_flower_app(state: StateDir, run_config: dict[str, Any]) -> Path:
    """The Flower App directory `flwr run` packages: a pyproject.toml, nothing else."""
    config = app_run_config(run_config)
    document = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": "0.1.0",
            "description": "QANA-FL: federated projection-head learning on an Akida backbone",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": APP_PUBLISHER,
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": config,
                }
            }
        },
    }
    state.app_dir.mkdir(parents=True, exist_ok=True)
    path = state.app_dir / "pyproject.toml"
    path.write_bytes(tomli_w.dumps(document).encode())
    return state.app_dir


def write_flwr_config(state: StateDir, address: str, root_certificates: Path | None) -> Path:
    """`$FLWR_HOME/config.toml` with one SuperLink connection named `qana`."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates)
    document = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    state.flwr_home.mkdir(parents=True, exist_ok=True)
    path = state.flwr_home / "config.toml"
    path.write_bytes(tomli_w.dumps(document).encode())
    return path


def flwr(state: StateDir, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run a `flwr` CLI command against the coordinator's SuperLink; return its JSON answer."""
    cmd = [executable("flwr"), *args, "--format", "json"]
    env = python_path_env({"FLWR_HOME": str(state.flwr_home)})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=state.root)
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s") from None
    out = proc.stdout.strip()
    start = out.find("{")
    try:
        answer = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer.get("success"):
        reason = answer.get("error-message") or proc.stderr.strip() or out or f"exit code {proc.returncode}"
        reason = " ".join(line for line in reason.splitlines() if line.strip() and not line.startswith("Using SuperLink"))
        raise DeploymentError(f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` failed: {reason}")
    return answer


# --------------------------------------------------------------------------- SuperLink


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def client_host(bind_host: str) -> str:
    """Where local tools reach a SuperLink bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


@dataclass
class SuperLinkProcess:
    """A `flower-superlink` we started (and must stop)."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the SuperLink and everything it started (its process group)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)


def check_port_free(host: str, port: int) -> None:
    """DeploymentError when something already listens on the SuperLink's port (e.g. another SuperLink)."""
    if port_open(client_host(host), port):
        raise DeploymentError(f"port {port} on {client_host(host)} is already in use (another SuperLink?): pick another --port")


def die_with_parent() -> None:
    """Run in a child before it starts (`preexec_fn`): on Linux the kernel sends it SIGTERM when
    the process that started it dies, however it dies. `qana-server start` stops its SuperLink in
    a `finally`, but SIGKILL (the OOM killer, `kill -9`) skips that and would leave a SuperLink
    holding the port, in its own session, for nobody; elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_superlink(
    state: StateDir,
    host: str,
    port: int,
    certs: tuple[Path, Path, Path] | None,
    node_auth: bool,
    env: dict[str, str],
    wait: float = 60.0,
) -> SuperLinkProcess:
    """Start `flower-superlink` in its own process group and wait until it accepts connections."""
    check_port_free(host, port)
    cmd = [executable("flower-superlink"), "--database", str(state.database), "--host", host, "--port", str(port)]
    cmd.append("--disable-runtime-dependency-installation")
    if certs is None:
        cmd.append("--insecure")
    else:
        ca, cert, key = certs
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    state.root.mkdir(parents=True, exist_ok=True)
    log = state.superlink_log.open("ab")
    process = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=python_path_env(env),
        cwd=state.root,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    log.close()
    link = SuperLinkProcess(process, host, port, state.superlink_log)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not link.alive():
            raise DeploymentError(f"flower-superlink exited with code {process.returncode}:\n{link.log_tail()}")
        if port_open(client_host(host), port):
            return link
        time.sleep(0.3)
    link.stop()
    raise DeploymentError(f"flower-superlink did not open port {port} within {wait:.0f}s; see {state.superlink_log}")


# --------------------------------------------------------------------------- node registry


def read_nodes(state: StateDir) -> dict[str, dict[str, Any]]:
    """The registered clinics; a damaged registry is a DeploymentError naming the file."""
    clinics = state.read_json(state.nodes_file).get("clinics", {})
    if not isinstance(clinics, dict) or not all(isinstance(entry, dict) for entry in clinics.values()):
        raise DeploymentError(f"{state.nodes_file} does not hold a clinic registry (damaged or edited by hand?)")
    return clinics


def write_nodes(state: StateDir, nodes: dict[str, dict[str, Any]]) -> None:
    state.write_json(state.nodes_file, {"clinics": nodes})


def register_with_superlink(state: StateDir, clinic: str, public_key: Path) -> str | None:
    """Register a key with the running SuperLink; returns the node id (None if it was already there)."""
    try:
        answer = flwr(state, "supernode", "register", str(public_key), CONNECTION, "--name", clinic)
    except DeploymentError as exc:
        if "already in use" in str(exc):
            return None
        raise
    return str(answer["node-id"])


def superlink_nodes(state: StateDir) -> list[dict[str, Any]]:
    return list(flwr(state, "supernode", "ls", CONNECTION)["nodes"])


def run_info(state: StateDir, run_id: str) -> dict[str, Any] | None:
    runs = flwr(state, "ls", CONNECTION, "--run-id", run_id).get("runs", [])
    return runs[0] if runs else None
