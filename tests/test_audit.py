"""Audit log of model versions (issue 4): store, verification, concurrency, CLI.

Every test that touches a database runs on a SQLite file and, when
QANA_TEST_POSTGRES_URL is set (CI sets it from .ci/postgres.sh), on PostgreSQL,
each test in its own schema.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from server.audit import (
    AuditLog,
    EntryFilter,
    InvalidRecordError,
    SigningKeyError,
    StoreError,
    UnknownArtifactError,
    UnknownVersionError,
)
from server.audit.canonical import canonical_json, sha256_hex
from server.audit.db import default_db_url
from server.audit.models import (
    Artifact,
    Base,
    ChainHead,
    Deployment,
    Participant,
    Rejection,
)
from server.audit.models import Entry as EntryRow
from server.audit.records import format_time
from server.audit.signing import Signer, default_key_path, load_or_create_signer, load_signer, load_verifier
from server.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("QANA_TEST_POSTGRES_URL")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty audit database: a SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("QANA_TEST_POSTGRES_URL is not set (run .ci/postgres.sh)")
    schema = f"audit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "audit_key.pem"


@pytest.fixture
def audit_log(db_url: str, key_path: Path) -> Iterator[AuditLog]:
    log = AuditLog.open(db_url, key_path)
    try:
        yield log
    finally:
        log.close()


def head_npz(seed: int, classes: int = 5, features: int = 16) -> bytes:
    """A head artefact like the ServerApp's: an .npz of the head arrays."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        weights=rng.normal(size=(classes, features)).astype(np.float32),
        bias=rng.normal(size=(classes,)).astype(np.float32),
    )
    return buffer.getvalue()


def participants(*clinics: tuple[str, int, float]) -> list[dict[str, Any]]:
    return [
        {"clinic_id": clinic, "num_examples": examples, "metrics": {"accuracy": accuracy}}
        for clinic, examples, accuracy in clinics
    ]


# The standard history; the sequence numbers are what the tamper tests aim at.
#   1 b1   2 h1   3 h2   4 deployment h2->clinic-a   5 rejection clinic-d
#   6 class addition   7 h3 (six classes)   8 deployment h3->clinic-b
HISTORY_LENGTH = 8


@pytest.fixture
def history(audit_log: AuditLog) -> dict[str, Any]:
    artefacts = {"b1": b"backbone bundle v1 " * 64, "h1": head_npz(1), "h2": head_npz(2), "h3": head_npz(3, classes=6)}
    b1 = audit_log.record_backbone(artefacts["b1"], note="initial bundle, trained on HAM10000")
    config = {"fraction_fit": 1.0, "min_fit_clients": 2, "proximal_mu": np.float32(0.01)}
    h1 = audit_log.record_head(
        "run-1",
        1,
        artefacts["h1"],
        sha256_hex(artefacts["h1"]),
        parent=None,
        backbone=b1.version,
        strategy="FedAvg",
        strategy_config=config,
        participants=participants(("clinic-b", 80, 0.7), ("clinic-a", 120, 0.72)),
        aggregate_metrics={"accuracy": 0.71, "loss": 0.9},
    )
    h2 = audit_log.record_head(
        "run-1",
        2,
        artefacts["h2"],
        parent=h1.version,
        backbone="b1",
        strategy="FedAvg",
        strategy_config=config,
        participants=participants(("clinic-a", 120, 0.78), ("clinic-b", 80, 0.75), ("clinic-c", 40, 0.7)),
        aggregate_metrics={"accuracy": 0.76, "loss": 0.7},
    )
    audit_log.record_deployment("clinic-a", "h2")
    audit_log.record_rejection("run-1", 3, "clinic-d", "update norm 41.2 exceeds the clip bound 10")
    audit_log.record_class_addition("run-1", 3, "vascular lesion", "clinic-b")
    h3 = audit_log.record_head(
        "run-1",
        3,
        artefacts["h3"],
        parent="h2",
        backbone="b1",
        strategy="FedAvg",
        strategy_config=config,
        participants=participants(("clinic-a", 120, 0.8), ("clinic-b", 95, 0.79)),
        aggregate_metrics={"accuracy": 0.8, "loss": float("nan")},
    )
    audit_log.record_deployment("clinic-b", "h3")
    return {"artefacts": artefacts, "b1": b1, "h1": h1, "h2": h2, "h3": h3}


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def ledger_count(log: AuditLog) -> int:
    with log.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(EntryRow)).scalar_one()


# --------------------------------------------------------------------------- recording and reading


def test_history_is_recorded_with_readable_versions(audit_log: AuditLog, history: dict[str, Any]) -> None:
    assert [history[name].version for name in ("b1", "h1", "h2", "h3")] == ["b1", "h1", "h2", "h3"]
    h2 = audit_log.version("h2")
    assert h2.kind == "head" and h2.seq == 3
    assert h2.parent == "h1" and h2.backbone == "b1"
    assert (h2.run_id, h2.round, h2.strategy) == ("run-1", 2, "FedAvg")
    assert h2.sha256 == sha256_hex(history["artefacts"]["h2"])
    assert h2.size == len(history["artefacts"]["h2"])
    # Participants are stored sorted by clinic; numpy values become plain JSON numbers.
    assert [p.clinic_id for p in h2.participants] == ["clinic-a", "clinic-b", "clinic-c"]
    assert h2.total_examples == 240
    assert h2.strategy_config == {"fraction_fit": 1.0, "min_fit_clients": 2, "proximal_mu": float(np.float32(0.01))}
    # A NaN metric (diverged loss) is recorded as text rather than refused.
    assert audit_log.version("h3").aggregate_metrics == {"accuracy": 0.8, "loss": "NaN"}
    assert audit_log.version("b1").note == "initial bundle, trained on HAM10000"

    entries = audit_log.entries()
    assert [entry.seq for entry in entries] == list(range(1, HISTORY_LENGTH + 1))
    assert [entry.kind for entry in entries] == [
        "backbone",
        "head",
        "head",
        "deployment",
        "rejection",
        "class_addition",
        "head",
        "deployment",
    ]
    assert all(later.prev_hash == earlier.entry_hash for earlier, later in zip(entries, entries[1:], strict=False))
    assert audit_log.current_version() == "h3"
    assert audit_log.current_version("backbone") == "b1"
    assert [(d.clinic_id, d.version) for d in audit_log.deployments()] == [("clinic-a", "h2"), ("clinic-b", "h3")]


