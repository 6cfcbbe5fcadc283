"""The deployment's ServerApp and ClientApp on Flower's Simulation Engine (Ray), in a child process.

What runs is `server.app.app` (the coordinator: hello, bundle deployment, FedAvg & co. from
Flower, validation, audit log) and `client.app.app` (the clinic: cached features, SMOTE +
head training, quantization, the on-chip agreement check, evaluation) — the same objects
`qana-server start` and `qana-client start` run. The simulation adds only what a deployment
gets from outside the apps:

- the run config (`[tool.flwr.app.config]` + `--run-config` in a deployment). Flower's public
  `flwr.simulation.run_simulation()` has no run-config parameter (its ServerApp context has
  an empty run config), so this module calls `flwr.simulation.run_simulation._run_simulation`,
  the function `run_simulation()` itself and Flower's `flower-simulation` (what `flwr run`
  starts) call, passing the ServerApp context with the run config as `flower-simulation`
  does. flwr is pinned to 1.41.0; tests/test_simulation.py fails if this call stops working.
- the node config (`flower-supernode --node-config` in a deployment). The simulation engine
  gives each virtual SuperNode only `partition-id`; `SimulatedClinics` looks up that
  clinic's node config (data folder, clinic id, cache) and hands the message to
  `client.app.app` with it. With `--dropout P` it also plays a failing network: a clinic's
  training message is answered with an error (as a crashed clinic's is) with probability P,
  decided from (seed, round, clinic) so a rerun drops the same clinics.

Why a child process: after Ctrl-C, Flower's ServerApp thread keeps waiting for replies (up to
the round timeout) and would keep the interpreter alive; the parent stays responsive, stops
the child and its Ray workers, and writes what the finished rounds produced. The parent
follows progress through the coordinator's own status file and wire log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from qana.atomic import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTITION_ID = "partition-id"  # flwr.common.constant.PARTITION_ID_KEY
STOP_GRACE = 10.0


class DroppedOut(RuntimeError):
    """A simulated clinic's training update is lost this round (--dropout)."""


def dropped_out(seed: int, server_round: int, partition: int, probability: float) -> bool:
    """Whether clinic `partition` drops out of `server_round`: reproducible for a given seed."""
    if probability <= 0.0:
        return False
    return bool(np.random.default_rng([seed, server_round, partition, 0xD0]).random() < probability)


class SimulatedClinics(ClientApp):
    """Every virtual SuperNode: gives `client.app.app` its clinic's node config (and simulates dropout)."""

    def __init__(self, node_configs: list[dict[str, Any]], dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.node_configs = [dict(c) for c in node_configs]
        self.dropout = float(dropout)
        self.seed = int(seed)

    def __call__(self, message: Message, context: Context) -> Message:
        from client.app import app as clinic_app  # the deployment's ClientApp
        from protocols.messages import K_ROUND, MSG_TRAIN, REC_CONFIG

        partition = int(context.node_config[PARTITION_ID])
        node_config = self.node_configs[partition]
        is_train = message.metadata.message_type.split(".")[0] == MSG_TRAIN  # "train" and "train.edge"
        if is_train and self.dropout > 0.0:
            server_round = int(message.content[REC_CONFIG][K_ROUND])
            if dropped_out(self.seed, server_round, partition, self.dropout):
                raise DroppedOut(
                    f"{node_config['clinic-id']} dropped out of round {server_round} (simulated, dropout {self.dropout})"
                )
        clinic_context = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=node_config,
            state=context.state,
            run_config=context.run_config,
        )
        return clinic_app(message, clinic_context)


@dataclass
class Job:
    """What the child process runs (written as JSON into the run directory)."""

    run_id: int
    node_configs: list[dict[str, Any]]
    run_config: dict[str, Any]
    dropout: float
    seed: int
    timings: str  # path of the child's timings.json
    num_cpus: int = 2


