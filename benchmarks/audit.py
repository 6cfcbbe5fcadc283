"""Benchmark the audit log: appends per second, and how long verify takes.

    python benchmarks/audit.py                          # SQLite, 10,000 entries
    python benchmarks/audit.py --postgres URL           # also PostgreSQL
    QANA_TEST_POSTGRES_URL=... python benchmarks/audit.py

The workload imitates a federation: each round records a head version (an .npz
of a 5x256 float32 head, with five clinics' metrics), deploys it to a clinic, and
every fifth round also records a rejected update and a class addition.  Each
append is its own transaction, as in the server, so the SQLite figure includes
one fsync per append (WAL, synchronous=FULL).  On PostgreSQL the benchmark runs
in a private schema that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

try:
    import server  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qana.cli_errors import at_least  # noqa: E402

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from server.audit import AuditLog

T = TypeVar("T")
CLINICS = ("clinic-a", "clinic-b", "clinic-c", "clinic-d", "clinic-e")


@dataclass(frozen=True)
class Result:
    backend: str
    entries: int
    append_seconds: float
    latencies_ms: list[float]
    verify_seconds: float
    verify_ok: bool
    artifacts: int

    @property
    def appends_per_second(self) -> float:
        return self.entries / self.append_seconds


def head_artifact(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        weights=rng.normal(size=(5, 256)).astype(np.float32),
        bias=rng.normal(size=(5,)).astype(np.float32),
    )
    return buffer.getvalue()


def timed(latencies: list[float], append: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call one append and note how long it took, in milliseconds."""
    started = time.perf_counter()
    result = append(*args, **kwargs)
    latencies.append((time.perf_counter() - started) * 1000)
    return result


def workload(log: AuditLog, total: int, rng: np.random.Generator) -> list[float]:
    """Append ``total`` entries; returns the latency of each append in milliseconds."""
    latencies: list[float] = []
    parent: str | None = None
    round_number = 0
    while len(latencies) < total:
        round_number += 1
        participants = [
            {
                "clinic_id": clinic,
                "num_examples": int(rng.integers(50, 500)),
                "metrics": {"accuracy": float(rng.uniform(0.6, 0.9)), "loss": float(rng.uniform(0.2, 1.0))},
            }
            for clinic in CLINICS
        ]
        head = timed(
            latencies,
            log.record_head,
            "bench",
            round_number,
            head_artifact(rng),
            parent=parent,
            strategy="FedAvg",
            strategy_config={"fraction_fit": 1.0, "min_fit_clients": 3},
            participants=participants,
            aggregate_metrics={"accuracy": float(rng.uniform(0.6, 0.9))},
        )
        parent = head.version
        if len(latencies) < total:
            timed(latencies, log.record_deployment, CLINICS[round_number % len(CLINICS)], parent)
        if round_number % 5 == 0 and len(latencies) < total:
            timed(latencies, log.record_rejection, "bench", round_number, "clinic-e", "update norm above clip bound")
        if round_number % 5 == 0 and len(latencies) < total:
            timed(latencies, log.record_class_addition, "bench", round_number, f"class-{round_number}", "clinic-b")
    return latencies


def run(backend: str, url: str, key_path: Path, total: int) -> Result:
    rng = np.random.default_rng(0)
    with AuditLog.open(url, key_path) as log:
        started = time.perf_counter()
        latencies = workload(log, total, rng)
        append_seconds = time.perf_counter() - started
        report = log.verify()
    return Result(
        backend=backend,
        entries=len(latencies),
        append_seconds=append_seconds,
        latencies_ms=latencies,
        verify_seconds=report.seconds,
        verify_ok=report.ok and report.entries_checked == len(latencies),
        artifacts=report.artifacts_checked,
    )


def postgres_schema_url(base_url: str) -> tuple[str, Callable[[], None]]:
    """A URL confined to a new schema, and the function that drops it."""
    schema = f"audit_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url.render_as_string(hide_password=False), drop


def print_results(results: list[Result]) -> None:
    header = (
        f"{'backend':<11} {'entries':>7} {'appends/s':>10} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'verify s':>9} {'verified/s':>10}  verify"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        latencies = sorted(result.latencies_ms)
        p95 = latencies[int(0.95 * (len(latencies) - 1))]
        print(
            f"{result.backend:<11} {result.entries:>7} {result.appends_per_second:>10.1f} "
            f"{statistics.median(latencies):>7.2f} {p95:>7.2f} {result.verify_seconds:>9.2f} "
            f"{result.entries / result.verify_seconds:>10.0f}  {'OK' if result.verify_ok else 'FAILED'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=at_least(1), default=10_000, help="entries to append per backend (default 10000)")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get("QANA_TEST_POSTGRES_URL"),
        help="also benchmark this PostgreSQL database (default: $QANA_TEST_POSTGRES_URL)",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    arguments = parser.parse_args()
    if arguments.no_sqlite and not arguments.postgres:
        parser.error("--no-sqlite leaves nothing to benchmark: give --postgres URL (or set QANA_TEST_POSTGRES_URL)")

    results = []
    with tempfile.TemporaryDirectory(prefix="qana-audit-bench-") as scratch:
        key_path = Path(scratch) / "key.pem"
        if not arguments.no_sqlite:
            database = Path(scratch) / "audit.db"
            print(f"sqlite: appending {arguments.entries} entries to {database} ...", file=sys.stderr, flush=True)
            results.append(run("sqlite", f"sqlite:///{database}", key_path, arguments.entries))
        if arguments.postgres:
            url, drop = postgres_schema_url(arguments.postgres)
            try:
                print(f"postgresql: appending {arguments.entries} entries ...", file=sys.stderr, flush=True)
                results.append(run("postgresql", url, key_path, arguments.entries))
            finally:
                drop()
    print_results(results)
    for result in results:
        print(f"{result.backend}: {result.artifacts} head artefacts stored and re-hashed by verify")
    return 0 if all(result.verify_ok for result in results) else 1


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