def test_evaluations_add_to_a_version_s_metrics_without_changing_its_entry(
    audit_log: AuditLog, history: dict[str, Any], db_url: str, key_path: Path
) -> None:
    """Clinics score a head after it was recorded (it is recorded before it is sent); their
    scores are their own signed entries, shown with the version by show, diff and metrics."""
    audit_log.record_evaluation("h3", "run-1", 3, {"evaluate": {"top1": 0.7}, "evaluate_by_clinic": {"clinic-a": {"top1": 0.7}}})
    audit_log.record_evaluation("h3", "run-1", 3, {"evaluate": {"top1": 0.75}})
    h3 = audit_log.version("h3")
    assert h3.aggregate_metrics == {"accuracy": 0.8, "loss": "NaN"}  # the head's own signed entry, as recorded
    assert h3.evaluation == {"evaluate": {"top1": 0.75}, "evaluate_by_clinic": {"clinic-a": {"top1": 0.7}}}
    assert h3.metrics == {"accuracy": 0.8, "loss": "NaN", **h3.evaluation}
    assert audit_log.version("h2").evaluation == {}
    before = ledger_count(audit_log)
    with pytest.raises(UnknownVersionError):
        audit_log.record_evaluation("h9", "run-1", 3, {"evaluate": {"top1": 0.1}})
    assert ledger_count(audit_log) == before
    assert audit_log.verify().ok
    shown = run_cli("audit", "show", "h3", "--db", db_url)
    assert shown.exit_code == 0 and "evaluate" in shown.output, shown.output
    listed = run_cli("audit", "log", "--kind", "evaluation", "--db", db_url)
    assert listed.exit_code == 0 and listed.output.count("scored by clinics") == 2, listed.output
    diff = run_cli("audit", "diff", "h2", "h3", "--db", db_url, "--json")
    assert diff.exit_code == 0, diff.output
    assert "evaluate" in {m["name"] for m in json.loads(diff.output)["metrics"]}


def test_entries_filter_by_run_clinic_kind_time_and_limit(audit_log: AuditLog, history: dict[str, Any]) -> None:
    def seqs(**filters: Any) -> list[int]:
        return [entry.seq for entry in audit_log.entries(EntryFilter(**filters))]

    assert seqs(run_id="run-1") == [2, 3, 5, 6, 7]
    assert seqs(run_id="run-2") == []
    # clinic-a took part in h1, h2, h3 and received h2; clinic-d only had an update rejected.
    assert seqs(clinic_id="clinic-a") == [2, 3, 4, 7]
    assert seqs(clinic_id="clinic-d") == [5]
    assert seqs(clinic_id="clinic-b") == [2, 3, 6, 7, 8]
    assert seqs(kinds=("deployment", "rollback")) == [4, 8]
    assert seqs(version="h2") == [3, 4]
    assert seqs(limit=3) == [6, 7, 8]
    third = audit_log.entries()[2].created_at
    assert seqs(since=third) == [3, 4, 5, 6, 7, 8]
    assert seqs(until=third) == [1, 2, 3]
    assert seqs(since=datetime.now(UTC) + timedelta(hours=1)) == []
    with pytest.raises(InvalidRecordError, match="unknown entry kind"):
        audit_log.entries(EntryFilter(kinds=("bogus",)))


def test_version_references(audit_log: AuditLog, history: dict[str, Any]) -> None:
    h2 = history["h2"]
    assert audit_log.resolve_version("h2") == "h2"
    assert audit_log.resolve_version(" H2 ") == "h2"
    assert audit_log.resolve_version(h2.sha256[:8]) == "h2"
    assert audit_log.resolve_version(h2.sha256.upper()) == "h2"
    assert audit_log.resolve_version("current") == "h3"
    with pytest.raises(UnknownVersionError, match="unknown version 'h9'"):
        audit_log.resolve_version("h9")
    with pytest.raises(UnknownVersionError):
        audit_log.resolve_version(h2.sha256[:4])  # too short to be a prefix
    # The same bytes recorded twice: one artefact, two versions, an ambiguous prefix.
    audit_log.record_head(
        "run-2",
        1,
        history["artefacts"]["h2"],
        parent="h2",
        strategy="FedAvg",
        strategy_config={},
        participants=[],
        aggregate_metrics={},
    )
    with pytest.raises(UnknownVersionError, match="ambiguous: h2, h4"):
        audit_log.resolve_version(h2.sha256[:10])


def test_artifacts_are_fetched_back_by_hash(audit_log: AuditLog, history: dict[str, Any]) -> None:
    artefacts = history["artefacts"]
    for name in ("b1", "h1", "h2", "h3"):
        assert audit_log.get_artifact(sha256_hex(artefacts[name])) == artefacts[name]
        assert audit_log.artifact_of(name) == artefacts[name]
    with np.load(io.BytesIO(audit_log.artifact_of("h3"))) as arrays:
        assert arrays["weights"].shape == (6, 16)
    with pytest.raises(UnknownArtifactError):
        audit_log.get_artifact("ab" * 32)
    # Identical bytes are stored once.
    audit_log.record_backbone(artefacts["b1"], parent="b1", note="re-recorded")
    with audit_log.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Artifact)).scalar_one() == 4


