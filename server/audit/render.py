"""Plain-text tables and one-line summaries for the audit CLI.

Deliberately plain (no colours, no box drawing, no wrapping): the output is read
by people in terminals, pasted into tickets and grepped, and must look the same
in all of those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from server.audit.records import (
    KIND_BACKBONE,
    KIND_CLASS_ADDITION,
    KIND_DEPLOYMENT,
    KIND_EVALUATION,
    KIND_HEAD,
    KIND_REJECTION,
    KIND_ROLLBACK,
    Entry,
    format_time,
)

_MAX_CELL = 80


def cell(value: Any, max_width: int | None = _MAX_CELL) -> str:
    """A value as table text: floats to 6 significant digits, None as '-', long text cut."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value).replace("\n", " ")
    if max_width is None or len(text) <= max_width:
        return text
    return text[: max_width - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the headers.

    Cells are cut at 80 characters except in the last column, which has the room.
    """
    last = len(headers) - 1
    body = [[cell(value, None if index == last else _MAX_CELL) for index, value in enumerate(row)] for row in rows]
    widths = [len(header) for header in headers]
    for row in body:
        widths = [max(width, len(text)) for width, text in zip(widths, row, strict=True)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in body)
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """Aligned ``name: value`` lines."""
    items = [(name, cell(value)) for name, value in pairs]
    width = max((len(name) for name, _ in items), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in items)


def short_hash(digest: str | None, length: int = 12) -> str:
    return "-" if not digest else digest[:length]


def metrics_text(metrics: Mapping[str, Any], limit: int = 4) -> str:
    """``acc=0.81 loss=0.43`` for the first few metrics, sorted by name."""
    names = sorted(metrics)
    shown = " ".join(f"{name}={cell(metrics[name])}" for name in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def entry_summary(entry: Entry) -> str:
    """What an entry says, in one line."""
    body = entry.body
    if entry.kind in (KIND_HEAD, KIND_BACKBONE):
        participants = body.get("participants") or []
        parts = [f"parent {body.get('parent') or '-'}"]
        if body.get("backbone"):
            parts.append(f"backbone {body['backbone']}")
        if participants:
            examples = sum(p["num_examples"] for p in participants)
            parts.append(f"{len(participants)} clinic(s), {examples} examples")
        if body.get("aggregate_metrics"):
            parts.append(metrics_text(body["aggregate_metrics"]))
        if body.get("note"):
            parts.append(body["note"])
        parts.append(f"sha {short_hash(body['sha256'])}")
        return ", ".join(parts)
    if entry.kind == KIND_DEPLOYMENT:
        return f"deployed to {body['clinic_id']}"
    if entry.kind == KIND_EVALUATION:
        return f"scored by clinics: {metrics_text(body.get('metrics') or {}) or 'no metrics'}"
    if entry.kind == KIND_REJECTION:
        return f"update from {body['clinic_id']} rejected: {body['reason']}"
    if entry.kind == KIND_CLASS_ADDITION:
        return f"class {body['class_name']!r} added by {body['clinic_id']}"
    if entry.kind == KIND_ROLLBACK:
        text = f"current {body.get('previous_version') or '-'} -> {body['version']}"
        if body.get("reason"):
            text += f" ({body['reason']})"
        if body.get("actor"):
            text += f" by {body['actor']}"
        return text
    return ""


def entries_table(entries: Sequence[Entry]) -> str:
    rows = [
        (
            entry.seq,
            format_time(entry.created_at)[:19].replace("T", " "),
            entry.kind,
            entry.version,
            entry.run_id,
            entry.round,
            entry_summary(entry),
        )
        for entry in entries
    ]
    return table(("#", "time (UTC)", "kind", "version", "run", "round", "details"), rows)
