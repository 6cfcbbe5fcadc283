"""What a simulated federation produced, read back from the coordinator's own records.

The coordinator already records everything a researcher asks about: every round's global
head and the clinics' evaluation replies in the signed audit log, every message's size in
its wire log, its progress in status.json. This module reads those (so the numbers reported
are the deployment code's numbers, not a re-implementation) and adds two things:

- each round's global head scored on every clinic's test part by the driver, with the same
  integer arithmetic, so federated, pooled and local-only are compared on identical images
  and the union of all test parts gives one confusion matrix;
- a consistency check: for every clinic and round, the driver's score must equal what the
  clinic computed from its chip's predictions. A mismatch would mean the simulation scores
  something other than what the clinics ran, and is reported loudly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qana.head import Head
from simulations.baselines import METRICS, Scores, score
from simulations.edge_baselines import head_from_artifact
from simulations.engine import FederationRun
from simulations.partition import Partition

# Clinic metric names on the wire -> names in results.
WIRE_METRICS = {"top1": "top1", "macro-f1": "macro_f1", "balanced-accuracy": "balanced_accuracy", "num-examples": "n"}
CONSISTENCY_TOLERANCE = 1e-9


@dataclass
class FederatedRound:
    round: int
    head_version: str | None  # None: no valid update this round, the head stayed
    participants: list[str]
    failed: dict[str, str]
    rejected: dict[str, str]
    reported: dict[str, float]  # the coordinator's aggregate of the clinics' replies (Flower's weighted mean)
    reported_by_clinic: dict[str, dict[str, float]]  # each clinic's own on-chip evaluation
    scores: Scores | None  # the round's global head on every clinic's test part (driver)
    bytes_sent: int = 0  # coordinator -> clinics, as Flower transfers them
    bytes_received: int = 0  # clinics -> coordinator
    bytes_by_clinic: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "head_version": self.head_version,
            "participants": self.participants,
            "failed": self.failed,
            "rejected": self.rejected,
            "reported": self.reported,
            "reported_by_clinic": self.reported_by_clinic,
            "scores": self.scores.to_dict() if self.scores else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_by_clinic": self.bytes_by_clinic,
            "seconds": self.seconds,
        }


@dataclass
class Federated:
    status: str  # finished | interrupted | failed
    rounds: list[FederatedRound]
    heads: dict[int, Head]
    run_id: str
    startup_seconds: float | None  # from starting the simulation process until Ray was up
    wall_seconds: float  # the whole federation, child process start to end
    consistency: dict[str, Any]
    error: str | None = None
    log: str = ""

    @property
    def completed_rounds(self) -> int:
        return max((r.round for r in self.rounds), default=-1)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str) -> str:
    """A clinic's error as the clinic said it: without Ray's wrapping, traceback and colour codes."""
    text = _ANSI.sub("", str(reason))
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    return text.strip().removesuffix("'>").strip()


def _wire_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {WIRE_METRICS[k]: float(v) for k, v in metrics.items() if k in WIRE_METRICS}


def _bytes(run: FederationRun) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for entry in run.wire:
        r = int(entry.get("round", 0))
        slot = out.setdefault(r, {"sent": 0, "received": 0, "by_clinic": {}})
        n = int(entry.get("wire_bytes", 0) or 0)
        node = str(entry.get("node_id"))
        name = run.node_names.get(node, f"node-{node}")
        per = slot["by_clinic"].setdefault(name, {"sent": 0, "received": 0})
        key = "sent" if entry.get("direction") == "out" else "received"
        slot[key] += n
        per[key] += n
    return out


def _audit_heads(run: FederationRun, run_id: str) -> list[Any]:
    """The run's head versions from the audit log, oldest first (empty if the log was never created)."""
    from server.audit import AuditLog, EntryFilter
    from server.audit.errors import AuditError

    if not run.audit_db.startswith("sqlite:///"):
        return []
    from pathlib import Path

    if not Path(run.audit_db.removeprefix("sqlite:///")).is_file():
        return []
    try:
        log = AuditLog.open(run.audit_db, create=False, sign=False)
    except AuditError:
        return []
    try:
        versions = [log.version(str(e.version)) for e in log.entries(EntryFilter(run_id=run_id, kinds=("head",)))]
        return [(v, log.get_artifact(v.sha256)) for v in versions]
    finally:
        log.close()