def test_invalid_records_are_refused_and_nothing_is_written(audit_log: AuditLog, history: dict[str, Any]) -> None:
    data = head_npz(9)
    good: dict[str, Any] = {
        "parent": "h3",
        "strategy": "FedAvg",
        "strategy_config": {},
        "participants": participants(("clinic-a", 1, 0.5)),
        "aggregate_metrics": {},
    }
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (InvalidRecordError, "sha256 mismatch", {"sha256": "00" * 32}),
        (UnknownVersionError, "parent: unknown version 'h42'", {"parent": "h42"}),
        (InvalidRecordError, "parent b1 is a backbone version", {"parent": "b1"}),
        (InvalidRecordError, "backbone h1 is a head version", {"backbone": "h1"}),
        (InvalidRecordError, "appears twice", {"participants": participants(("c", 1, 0.1), ("c", 2, 0.2))}),
        (
            InvalidRecordError,
            "num_examples must be a non-negative integer",
            {"participants": participants(("c", -1, 0))},
        ),
        (InvalidRecordError, "keys must be strings", {"aggregate_metrics": {1: 0.5}}),
        (InvalidRecordError, "cannot record a value of type bytes", {"strategy_config": {"blob": b"x"}}),
        (InvalidRecordError, "round must be a non-negative integer", {"round": 1.5}),
        (InvalidRecordError, "run_id must be a non-empty string", {"run_id": ""}),
    ]
    for error, message, override in cases:
        arguments = {"run_id": "run-1", "round": 4, **good, **override}
        with pytest.raises(error, match=message):
            audit_log.record_head(arguments.pop("run_id"), arguments.pop("round"), data, **arguments)
    with pytest.raises(UnknownVersionError):
        audit_log.record_deployment("clinic-a", "h17")
    with pytest.raises(InvalidRecordError, match="reason"):
        audit_log.record_rejection("run-1", 4, "clinic-a", "  ")
    assert ledger_count(audit_log) == HISTORY_LENGTH
    assert audit_log.verify().ok
    with pytest.raises(UnknownArtifactError):
        audit_log.get_artifact(sha256_hex(data))


# --------------------------------------------------------------------------- rollback


def test_rollback_makes_an_earlier_version_current_and_is_recorded(
    audit_log: AuditLog, history: dict[str, Any]
) -> None:
    entry = audit_log.rollback("h2", reason="accuracy regression at clinic-b", actor="dpo@clinic-a")
    assert entry.kind == "rollback" and entry.seq == HISTORY_LENGTH + 1
    assert dict(entry.body) == {
        "version": "h2",
        "previous_version": "h3",
        "reason": "accuracy regression at clinic-b",
        "actor": "dpo@clinic-a",
    }
    assert audit_log.current_version() == "h2"
    with pytest.raises(InvalidRecordError, match="h2 is already the current head version"):
        audit_log.rollback("h2")
    with pytest.raises(UnknownVersionError):
        audit_log.rollback("h77")
    # Rolling forward again is a rollback too; a new round's head becomes current.
    audit_log.rollback("h3")
    assert audit_log.current_version() == "h3"
    audit_log.rollback(history["h1"].sha256[:12])
    h4 = audit_log.record_head(
        "run-2",
        1,
        head_npz(4),
        parent="current",
        strategy="FedAvg",
        strategy_config={},
        participants=[],
        aggregate_metrics={},
    )
    assert h4.parent == "h1"
    assert audit_log.current_version() == "h4"
    assert audit_log.current_version("backbone") == "b1"
    assert audit_log.verify().ok


def test_cli_rollback(db_url: str, key_path: Path, history: dict[str, Any]) -> None:
    result = run_cli(
        "rollback", "h1", "--reason", "bad round", "--actor", "alice", "--db", db_url, "--key", str(key_path)
    )
    assert result.exit_code == 0, result.output
    assert "h1 is now current (was h3); recorded as entry #9" in result.stdout
    result = run_cli("rollback", "h1", "--db", db_url, "--key", str(key_path), "--json")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: h1 is already the current head version"
    with AuditLog.open(db_url, key_path) as log:
        assert log.current_version() == "h1"
        rollback = log.entries(EntryFilter(kinds=("rollback",)))[-1]
        assert rollback.body["actor"] == "alice" and rollback.body["reason"] == "bad round"
    # Rolling back needs the coordinator's key; it is never created on the fly.
    result = run_cli("rollback", "h2", "--db", db_url, "--key", str(key_path.parent / "missing.pem"))
    assert result.exit_code == 2
    assert "signing key not found" in result.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{bad", "Expecting property name"),
        ("[]", "not an entry object with a body"),
        ('{"seq": 3}', "not an entry object with a body"),
        ('{"seq": 3, "kind": "head", "created_at": "yesterday", "prev_hash": "", "signer": "", "body": {}}', "Invalid isoformat"),
        ('{"seq": "3", "kind": "head", "created_at": "2026-01-01", "prev_hash": "", "signer": "", "body": {}}', "not a whole number"),
        ('{"seq": 3, "kind": "head", "created_at": "2026-01-01", "prev_hash": "", "signer": "", "body": {}}', "its head record lacks version, number, sha256, size"),
        ('{"seq": 3, "kind": "note", "created_at": "2026-01-01", "prev_hash": "", "signer": "", "body": {}}', "unknown entry kind 'note'"),
    ],
)
def test_a_damaged_entry_is_named_by_every_reading_command(
    db_url: str, key_path: Path, history: dict[str, Any], audit_log: AuditLog, content: str, reason: str
) -> None:
    """Edited rows are what a tamper-evident log exists to show: reading it must name the entry
    (and point at verify), not die with a JSON or key error; the other entries stay readable."""
    with audit_log.engine.begin() as connection:
        connection.execute(update(EntryRow.__table__).where(EntryRow.seq == 3).values(content=content))
    for command in (["audit", "log"], ["audit", "show", "h2"], ["audit", "diff", "h1", "h2"], ["audit", "export"]):
        result = run_cli(*command, "--db", db_url)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.startswith("error: audit entry #3 is damaged (") and reason in result.stderr, (command, result.stderr)
    assert [e.seq for e in audit_log.entries(EntryFilter(kinds=("backbone",)))] == [1]
    verdict = run_cli("audit", "verify", "--db", db_url, "--key", str(key_path))
    assert verdict.exit_code == 1 and "entry #3" in verdict.output