def backend_config(num_cpus: int) -> dict[str, Any]:
    """Ray: `num_cpus` CPUs in the pool, one per ClientApp (so at most `num_cpus` clinics work at once)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "logging_level": "WARNING", "log_to_driver": True},
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def run_job(job: Job) -> None:
    """Child process: the ServerApp and ClientApp on Flower's Simulation Engine until the run ends."""
    import ray
    from flwr.app import RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from server.app import app as server_app  # the deployment's ServerApp

    timings: dict[str, Any] = {"started": time.time(), "ray_ready": None, "finished": None}
    timings_path = Path(job.timings)
    _write_json(timings_path, timings)
    done = threading.Event()

    def watch_ray() -> None:
        while not done.is_set():
            if ray.is_initialized():
                timings["ray_ready"] = time.time()
                _write_json(timings_path, timings)
                return
            time.sleep(0.1)

    def stop(signum: int, _frame: Any) -> None:
        # The ServerApp thread would keep the interpreter alive; stop Ray's workers and leave.
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=watch_ray, daemon=True).start()
    context = Context(run_id=job.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=job.run_config)
    try:
        _run_simulation(
            num_supernodes=len(job.node_configs),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=SimulatedClinics(job.node_configs, job.dropout, job.seed),
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(job.num_cpus),
            server_app_context=context,
        )
    finally:
        done.set()
        timings["finished"] = time.time()
        _write_json(timings_path, timings)
        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m simulations.engine JOB.json` (started by `run_federation`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m simulations.engine JOB.json", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(args[0]).read_text()))
    try:
        run_job(job)
    except Exception:  # e.g. Ray failed to start on an overloaded machine
        # Flower's ServerApp thread would otherwise keep waiting for clinics (wait-for-clinics,
        # up to 10 minutes) although no clinic can come any more: report and leave now.
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    return 0


# --------------------------------------------------------------------------- parent side


@dataclass
class Progress:
    """What the parent knows about the running federation (from the coordinator's files)."""

    phase: str = "starting"
    round: int = 0
    rounds_done: int = -1  # highest round whose head is recorded (0 = initial evaluation done)
    sent: dict[int, int] = field(default_factory=dict)  # messages sent, by round
    received: dict[int, int] = field(default_factory=dict)  # replies received, by round
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)  # clinics' mean, by round


class WireLog:
    """Incremental reader of the coordinator's wire.jsonl (every message's size, by round and node)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            if line.strip():
                try:
                    new.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line from a killed process
        self.entries.extend(new)
        return new


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class FederationRun:
    """The child process's outcome and the coordinator's files (read by `simulations.results`)."""

    status: str  # finished | interrupted | failed
    exit_code: int | None
    state_dir: Path
    audit_db: str
    log_path: Path
    timings: dict[str, Any]
    started: float
    ended: float
    wire: list[dict[str, Any]]
    status_json: dict[str, Any]
    node_names: dict[str, str]  # node id -> clinic id
    error: str | None = None


def _tensorflow_blocker(where: Path) -> Path:
    """A directory whose `tensorflow` package refuses to import, for the simulation's processes.

    `flwr.simulation.ray_transport.utils` does `try: import tensorflow` (for GPU memory growth)
    in the simulation process and in every Ray worker. Where TensorFlow is installed (the
    `train` extra) that costs each process about 7 s and 600 MB here, for nothing: the clinic
    path never uses TensorFlow (tests/test_import_boundaries.py). Flower handles the
    ModuleNotFoundError as "TensorFlow not installed".
    """
    package = where / "no-tensorflow" / "tensorflow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        'raise ModuleNotFoundError("TensorFlow is not used by qana-sim\'s simulation processes", name="tensorflow")\n'
    )
    return package.parent


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop the child (it stops Ray on SIGTERM); kill its process group if it does not leave."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    interesting = [l for l in text if "ERROR" in l or "Error" in l or "error" in l]
    return "\n".join((interesting or text)[-lines:])


def run_federation(
    job: Job,
    run_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    poll_interval: float = 0.5,
) -> FederationRun:
    """Run the job in a child process, report progress, and return what it left behind.

    KeyboardInterrupt (Ctrl-C) stops the child and returns status "interrupted"; the rounds
    finished so far are in the audit log and status file and are reported as such.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    job_path = run_dir / "job.json"
    _write_json(job_path, asdict(job))
    state_dir = Path(job.run_config["state-dir"])
    log_path = run_dir / "simulation.log"
    env = dict(os.environ)
    blocker_dir = tempfile.TemporaryDirectory(prefix="qana-sim-")
    blocker = _tensorflow_blocker(Path(blocker_dir.name))
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage telemetry from simulations
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    wire = WireLog(state_dir / "wire.jsonl")
    progress = Progress()
    node_names: dict[str, str] = {}
    started = time.time()
    status = "failed"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulations.engine", str(job_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(run_dir),
            start_new_session=True,
        )
        try:
            while True:
                code = proc.poll()
                _update(progress, wire, state_dir, node_names)
                if on_progress is not None:
                    on_progress(progress)
                if code is not None:
                    status = "finished" if code == 0 else "failed"
                    break
                time.sleep(poll_interval)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            _terminate(proc)
            blocker_dir.cleanup()
    _update(progress, wire, state_dir, node_names)
    status_json = read_json(state_dir / "status.json")
    error = None
    if status == "failed":
        error = _log_tail(log_path) or f"the simulation process exited with status {proc.returncode}"
    return FederationRun(
        status=status,
        exit_code=proc.returncode,
        state_dir=state_dir,
        audit_db=str(job.run_config["audit-db"]),
        log_path=log_path,
        timings=read_json(Path(job.timings)),
        started=started,
        ended=time.time(),
        wire=wire.entries,
        status_json=status_json,
        node_names=node_names,
        error=error,
    )


def _update(progress: Progress, wire: WireLog, state_dir: Path, node_names: dict[str, str]) -> None:
    status = read_json(state_dir / "status.json")
    for node, info in (status.get("clinics") or {}).items():
        if isinstance(info, dict) and info.get("clinic_id"):
            node_names[str(node)] = str(info["clinic_id"])
    if status:
        progress.phase = str(status.get("phase", progress.phase))
        for step in status.get("history") or []:
            r = int(step.get("round", -1))
            progress.rounds_done = max(progress.rounds_done, r)
            if step.get("evaluate"):
                progress.evaluations[r] = dict(step["evaluate"])
    for entry in wire.poll():
        r = int(entry.get("round", 0))
        counter = progress.sent if entry.get("direction") == "out" else progress.received
        counter[r] = counter.get(r, 0) + 1
        progress.round = max(progress.round, r)


if __name__ == "__main__":
    sys.exit(main())