def collect(
    run: FederationRun,
    run_id: str,
    target: str,
    features: np.ndarray,
    labels: np.ndarray,
    partition: Partition,
    classes: tuple[str, ...],
) -> Federated:
    """Assemble per-round results from the coordinator's audit log, status file and wire log."""
    heads_by_round: dict[int, tuple[Any, bytes]] = {}
    for info, data in _audit_heads(run, run_id):
        if info.round is not None:
            heads_by_round[int(info.round)] = (info, data)
    history = {int(h["round"]): h for h in run.status_json.get("history", []) if "round" in h}
    traffic = _bytes(run)
    last_round = max([*heads_by_round, *history], default=-1)
    rounds: list[FederatedRound] = []
    heads: dict[int, Head] = {}
    previous_time: float | None = run.started  # round 0 includes starting the simulation process and Ray
    current: Head | None = None
    worst = 0.0
    mismatches: list[str] = []
    for r in range(last_round + 1):
        recorded = heads_by_round.get(r)
        step = history.get(r, {})
        if recorded is None and not step:
            continue
        version, metrics, participants = None, {}, []
        finished_at = None
        if recorded is not None:
            info, data = recorded
            version = info.version
            current = head_from_artifact(data)  # a gradient or an akida-edge head
            metrics = info.metrics  # what the head entry recorded and how clinics then scored it
            participants = [p.clinic_id for p in info.participants]
            finished_at = info.created_at.timestamp()
        if current is not None:
            heads[r] = current
        reported_by_clinic = {
            name: _wire_metrics(m) for name, m in sorted((metrics.get("evaluate_by_clinic") or {}).items())
        }
        scores = (
            score(lambda _c: current, target, features, labels, partition, classes) if current is not None else None  # type: ignore[arg-type, return-value]
        )
        if scores is not None and recorded is not None:
            for name, mine in reported_by_clinic.items():
                ref = scores.by_clinic.get(name)
                if ref is None:
                    mismatches.append(f"round {r}: {name} is not a simulated clinic")
                    continue
                for key in METRICS:
                    if key in mine:
                        diff = abs(mine[key] - ref[key])
                        worst = max(worst, diff)
                        if diff > CONSISTENCY_TOLERANCE:
                            mismatches.append(f"round {r}, {name}: {key} on chip {mine[key]:.6f}, driver {ref[key]:.6f}")
        slot = traffic.get(r, {"sent": 0, "received": 0, "by_clinic": {}})
        seconds = None
        if finished_at is not None and previous_time is not None:
            seconds = max(0.0, finished_at - previous_time)
            previous_time = finished_at
        rounds.append(
            FederatedRound(
                round=r,
                head_version=version,
                participants=participants,
                failed={k: short_reason(v) for k, v in (metrics.get("failed") or step.get("failed") or {}).items()},
                rejected={k: short_reason(v) for k, v in (metrics.get("rejected") or step.get("rejected") or {}).items()},
                reported=_wire_metrics(metrics.get("evaluate") or step.get("evaluate") or {}),
                reported_by_clinic=reported_by_clinic,
                scores=scores,
                bytes_sent=int(slot["sent"]),
                bytes_received=int(slot["received"]),
                bytes_by_clinic=dict(sorted(slot["by_clinic"].items())),
                seconds=seconds,
                finished_at=finished_at,
            )
        )
    ray_ready = run.timings.get("ray_ready")
    consistency = {
        "checked": sum(len(r.reported_by_clinic) for r in rounds),
        "max_abs_difference": worst,
        "mismatches": mismatches[:20],
        "ok": not mismatches,
    }
    return Federated(
        status=run.status,
        rounds=rounds,
        heads=heads,
        run_id=run_id,
        startup_seconds=(ray_ready - run.started) if ray_ready else None,
        wall_seconds=run.ended - run.started,
        consistency=consistency,
        error=run.error,
        log=str(run.log_path),
    )