# --------------------------------------------------------------------------- verification


def test_untouched_log_verifies(audit_log: AuditLog, history: dict[str, Any], db_url: str, key_path: Path) -> None:
    report = audit_log.verify()
    assert report.ok, report.problems
    assert report.entries_checked == HISTORY_LENGTH
    assert report.artifacts_checked == 4
    assert report.head_seq == HISTORY_LENGTH
    assert report.head_hash == audit_log.entries()[-1].entry_hash
    result = run_cli("audit", "verify", "--db", db_url, "--key", str(key_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"OK: {HISTORY_LENGTH} entries and 4 artefacts verified")


def _ledger(connection: Any) -> dict[int, dict[str, Any]]:
    rows = connection.execute(select(EntryRow.__table__).order_by(EntryRow.seq)).mappings()
    return {row["seq"]: dict(row) for row in rows}


def _set_row(connection: Any, seq: int, row: dict[str, Any]) -> None:
    values = {name: value for name, value in row.items() if name != "seq"}
    connection.execute(update(EntryRow.__table__).where(EntryRow.seq == seq).values(**values))


def _placeholder_hash(seq: int) -> str:
    return f"{seq:064d}"


def _forged_row(original: dict[str, Any], body: dict[str, Any], kind: str) -> dict[str, Any]:
    """A well-formed entry with a correct hash and link, signed by a key that is not the coordinator's."""
    impostor = Signer(Ed25519PrivateKey.generate())
    document = {
        "seq": original["seq"],
        "kind": kind,
        "created_at": format_time(original["created_at"]),
        "prev_hash": original["prev_hash"],
        "signer": original["signer"],
        "body": body,
    }
    content = canonical_json(document)
    digest = sha256_hex(content)
    return {
        **original,
        "kind": kind,
        "version": body.get("version"),
        "run_id": None,
        "round": None,
        "entry_hash": digest,
        "signature": impostor.sign_entry(digest),
        "content": content,
    }


def tamper_edit_content(connection: Any) -> None:
    row = _ledger(connection)[3]
    connection.execute(
        update(EntryRow.__table__)
        .where(EntryRow.seq == 3)
        .values(content=row["content"].replace('"num_examples":40', '"num_examples":400'))
    )


def tamper_edit_and_rehash(connection: Any) -> None:
    row = _ledger(connection)[3]
    content = row["content"].replace('"accuracy":0.76', '"accuracy":0.96')
    assert content != row["content"]
    connection.execute(
        update(EntryRow.__table__).where(EntryRow.seq == 3).values(content=content, entry_hash=sha256_hex(content))
    )


def tamper_edit_projection(connection: Any) -> None:
    connection.execute(
        update(Participant.__table__)
        .where(Participant.version == "h2", Participant.clinic_id == "clinic-c")
        .values(num_examples=4000)
    )


def tamper_edit_mirrored_column(connection: Any) -> None:
    connection.execute(update(EntryRow.__table__).where(EntryRow.seq == 5).values(run_id="run-9"))


def tamper_delete_middle(connection: Any) -> None:
    connection.execute(delete(Deployment.__table__).where(Deployment.seq == 4))
    connection.execute(delete(EntryRow.__table__).where(EntryRow.seq == 4))


def tamper_delete_last(connection: Any) -> None:
    connection.execute(delete(Deployment.__table__).where(Deployment.seq == 8))
    connection.execute(delete(EntryRow.__table__).where(EntryRow.seq == 8))


def tamper_insert_middle(connection: Any) -> None:
    """Shift entries 4..8 to 5..9 and put a forged deployment at 4, linked correctly to entry 3."""
    ledger = _ledger(connection)
    for seq in range(4, 9):
        connection.execute(
            update(EntryRow.__table__).where(EntryRow.seq == seq).values(entry_hash=_placeholder_hash(seq))
        )
    connection.execute(insert(EntryRow.__table__).values(**{**ledger[8], "seq": 9}))
    for seq in range(8, 4, -1):
        _set_row(connection, seq, ledger[seq - 1])
    _set_row(connection, 4, _forged_row(ledger[4], {"clinic_id": "clinic-x", "version": "h1"}, "deployment"))


def tamper_insert_at_end(connection: Any) -> None:
    last = _ledger(connection)[8]
    template = {**last, "seq": 9, "prev_hash": last["entry_hash"]}
    forged = _forged_row(template, {"clinic_id": "clinic-x", "version": "h1"}, "deployment")
    connection.execute(insert(EntryRow.__table__).values(**forged))


def tamper_reorder(connection: Any) -> None:
    """Swap entries 4 and 5 (everything but the position)."""
    ledger = _ledger(connection)
    connection.execute(update(EntryRow.__table__).where(EntryRow.seq == 4).values(entry_hash=_placeholder_hash(4)))
    _set_row(connection, 5, ledger[4])
    _set_row(connection, 4, ledger[5])


def tamper_modify_artifact(connection: Any) -> None:
    digest = connection.execute(select(EntryRow.content).where(EntryRow.seq == 3)).scalar_one()
    sha = json.loads(digest)["body"]["sha256"]
    data = connection.execute(select(Artifact.data).where(Artifact.sha256 == sha)).scalar_one()
    middle = len(data) // 2
    flipped = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
    connection.execute(update(Artifact.__table__).where(Artifact.sha256 == sha).values(data=flipped))


TAMPER_CASES = [
    # (tamper, problem named, entry named, kind named)
    pytest.param(tamper_edit_content, "edited", 3, "head", id="edited-content"),
    pytest.param(tamper_edit_and_rehash, "edited", 3, "head", id="edited-and-rehashed"),
    pytest.param(tamper_edit_projection, "edited", 3, "head", id="edited-typed-row"),
    pytest.param(tamper_edit_mirrored_column, "edited", 5, "rejection", id="edited-ledger-column"),
    pytest.param(tamper_delete_middle, "deleted", 4, None, id="deleted-middle"),
    pytest.param(tamper_delete_last, "deleted", 8, None, id="deleted-last"),
    pytest.param(tamper_insert_middle, "inserted", 4, "deployment", id="inserted-middle"),
    pytest.param(tamper_insert_at_end, "inserted", 9, "deployment", id="inserted-at-end"),
    pytest.param(tamper_reorder, "reordered", 4, "rejection", id="reordered"),
    pytest.param(tamper_modify_artifact, "artifact-modified", 3, "head", id="modified-artifact"),
]


@pytest.mark.parametrize(("tamper", "problem", "seq", "kind"), TAMPER_CASES)
def test_verify_names_the_first_bad_entry(
    audit_log: AuditLog,
    history: dict[str, Any],
    db_url: str,
    key_path: Path,
    tamper: Any,
    problem: str,
    seq: int,
    kind: str | None,
) -> None:
    assert audit_log.verify().ok
    # Tampering goes around the AuditLog, as someone with database access would.
    raw = create_engine(db_url)
    with raw.begin() as connection:
        tamper(connection)
    raw.dispose()

    report = audit_log.verify()
    assert not report.ok
    first = report.first_problem
    assert first is not None
    assert (first.problem, first.seq) == (problem, seq), report.problems
    if kind is not None:
        assert first.kind == kind

    result = run_cli("audit", "verify", "--db", db_url, "--key", str(key_path))
    assert result.exit_code == 1, result.output
    first_line = result.stdout.splitlines()[0]
    assert re.match(rf"FAILED: entry #{seq}\b", first_line), first_line
    assert f": {problem}: " in first_line
    result = run_cli("audit", "verify", "--db", db_url, "--key", str(key_path), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_problem"]["problem"] == problem


def test_modified_artifact_is_never_served(audit_log: AuditLog, history: dict[str, Any], db_url: str) -> None:
    raw = create_engine(db_url)
    with raw.begin() as connection:
        tamper_modify_artifact(connection)
    raw.dispose()
    with pytest.raises(StoreError, match="has been modified"):
        audit_log.artifact_of("h2")
    assert audit_log.artifact_of("h1") == history["artefacts"]["h1"]


def test_forged_chain_head_is_detected(audit_log: AuditLog, history: dict[str, Any], db_url: str) -> None:
    raw = create_engine(db_url)
    with raw.begin() as connection:
        connection.execute(update(ChainHead.__table__).values(seq=7))
    raw.dispose()
    first = audit_log.verify().first_problem
    assert first is not None and first.problem == "edited" and first.kind == "chain head"


def test_a_log_emptied_back_to_its_start_fails_against_a_kept_entry(
    audit_log: AuditLog, history: dict[str, Any], db_url: str, key_path: Path
) -> None:
    # Emptied with its chain head, a log looks new from inside the database; only an entry hash
    # kept elsewhere (the chain head an earlier verify printed) tells.
    kept = audit_log.verify().head_hash
    earlier = audit_log.entries()[2].entry_hash
    verify = ("audit", "verify", "--db", db_url, "--key", str(key_path))
    result = run_cli(*verify, "--expect-entry", kept, "--expect-entry", earlier.upper())
    assert result.exit_code == 0, result.output

    raw = create_engine(db_url)
    with raw.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name.startswith("audit_") and table.name != ChainHead.__tablename__:
                connection.execute(delete(table))
        # back to the state a new log starts in (migration 0001)
        connection.execute(update(ChainHead.__table__).values(seq=0, entry_hash="0" * 64, signer=None, signature=None))
    raw.dispose()
    assert audit_log.entries() == []
    assert audit_log.verify().ok  # the documented blind spot
    result = run_cli(*verify, "--expect-entry", kept)
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith(f"FAILED: the log: deleted: entry {kept} (kept outside the log) is not in it")
    report = audit_log.verify(kept_entries=[kept, earlier])
    assert [p.problem for p in report.problems] == ["deleted", "deleted"]

    result = run_cli(*verify, "--expect-entry", kept[:12])
    assert result.exit_code == 2 and f"'{kept[:12]}' is not an entry hash" in result.output, result.output


# --------------------------------------------------------------------------- keys


def test_signing_key_file_is_private_and_reused(tmp_path: Path, db_url: str) -> None:
    key_path = tmp_path / "fresh" / "key.pem"
    with AuditLog.open(db_url, key_path) as log:
        log.record_backbone(b"bundle")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    fingerprint = load_signer(key_path).fingerprint
    with AuditLog.open(db_url, key_path) as log:
        entry = log.record_deployment("clinic-a", "b1")
        assert entry.signer == fingerprint
        assert log.verify().ok

    # A wrong or mistyped key is refused when the log is opened for writing (qana-server start's
    # check), not at the first write of a run; a missing one is not created, as it could never sign.
    other_key = tmp_path / "other.pem"
    with pytest.raises(SigningKeyError, match=f"signing key not found: {other_key} \\(this log is signed by key {fingerprint}\\)"):
        AuditLog.open(db_url, other_key)
    assert not other_key.exists()
    load_or_create_signer(other_key)  # someone else's key
    with pytest.raises(SigningKeyError, match=f"this log is signed by key {fingerprint}, but the signing key"):
        AuditLog.open(db_url, other_key)
    with AuditLog.open(db_url, sign=False) as reader:
        report = reader.verify(load_verifier(other_key))
        assert not report.ok and report.first_problem is not None
        assert report.first_problem.problem == "wrong-key"
        assert ledger_count(reader) == 2

    # A regulator verifies with the public key alone, which `audit public-key` writes.
    public_pem = tmp_path / "coordinator.pub.pem"
    result = run_cli("audit", "public-key", "--key", str(key_path), "--output", str(public_pem))
    assert result.exit_code == 0, result.output
    assert public_pem.read_bytes() == load_signer(key_path).public_pem() and b"PRIVATE" not in public_pem.read_bytes()
    result = run_cli("audit", "verify", "--audit-db", db_url, "--key", str(public_pem))  # start's spelling works too
    assert result.exit_code == 0, result.output
    result = run_cli("audit", "verify", "--db", db_url, "--key", str(other_key))
    assert result.exit_code == 1, result.output
    # An existing file is never overwritten.
    kept = public_pem.read_bytes()
    result = run_cli("audit", "public-key", "--key", str(other_key), "--output", str(public_pem))
    assert result.exit_code != 0 and "already exists" in result.output and public_pem.read_bytes() == kept


def test_defaults_come_from_environment_or_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QANA_AUDIT_DB", raising=False)
    monkeypatch.delenv("QANA_AUDIT_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_url() == f"sqlite:///{tmp_path / '.qana' / 'audit.db'}"
    assert default_key_path() == tmp_path / ".qana" / "audit_key.pem"
    monkeypatch.setenv("QANA_AUDIT_DB", "sqlite:////elsewhere/audit.db")
    monkeypatch.setenv("QANA_AUDIT_KEY", str(tmp_path / "k.pem"))
    assert default_db_url() == "sqlite:////elsewhere/audit.db"
    assert default_key_path() == tmp_path / "k.pem"


# --------------------------------------------------------------------------- transactions and concurrency

_WRITER = textwrap.dedent(
    """
    import sys
    from server.audit import AuditLog
    url, key, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with AuditLog.open(url, key) as log:
        for index in range(count):
            log.record_rejection("concurrency", index, name, "stress test")
            log.record_head("concurrency", index, f"{name}-{index}".encode(), parent=None, strategy="FedAvg",
                            strategy_config={}, participants=[], aggregate_metrics={})
    """
)


def test_concurrent_writers_never_break_the_chain(db_url: str, key_path: Path) -> None:
    AuditLog.open(db_url, key_path).close()  # one key, created before the race
    per_writer = 6
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db_url, str(key_path), f"process-{number}", str(per_writer)],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(2)
    ]
    shared = AuditLog.open(db_url, key_path)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def write(name: str) -> None:
        try:
            start.wait()
            for index in range(per_writer):
                shared.record_rejection("concurrency", index, name, "stress test")
                shared.record_head(
                    "concurrency",
                    index,
                    f"{name}-{index}".encode(),
                    parent=None,
                    strategy="FedAvg",
                    strategy_config={},
                    participants=[],
                    aggregate_metrics={},
                )
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"thread-{number}",)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert not errors, errors

    writers = 6
    total = writers * per_writer * 2
    report = shared.verify()
    assert report.ok, report.problems
    entries = shared.entries()
    assert [entry.seq for entry in entries] == list(range(1, total + 1))
    heads = sorted(int(entry.version[1:]) for entry in entries if entry.kind == "head")
    assert heads == list(range(1, writers * per_writer + 1))
    per_name: dict[str, int] = {}
    for entry in entries:
        if entry.kind == "rejection":
            per_name[entry.body["clinic_id"]] = per_name.get(entry.body["clinic_id"], 0) + 1
    assert per_name == {name: per_writer for name in [f"thread-{n}" for n in range(4)] + ["process-0", "process-1"]}
    shared.close()


