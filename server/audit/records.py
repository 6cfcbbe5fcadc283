"""What the audit log hands back: plain, immutable views of signed entries.

Callers (the ServerApp, the CLI, tests) never see ORM objects.  Every view is
decoded from an entry's signed content, so what is displayed is exactly what was
signed; the typed tables are only used to find entries quickly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.audit.errors import DamagedEntryError

KIND_BACKBONE = "backbone"
KIND_HEAD = "head"
KIND_DEPLOYMENT = "deployment"
KIND_REJECTION = "rejection"
KIND_CLASS_ADDITION = "class_addition"
KIND_ROLLBACK = "rollback"
# How clinics scored a head already recorded. A separate entry, because a head is recorded
# before it leaves the coordinator, and clinics can only score it after receiving it.
KIND_EVALUATION = "evaluation"

VERSION_KINDS = (KIND_BACKBONE, KIND_HEAD)
ALL_KINDS = (KIND_BACKBONE, KIND_HEAD, KIND_DEPLOYMENT, KIND_REJECTION, KIND_CLASS_ADDITION, KIND_ROLLBACK, KIND_EVALUATION)
VERSION_PREFIX = {KIND_BACKBONE: "b", KIND_HEAD: "h"}


# What each kind's body must hold for the log to be read and shown (projection.py and
# render.py index these); a stored entry without them was damaged after it was signed.
REQUIRED_BODY = {
    KIND_BACKBONE: ("version", "number", "sha256", "size"),
    KIND_HEAD: ("version", "number", "sha256", "size"),
    KIND_DEPLOYMENT: ("clinic_id", "version"),
    KIND_REJECTION: ("run_id", "round", "clinic_id", "reason"),
    KIND_CLASS_ADDITION: ("run_id", "round", "class_name", "clinic_id"),
    KIND_ROLLBACK: ("version",),
    KIND_EVALUATION: ("version",),
}


def _body(kind: str, body: dict[str, Any]) -> Mapping[str, Any]:
    if kind not in REQUIRED_BODY:
        raise ValueError(f"unknown entry kind {kind!r}")
    missing = [key for key in REQUIRED_BODY[kind] if key not in body]
    if missing:
        raise ValueError(f"its {kind} record lacks {', '.join(missing)}")
    for participant in body.get("participants") or ():
        if not isinstance(participant, dict) or "clinic_id" not in participant or "num_examples" not in participant:
            raise ValueError(f"its {kind} record has a participant without clinic_id/num_examples")
    return body


def _whole_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seq {value!r} is not a whole number")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not text")
    return value


def utc(moment: datetime) -> datetime:
    """The same instant as an aware UTC datetime (naive values are taken as UTC, as SQLite returns them)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """The one textual form of a timestamp used in signed content."""
    return utc(moment).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Entry:
    """One ledger entry as signed: position, links, and decoded content."""

    seq: int
    kind: str
    created_at: datetime
    prev_hash: str
    entry_hash: str
    signer: str
    signature: str
    content: str
    body: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_content(cls, content: str, entry_hash: str, signature: str, seq: int | None = None) -> Entry:
        """Decode a stored entry. A damaged one (edited in the database, a broken disk) is a
        DamagedEntryError naming it, because showing the log must not die with a bare traceback
        exactly when the log has something to show; ``seq`` is the database row's number, for the
        message when the content itself cannot say which entry it is."""
        try:
            document = json.loads(content)
            if not isinstance(document, dict) or not isinstance(document.get("body"), dict):
                raise ValueError("not an entry object with a body")
            kind = _text(document["kind"])
            return cls(
                seq=_whole_number(document["seq"]),
                kind=kind,
                created_at=datetime.fromisoformat(document["created_at"]),
                prev_hash=_text(document["prev_hash"]),
                entry_hash=entry_hash,
                signer=_text(document["signer"]),
                signature=signature,
                content=content,
                body=_body(kind, document["body"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            which = f"#{seq}" if seq is not None else "(unknown number)"
            raise DamagedEntryError(
                f"audit entry {which} is damaged ({reason}); `qana-server audit verify` checks the whole log"
            ) from None

    @property
    def version(self) -> str | None:
        """The version this entry creates or refers to, if any."""
        return self.body.get("version")

    @property
    def run_id(self) -> str | None:
        return self.body.get("run_id")

    @property
    def round(self) -> int | None:
        return self.body.get("round")

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "created_at": format_time(self.created_at),
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "signer": self.signer,
            "signature": self.signature,
            "body": dict(self.body),
        }


@dataclass(frozen=True)
class ParticipantInfo:
    clinic_id: str
    num_examples: int
    metrics: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"clinic_id": self.clinic_id, "num_examples": self.num_examples, "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class DeploymentInfo:
    seq: int
    clinic_id: str
    version: str
    deployed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "clinic_id": self.clinic_id,
            "version": self.version,
            "deployed_at": format_time(self.deployed_at),
        }


@dataclass(frozen=True)
class VersionInfo:
    """A backbone or head version: what it is, what it was made from, by whom, when."""

    version: str
    kind: str
    seq: int
    created_at: datetime
    sha256: str
    size: int
    parent: str | None
    backbone: str | None
    run_id: str | None
    round: int | None
    strategy: str | None
    strategy_config: Mapping[str, Any]
    participants: tuple[ParticipantInfo, ...]
    aggregate_metrics: Mapping[str, Any]
    note: str | None
    entry_hash: str
    signer: str
    evaluation: Mapping[str, Any] = field(default_factory=dict)  # from its evaluation entries, latest last

    @classmethod
    def from_entry(cls, entry: Entry, evaluations: Iterable[Entry] = ()) -> VersionInfo:
        """The version an entry records, with the metrics of its `evaluation` entries (in
        order, a later one overriding an earlier one's keys)."""
        body = entry.body
        evaluation: dict[str, Any] = {}
        for later in evaluations:
            evaluation.update(later.body.get("metrics") or {})
        return cls(
            version=body["version"],
            kind=entry.kind,
            seq=entry.seq,
            created_at=entry.created_at,
            sha256=body["sha256"],
            size=body["size"],
            parent=body.get("parent"),
            backbone=body.get("backbone"),
            run_id=body.get("run_id"),
            round=body.get("round"),
            strategy=body.get("strategy"),
            strategy_config=body.get("strategy_config") or {},
            participants=tuple(
                ParticipantInfo(p["clinic_id"], p["num_examples"], p.get("metrics") or {})
                for p in body.get("participants") or ()
            ),
            aggregate_metrics=body.get("aggregate_metrics") or {},
            note=body.get("note"),
            entry_hash=entry.entry_hash,
            signer=entry.signer,
            evaluation=evaluation,
        )

    @property
    def metrics(self) -> dict[str, Any]:
        """Everything measured about this version: what its own entry recorded (training,
        participants' reports) and how clinics scored it afterwards (`evaluation`)."""
        return {**self.aggregate_metrics, **self.evaluation}

    @property
    def total_examples(self) -> int:
        return sum(p.num_examples for p in self.participants)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "seq": self.seq,
            "created_at": format_time(self.created_at),
            "sha256": self.sha256,
            "size": self.size,
            "parent": self.parent,
            "backbone": self.backbone,
            "run_id": self.run_id,
            "round": self.round,
            "strategy": self.strategy,
            "strategy_config": dict(self.strategy_config),
            "participants": [p.to_dict() for p in self.participants],
            "aggregate_metrics": dict(self.aggregate_metrics),
            "evaluation": dict(self.evaluation),
            "note": self.note,
            "entry_hash": self.entry_hash,
            "signer": self.signer,
        }
