"""Exporting ledger entries for regulators, spreadsheets and independent checks.

Each record carries the exact signed text (``content``) with its hash, previous
hash and signature, so whoever receives an export can re-hash the text and check
the Ed25519 signature with the coordinator's public key, without our software.
Convenience columns (kind, version, run, clinic...) are copies of the content.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

from server.audit.errors import InvalidRecordError
from server.audit.records import Entry, format_time

EXPORT_FORMATS = ("jsonl", "csv")
EXPORT_COLUMNS = (
    "seq",
    "kind",
    "created_at",
    "version",
    "run_id",
    "round",
    "prev_hash",
    "entry_hash",
    "signer",
    "signature",
    "content",
)


def export_record(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "kind": entry.kind,
        "created_at": format_time(entry.created_at),
        "version": entry.version,
        "run_id": entry.run_id,
        "round": entry.round,
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
        "signer": entry.signer,
        "signature": entry.signature,
        "content": entry.content,
    }


def write_export(entries: Iterable[Entry], export_format: str, out: TextIO) -> int:
    """Write entries in ``jsonl`` or ``csv``; returns how many were written."""
    if export_format not in EXPORT_FORMATS:
        raise InvalidRecordError(f"unknown export format {export_format!r} (choose {' or '.join(EXPORT_FORMATS)})")
    count = 0
    if export_format == "jsonl":
        for entry in entries:
            out.write(json.dumps(export_record(entry), ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({key: "" if value is None else value for key, value in export_record(entry).items()})
        count += 1
    return count