def test_failure_inside_a_write_leaves_nothing_behind(
    audit_log: AuditLog, history: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.audit.store as store_module

    real_projection_rows = store_module.projection_rows

    def failing_projection_rows(document: Any) -> Any:
        raise RuntimeError("simulated failure after the ledger row and artefact were written")

    monkeypatch.setattr(store_module, "projection_rows", failing_projection_rows)
    data = head_npz(10)
    with pytest.raises(RuntimeError, match="simulated failure"):
        audit_log.record_head(
            "run-1", 4, data, parent="h3", strategy="FedAvg", strategy_config={}, participants=[], aggregate_metrics={}
        )
    monkeypatch.setattr(store_module, "projection_rows", real_projection_rows)

    assert ledger_count(audit_log) == HISTORY_LENGTH
    with pytest.raises(UnknownArtifactError):
        audit_log.get_artifact(sha256_hex(data))
    assert audit_log.current_version() == "h3"
    assert audit_log.verify().ok
    h4 = audit_log.record_head(
        "run-1", 4, data, parent="h3", strategy="FedAvg", strategy_config={}, participants=[], aggregate_metrics={}
    )
    assert (h4.version, h4.seq) == ("h4", HISTORY_LENGTH + 1)


_CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import server.audit.store as store
    from server.audit import AuditLog

    def die(document):
        os._exit(17)  # the process vanishes mid-transaction: no rollback, no cleanup

    store.projection_rows = die
    with AuditLog.open(sys.argv[1], sys.argv[2]) as log:
        log.record_head("run-1", 4, b"never committed", parent="h3", strategy="FedAvg",
                        strategy_config={}, participants=[], aggregate_metrics={})
    """
)


def test_process_killed_mid_write_leaves_no_half_written_version(
    audit_log: AuditLog, history: dict[str, Any], db_url: str, key_path: Path
) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, db_url, str(key_path)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == 17, crashed.stderr
    assert ledger_count(audit_log) == HISTORY_LENGTH
    with pytest.raises(UnknownArtifactError):
        audit_log.get_artifact(sha256_hex(b"never committed"))
    assert audit_log.verify().ok
    assert audit_log.record_rejection("run-1", 4, "clinic-a", "after the crash").seq == HISTORY_LENGTH + 1


def test_migrations_match_the_models(audit_log: AuditLog) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with audit_log.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": "audit_alembic_version", "compare_type": True}
        )
        assert compare_metadata(context, Base.metadata) == []


# --------------------------------------------------------------------------- CLI


def test_cli_log_show_and_filters(db_url: str, history: dict[str, Any]) -> None:
    result = run_cli("audit", "log", "--db", db_url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "time", "(UTC)", "kind", "version", "run", "round", "details"]
    assert len(lines) == 2 + HISTORY_LENGTH
    assert "update from clinic-d rejected: update norm 41.2 exceeds the clip bound 10" in result.stdout
    assert "class 'vascular lesion' added by clinic-b" in result.stdout

    result = run_cli("audit", "log", "--db", db_url, "--clinic", "clinic-a", "--json")
    assert result.exit_code == 0, result.output
    assert [entry["seq"] for entry in json.loads(result.stdout)] == [2, 3, 4, 7]
    result = run_cli("audit", "log", "--db", db_url, "--kind", "head", "--run", "run-1", "--json")
    assert [entry["body"]["version"] for entry in json.loads(result.stdout)] == ["h1", "h2", "h3"]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    result = run_cli("audit", "log", "--db", db_url, "--since", tomorrow)
    assert result.exit_code == 0 and result.stdout.strip() == "no matching entries"
    result = run_cli("audit", "log", "--db", db_url, "--until", datetime.now(UTC).date().isoformat(), "--json")
    assert len(json.loads(result.stdout)) == HISTORY_LENGTH  # a bare date includes the whole day

    result = run_cli("audit", "show", "h2", "--db", db_url)
    assert result.exit_code == 0, result.output
    assert "clinic-c" in result.stdout and history["h2"].sha256 in result.stdout
    result = run_cli("audit", "show", history["h3"].sha256[:10], "--db", db_url, "--json")
    shown = json.loads(result.stdout)
    assert shown["version"] == "h3" and shown["current"] is True
    assert [d["clinic_id"] for d in shown["deployments"]] == ["clinic-b"]
    assert shown["parent"] == "h2" and shown["backbone"] == "b1"


def test_cli_diff_reports_metrics_and_weight_change(db_url: str, history: dict[str, Any]) -> None:
    result = run_cli("audit", "diff", "h1", "h2", "--db", db_url, "--json")
    assert result.exit_code == 0, result.output
    difference = json.loads(result.stdout)
    metrics = {m["name"]: m for m in difference["metrics"]}
    assert metrics["accuracy"]["delta"] == pytest.approx(0.76 - 0.71)
    assert {p["clinic_id"]: (p["examples_before"], p["examples_after"]) for p in difference["participants"]} == {
        "clinic-a": (120, 120),
        "clinic-b": (80, 80),
        "clinic-c": (None, 40),
    }
    with np.load(io.BytesIO(history["artefacts"]["h1"])) as old, np.load(io.BytesIO(history["artefacts"]["h2"])) as new:
        expected = float(np.linalg.norm(new["weights"].astype(np.float64) - old["weights"].astype(np.float64)))
    arrays = {a["name"]: a for a in difference["arrays"]}
    assert arrays["weights"]["compared"] == "all"
    assert arrays["weights"]["l2_difference"] == pytest.approx(expected)

    # h3 gained a class: the arrays grew, and the overlapping block is compared.
    result = run_cli("audit", "diff", "h2", "h3", "--db", db_url, "--json")
    arrays = {a["name"]: a for a in json.loads(result.stdout)["arrays"]}
    assert arrays["weights"]["shape_before"] == [5, 16] and arrays["weights"]["shape_after"] == [6, 16]
    assert arrays["weights"]["compared"] == "overlap"
    assert {m["name"]: m["after"] for m in json.loads(result.stdout)["metrics"]}["loss"] == "NaN"

    result = run_cli("audit", "diff", "h1", "h2", "--db", db_url)
    assert result.exit_code == 0
    assert "weights" in result.stdout and "accuracy" in result.stdout and "clinic-c" in result.stdout
    result = run_cli("audit", "diff", "b1", "h1", "--db", db_url, "--json")
    assert json.loads(result.stdout)["arrays"] is None


@pytest.mark.parametrize("export_format", ["jsonl", "csv"])
def test_cli_export_is_independently_checkable(
    db_url: str, key_path: Path, history: dict[str, Any], tmp_path: Path, export_format: str
) -> None:
    output = tmp_path / f"audit.{export_format}"
    result = run_cli("audit", "export", "--format", export_format, "--output", str(output), "--db", db_url)
    assert result.exit_code == 0, result.output
    text_out = output.read_text(encoding="utf-8")
    if export_format == "jsonl":
        records = [json.loads(line) for line in text_out.splitlines()]
    else:
        records = list(csv.DictReader(io.StringIO(text_out)))
    assert len(records) == HISTORY_LENGTH
    verifier = load_signer(key_path).verifier
    previous = "0" * 64
    for position, record in enumerate(records, start=1):
        assert int(record["seq"]) == position
        assert sha256_hex(record["content"]) == record["entry_hash"]
        assert json.loads(record["content"])["prev_hash"] == previous == record["prev_hash"]
        assert verifier.entry_signature_ok(record["entry_hash"], record["signature"])
        previous = record["entry_hash"]
    # To standard output, filtered.
    result = run_cli("audit", "export", "--db", db_url, "--clinic", "clinic-d")
    assert [json.loads(line)["kind"] for line in result.stdout.splitlines()] == ["rejection"]
    # An existing file - an earlier export, or the database itself - is never overwritten.
    again = run_cli("audit", "export", "--format", export_format, "--output", str(output), "--db", db_url)
    assert again.exit_code == 2 and "already exists; not overwritten" in again.output, again.output
    assert output.read_text(encoding="utf-8") == text_out
    if db_url.startswith("sqlite:///"):
        database = db_url.removeprefix("sqlite:///")
        onto_db = run_cli("audit", "export", "--output", database, "--db", db_url)
        assert onto_db.exit_code == 2 and "already exists" in onto_db.output
        assert run_cli("audit", "verify", "--db", db_url, "--key", str(key_path)).exit_code == 0


def test_cli_bad_input_is_one_clear_line_and_loses_nothing(
    db_url: str, key_path: Path, history: dict[str, Any], tmp_path: Path
) -> None:
    cases = [
        (("audit", "show", "h99", "--db", db_url), "error: unknown version 'h99'"),
        (("audit", "diff", "h1", "nope", "--db", db_url), "error: unknown version 'nope'"),
        (("audit", "log", "--db", "not a url"), "error: not a database URL: 'not a url'"),
        (("audit", "log", "--db", "nosuchdb://x/y"), "error: unsupported database URL scheme: 'nosuchdb'"),
        (("audit", "log", "--db", f"sqlite:///{tmp_path / 'typo.db'}"), "error: no audit database at"),
        (("audit", "export", "--format", "xml", "--db", db_url), "error: unknown export format 'xml'"),
        (("audit", "log", "--since", "last tuesday", "--db", db_url), "error: --since: not an ISO 8601"),
        (("audit", "log", "--since", "0001-01-01T00:00+05:00", "--db", db_url), "error: --since: '0001-01-01T00:00+05:00' is out of range in UTC"),
        (("audit", "log", "--kind", "heads", "--db", db_url), "error: unknown entry kind(s): heads"),
        (("audit", "verify", "--db", db_url, "--key", str(tmp_path / "none.pem")), "error: signing key not found"),
        (("rollback", "h99", "--db", db_url, "--key", str(key_path)), "error: unknown version 'h99'"),
    ]
    for arguments, message in cases:
        result = run_cli(*arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert result.stderr.startswith(message), (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "typo.db").exists()
    # A missing argument is a usage error, not a silent success.
    result = run_cli("audit", "show", "--db", db_url)
    assert result.exit_code != 0
    with AuditLog.open(db_url, key_path) as log:
        assert ledger_count(log) == HISTORY_LENGTH
        assert log.verify().ok
        assert log.current_version() == "h3"


def test_reading_commands_leave_a_database_without_an_audit_log_untouched(tmp_path: Path) -> None:
    """`audit log --db sqlite:///.../superlink.db` (the SuperLink's own file, an easy mix-up) must
    be refused by name: migrating it would add the audit tables, switch it to WAL and then show
    an empty, "verified" log."""
    import sqlite3

    other = tmp_path / "superlink.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE run (run_id INTEGER PRIMARY KEY)")
    connection.close()
    empty = tmp_path / "empty.db"
    empty.touch()
    for database, holds in ((other, "(its tables: run)"), (empty, "(it is empty)")):
        before = database.read_bytes()
        for command in (("audit", "log"), ("audit", "show", "h1"), ("audit", "export")):
            result = run_cli(*command, "--db", f"sqlite:///{database}")
            assert result.exit_code == 2, (command, result.output)
            assert result.stderr.startswith(f"error: no QANA audit log in sqlite:///{database} {holds}"), result.stderr
        assert database.read_bytes() == before
        assert not Path(f"{database}-wal").exists()
        with sqlite3.connect(database) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        connection.close()


def test_until_the_last_representable_day_shows_everything(db_url: str, history: dict[str, Any]) -> None:
    """`--until 9999-12-31` is the natural "until forever"; its end of day must not overflow."""
    for command in (("audit", "log", "--json"), ("audit", "export")):
        result = run_cli(*command, "--until", "9999-12-31", "--db", db_url)
        assert result.exit_code == 0, result.output
    assert len(json.loads(run_cli("audit", "log", "--json", "--until", "9999-12-31", "--db", db_url).stdout)) == HISTORY_LENGTH


def test_cli_help_explains_commands() -> None:
    result = run_cli("audit", "--help")
    assert result.exit_code == 0
    for command in ("log", "show", "diff", "verify", "export"):
        assert command in result.stdout
    result = run_cli("rollback", "--help")
    assert result.exit_code == 0 and "current again" in result.stdout


def test_rejection_table_is_queryable_with_plain_sql(audit_log: AuditLog, history: dict[str, Any]) -> None:
    """A data-protection officer can answer questions without our code."""
    with audit_log.engine.connect() as connection:
        rows = connection.execute(
            select(Rejection.clinic_id, Rejection.reason, EntryRow.created_at).join(
                EntryRow, EntryRow.seq == Rejection.seq
            )
        ).all()
    assert [(row.clinic_id, row.reason) for row in rows] == [("clinic-d", "update norm 41.2 exceeds the clip bound 10")]
