"""From a signed entry to database rows, and nothing else.

The same functions serve the writer (which inserts the rows) and the verifier
(which rebuilds the rows from signed content and compares them with what is
stored).  Keeping one definition is what makes "the typed tables say exactly what
the ledger says" checkable.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import inspect

from server.audit.canonical import canonical_json
from server.audit.models import (
    Base,
    ClassAddition,
    Deployment,
    ModelVersion,
    Participant,
    Rejection,
    Rollback,
)
from server.audit.records import (
    KIND_CLASS_ADDITION,
    KIND_DEPLOYMENT,
    KIND_EVALUATION,
    KIND_REJECTION,
    KIND_ROLLBACK,
    VERSION_KINDS,
    format_time,
)

Row = dict[str, Any]

# Entry columns that duplicate signed content, and where in the content they live.
ENTRY_MIRRORED_COLUMNS = ("kind", "created_at", "version", "run_id", "round", "prev_hash", "signer")


def entry_row(document: Mapping[str, Any], content: str, entry_hash: str, signature: str) -> Row:
    """The audit_entries row for a signed document."""
    body = document["body"]
    return {
        "seq": document["seq"],
        "kind": document["kind"],
        "created_at": datetime.fromisoformat(document["created_at"]),
        "version": body.get("version"),
        "run_id": body.get("run_id"),
        "round": body.get("round"),
        "prev_hash": document["prev_hash"],
        "entry_hash": entry_hash,
        "signer": document["signer"],
        "signature": signature,
        "content": content,
    }


def mirrored_entry_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable part of an entries row (times normalised to one text form)."""
    fields = {name: row[name] for name in ENTRY_MIRRORED_COLUMNS}
    fields["created_at"] = format_time(fields["created_at"])
    return fields


def projection_rows(document: Mapping[str, Any]) -> list[tuple[type[Base], Row]]:
    """The typed-table rows a signed document implies."""
    seq = document["seq"]
    kind = document["kind"]
    body = document["body"]
    if kind in VERSION_KINDS:
        rows: list[tuple[type[Base], Row]] = [
            (
                ModelVersion,
                {
                    "version": body["version"],
                    "seq": seq,
                    "kind": kind,
                    "number": body["number"],
                    "sha256": body["sha256"],
                    "size": body["size"],
                    "parent": body.get("parent"),
                    "backbone": body.get("backbone"),
                    "run_id": body.get("run_id"),
                    "round": body.get("round"),
                    "strategy": body.get("strategy"),
                    "strategy_config": canonical_json(body.get("strategy_config") or {}),
                    "aggregate_metrics": canonical_json(body.get("aggregate_metrics") or {}),
                    "note": body.get("note"),
                },
            )
        ]
        for participant in body.get("participants") or ():
            rows.append(
                (
                    Participant,
                    {
                        "version": body["version"],
                        "clinic_id": participant["clinic_id"],
                        "seq": seq,
                        "num_examples": participant["num_examples"],
                        "metrics": canonical_json(participant.get("metrics") or {}),
                    },
                )
            )
        return rows
    if kind == KIND_DEPLOYMENT:
        return [(Deployment, {"seq": seq, "clinic_id": body["clinic_id"], "version": body["version"]})]
    if kind == KIND_REJECTION:
        return [
            (
                Rejection,
                {
                    "seq": seq,
                    "run_id": body["run_id"],
                    "round": body["round"],
                    "clinic_id": body["clinic_id"],
                    "reason": body["reason"],
                },
            )
        ]
    if kind == KIND_CLASS_ADDITION:
        return [
            (
                ClassAddition,
                {
                    "seq": seq,
                    "run_id": body["run_id"],
                    "round": body["round"],
                    "class_name": body["class_name"],
                    "clinic_id": body["clinic_id"],
                },
            )
        ]
    if kind == KIND_ROLLBACK:
        return [
            (
                Rollback,
                {
                    "seq": seq,
                    "version": body["version"],
                    "previous_version": body.get("previous_version"),
                    "reason": body.get("reason"),
                    "actor": body.get("actor"),
                },
            )
        ]
    if kind == KIND_EVALUATION:
        return []  # found through the entries table's version column; no typed table
    raise ValueError(f"unknown entry kind {kind!r}")


def primary_key(model: type[Base], row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A row's primary-key values, in the table's key order."""
    return tuple(row[column.key] for column in inspect(model).primary_key)


def column_names(model: type[Base]) -> tuple[str, ...]:
    return tuple(column.key for column in inspect(model).columns)
