"""Verification: is the stored log exactly what the coordinator signed?

Four independent checks, each naming the entry it finds wrong:

1. The chain.  Walking the ledger in sequence order, every entry must hash to its
   stored hash, carry a valid signature by the coordinator's key, hold the
   sequence number it was signed with, and link to the previous entry's hash;
   the signed chain head must name the last entry.  When the walk breaks, the
   evidence says how:

   * content changed but the signed hash is intact       -> ``edited``
   * not signed by the key, and the genuine entry for this
     position sits further down (everything shifted)      -> ``inserted``
   * not signed by the key, past the signed chain head    -> ``inserted``
   * not signed by the key otherwise                      -> ``edited``
   * a genuine entry with a later number (its predecessor
     is nowhere in the ledger)                            -> ``deleted``
   * a genuine entry out of place (its predecessor is
     elsewhere in the ledger)                             -> ``reordered``
   * the ledger ends before the signed chain head         -> ``deleted``

   The walk stops at the first break: after it, "which entry is wrong" has no
   meaningful answer.
2. Mirrored columns of each genuine ledger row (kind, time, run, ...) must equal
   its signed content (``edited`` otherwise).
3. The typed tables must equal the rows rebuilt from the genuine signed content:
   a changed row is ``edited``, an extra row ``inserted``, a missing one ``deleted``.
4. Every stored artefact must hash to its key (``artifact-modified``), and every
   artefact a genuine version names must be stored (``artifact-missing``).

Truncating the log *and* rolling the signed chain head back to an older signed
state (or emptying it) cannot be detected from inside the database. For that,
keep the reported head hash elsewhere and pass it back as a *kept entry*: an
entry hash the verified chain does not contain is reported as ``deleted``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit.canonical import sha256_hex
from server.audit.models import (
    GENESIS_HASH,
    HEAD_ROW_ID,
    PROJECTION_MODELS,
    Artifact,
    Base,
    ChainHead,
    ClassAddition,
    Deployment,
    Entry,
    ModelVersion,
    Participant,
    Rejection,
    Rollback,
)
from server.audit.projection import (
    column_names,
    entry_row,
    mirrored_entry_fields,
    primary_key,
    projection_rows,
)
from server.audit.records import VERSION_KINDS
from server.audit.signing import Verifier

EDITED = "edited"
DELETED = "deleted"
INSERTED = "inserted"
REORDERED = "reordered"
ARTIFACT_MODIFIED = "artifact-modified"
ARTIFACT_MISSING = "artifact-missing"
WRONG_KEY = "wrong-key"

_AUTHENTIC = "authentic"
_CONTENT_CHANGED = "content-changed"  # signature over the stored hash is fine; content is not
_UNSIGNED = "unsigned"  # the stored hash is not signed by the coordinator's key

_KIND_OF_TABLE = {
    Deployment: "deployment",
    Rejection: "rejection",
    ClassAddition: "class_addition",
    Rollback: "rollback",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the log, tied to the entry (sequence number) it concerns."""

    problem: str
    seq: int | None
    kind: str | None
    version: str | None
    detail: str

    def describe(self) -> str:
        if self.kind == "chain head":
            place = "the chain head record" + (f" (names entry #{self.seq})" if self.seq is not None else "")
        else:
            place = f"entry #{self.seq}" if self.seq is not None else "the log"
            names = " ".join(name for name in (self.kind, self.version) if name)
            if names:
                place = f"{place} ({names})"
        return f"{place}: {self.problem}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "seq": self.seq,
            "kind": self.kind,
            "version": self.version,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_log`; ``problems`` are ordered by entry."""

    entries_checked: int
    artifacts_checked: int
    head_seq: int
    head_hash: str
    key_fingerprint: str
    seconds: float
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries_checked": self.entries_checked,
            "artifacts_checked": self.artifacts_checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "key_fingerprint": self.key_fingerprint,
            "seconds": round(self.seconds, 3),
            "first_problem": self.first_problem.to_dict() if self.first_problem else None,
            "problems": [problem.to_dict() for problem in self.problems],
        }


@dataclass(frozen=True)
class _Examined:
    """A ledger row and what checking its hash and signature established."""

    row: Mapping[str, Any]
    status: str
    document: Mapping[str, Any] | None

    @property
    def authentic(self) -> bool:
        return self.status == _AUTHENTIC

    @property
    def signed_seq(self) -> int:
        assert self.document is not None
        return self.document["seq"]

    def names(self) -> tuple[str | None, str | None]:
        """Kind and version: signed ones if authentic, else what the (untrusted) row claims."""
        if self.document is not None and self.authentic:
            return self.document["kind"], self.document["body"].get("version")
        return self.row["kind"], self.row["version"]


def _examine(row: Mapping[str, Any], verifier: Verifier) -> _Examined:
    signature_ok = verifier.entry_signature_ok(row["entry_hash"], row["signature"])
    if sha256_hex(row["content"]) != row["entry_hash"]:
        return _Examined(row, _CONTENT_CHANGED if signature_ok else _UNSIGNED, None)
    if not signature_ok:
        return _Examined(row, _UNSIGNED, None)
    try:
        document = json.loads(row["content"])
    except ValueError:  # signed but unparseable: cannot happen with our writer
        return _Examined(row, _UNSIGNED, None)
    return _Examined(row, _AUTHENTIC, document)


def _problem(kind_of_problem: str, fact: _Examined, detail: str, seq: int | None = None) -> Problem:
    kind, version = fact.names()
    return Problem(kind_of_problem, fact.row["seq"] if seq is None else seq, kind, version, detail)


def _walk_chain(
    facts: Sequence[_Examined],
    head: ChainHead | None,
    verifier: Verifier,
    leftover_names: Callable[[], Mapping[int, tuple[str | None, str | None]]],
) -> Problem | None:
    """Follow the chain from genesis; return the first break, classified."""
    first_position = {}
    for index, fact in enumerate(facts):
        if fact.authentic:
            first_position.setdefault(fact.signed_seq, index)
    head_signed = head is not None and (
        (head.seq == 0 and head.entry_hash == GENESIS_HASH)
        or (head.signature is not None and verifier.head_signature_ok(head.seq, head.entry_hash, head.signature))
    )

    expected, previous_hash = 1, GENESIS_HASH
    for index, fact in enumerate(facts):
        row_seq = fact.row["seq"]
        if fact.status == _CONTENT_CHANGED:
            return _problem(EDITED, fact, "its content no longer matches the hash the coordinator signed")
        if fact.status == _UNSIGNED:
            displaced = first_position.get(expected, -1) > index
            past_head = (
                head_signed
                and head is not None
                and row_seq > head.seq
                and not any(later.authentic for later in facts[index + 1 :])
            )
            if displaced:
                return _problem(
                    INSERTED,
                    fact,
                    f"not signed by the coordinator's key; the genuine entry #{expected} follows it",
                )
            if past_head:
                return _problem(
                    INSERTED,
                    fact,
                    f"not signed by the coordinator's key, and after the signed chain head #{head.seq}",
                )
            return _problem(EDITED, fact, "its hash or signature was replaced: not signed by the coordinator's key")
        signed_seq = fact.signed_seq
        if signed_seq > expected:
            moved_to = first_position.get(expected)
            if moved_to is not None:
                return _problem(
                    REORDERED,
                    fact,
                    f"this position holds entry #{signed_seq}; entry #{expected} was moved to "
                    f"position #{facts[moved_to].row['seq']}",
                )
            kind, version = leftover_names().get(expected, (None, None))
            return Problem(
                DELETED,
                expected,
                kind,
                version,
                f"entry #{expected} is missing; the chain continues with entry #{signed_seq}",
            )
        if signed_seq < expected:
            return _problem(
                REORDERED, fact, f"this position holds entry #{signed_seq}, which belongs before entry #{expected}"
            )
        if row_seq != signed_seq:
            return _problem(REORDERED, fact, f"entry #{signed_seq} was renumbered to #{row_seq}", seq=signed_seq)
        if fact.document is not None and fact.document["prev_hash"] != previous_hash:
            return _problem(EDITED, fact, f"it does not link to entry #{expected - 1}: the chain was spliced")
        previous_hash = fact.row["entry_hash"]
        expected += 1

    last = expected - 1
    if head is None:
        return Problem(DELETED, None, "chain head", None, "the chain head record is missing")
    if not head_signed:
        return Problem(EDITED, head.seq, "chain head", None, "the chain head record is not signed by the coordinator")
    if head.seq > last:
        kind, version = leftover_names().get(last + 1, (None, None))
        return Problem(
            DELETED,
            last + 1,
            kind,
            version,
            f"the signed chain head records entry #{head.seq}, but the ledger ends at #{last}",
        )
    if head.seq < last or head.entry_hash != previous_hash:
        return Problem(
            EDITED,
            head.seq,
            "chain head",
            None,
            f"the chain head names entry #{head.seq} with a different hash than the ledger's last entry #{last}",
        )
    return None


def _check_mirrored_columns(facts: Sequence[_Examined]) -> list[Problem]:
    problems = []
    for fact in facts:
        if not fact.authentic or fact.document is None:
            continue
        expected = mirrored_entry_fields(entry_row(fact.document, "", "", ""))
        stored = mirrored_entry_fields(fact.row)
        changed = [name for name in expected if expected[name] != stored[name]]
        if changed:
            details = ", ".join(f"{name} {expected[name]!r} -> {stored[name]!r}" for name in changed)
            problems.append(_problem(EDITED, fact, f"ledger columns differ from the signed content: {details}"))
    return problems


def _row_names(model: type[Base], row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    if model is ModelVersion:
        return row["kind"], row["version"]
    if model is Participant:
        return None, row["version"]
    return _KIND_OF_TABLE.get(model), row.get("version")


def _leftover_names(session: Session) -> dict[int, tuple[str | None, str | None]]:
    """Kind/version by seq as the typed tables tell it, to name entries deleted from the ledger."""
    names: dict[int, tuple[str | None, str | None]] = {}
    for model in (ModelVersion, Deployment, Rejection, ClassAddition, Rollback):
        for row in session.execute(select(model.__table__)).mappings():
            names.setdefault(row["seq"], _row_names(model, row))
    return names


def _check_projections(session: Session, documents: Sequence[Mapping[str, Any]]) -> list[Problem]:
    expected: dict[type[Base], dict[tuple[Any, ...], dict[str, Any]]] = {model: {} for model in PROJECTION_MODELS}
    signed_names: dict[int, tuple[str | None, str | None]] = {}
    for document in documents:
        signed_names[document["seq"]] = (document["kind"], document["body"].get("version"))
        for model, row in projection_rows(document):
            expected[model][primary_key(model, row)] = row

    def names(model: type[Base], row: Mapping[str, Any]) -> tuple[str | None, str | None]:
        return signed_names.get(row["seq"]) or _row_names(model, row)

    problems = []
    for model in PROJECTION_MODELS:
        table = model.__table__.name
        wanted = expected[model]
        columns = column_names(model)
        seen = set()
        for stored in session.execute(select(model.__table__)).mappings():
            key = primary_key(model, stored)
            seen.add(key)
            signed = wanted.get(key)
            if signed is None:
                problems.append(
                    Problem(
                        INSERTED, stored["seq"], *names(model, stored), f"a row in {table} that no signed entry backs"
                    )
                )
                continue
            changed = [name for name in columns if signed[name] != stored[name]]
            if changed:
                details = ", ".join(f"{name} {signed[name]!r} -> {stored[name]!r}" for name in changed)
                problems.append(
                    Problem(EDITED, signed["seq"], *names(model, signed), f"{table} was changed: {details}")
                )
        for key, signed in wanted.items():
            if key not in seen:
                problems.append(
                    Problem(DELETED, signed["seq"], *names(model, signed), f"its row in {table} was deleted")
                )
    return problems


def _check_artifacts(session: Session, documents: Sequence[Mapping[str, Any]]) -> tuple[int, list[Problem]]:
    """Re-hash every stored artefact; returns (artefacts checked, problems)."""
    users: dict[str, list[Mapping[str, Any]]] = {}
    for document in documents:
        if document["kind"] in VERSION_KINDS:
            users.setdefault(document["body"]["sha256"], []).append(document)
    problems = []
    checked = 0
    stored = set()
    rows = session.execute(select(Artifact.sha256, Artifact.data).execution_options(yield_per=32))
    for digest, data in rows:
        checked += 1
        stored.add(digest)
        actual = sha256_hex(data)
        if actual == digest:
            continue
        for document in users.get(digest, ()) or [None]:
            problems.append(
                Problem(
                    ARTIFACT_MODIFIED,
                    document["seq"] if document else None,
                    document["kind"] if document else None,
                    document["body"]["version"] if document else None,
                    f"the stored artefact {digest[:12]}… was modified: its bytes now hash to {actual[:12]}…",
                )
            )
    for digest, documents_using in users.items():
        if digest not in stored:
            for document in documents_using:
                problems.append(
                    Problem(
                        ARTIFACT_MISSING,
                        document["seq"],
                        document["kind"],
                        document["body"]["version"],
                        f"its artefact {digest[:12]}… is not stored",
                    )
                )
    return checked, problems


def _order(problem: Problem) -> tuple[float, int]:
    seq = float("inf") if problem.seq is None else float(problem.seq)
    # At the same entry, a broken chain is the more fundamental finding.
    rank = 0 if problem.problem in (EDITED, DELETED, INSERTED, REORDERED) else 1
    return seq, rank


def verify_log(session: Session, verifier: Verifier, kept_entries: Sequence[str] = ()) -> VerifyReport:
    """Run all checks inside one snapshot of the database.

    `kept_entries` are entry hashes recorded outside the database (an earlier verify's chain
    head): each must still be a genuine entry of the log, else it was emptied or rolled back.
    """
    started = time.perf_counter()
    head = session.get(ChainHead, HEAD_ROW_ID)
    ledger = session.execute(select(Entry.__table__).order_by(Entry.seq)).mappings().all()
    facts = [_examine(row, verifier) for row in ledger]

    def report(problems: Sequence[Problem], artifacts_checked: int = 0) -> VerifyReport:
        return VerifyReport(
            entries_checked=len(facts),
            artifacts_checked=artifacts_checked,
            head_seq=head.seq if head is not None else 0,
            head_hash=head.entry_hash if head is not None else GENESIS_HASH,
            key_fingerprint=verifier.fingerprint,
            seconds=time.perf_counter() - started,
            problems=tuple(sorted(problems, key=_order)),
        )

    signers = {row["signer"] for row in ledger}
    if facts and not any(fact.status != _UNSIGNED for fact in facts) and verifier.fingerprint not in signers:
        # Nothing verifies and nothing even claims our key: this is the wrong key, not a forged log.
        claimed = ", ".join(sorted(signers))
        return report(
            [
                Problem(
                    WRONG_KEY,
                    None,
                    None,
                    None,
                    f"the entries claim signing key {claimed}, but the key given is {verifier.fingerprint}",
                )
            ]
        )

    problems: list[Problem] = []
    chain_problem = _walk_chain(facts, head, verifier, lambda: _leftover_names(session))
    if chain_problem is not None:
        problems.append(chain_problem)
    documents = [fact.document for fact in facts if fact.authentic and fact.document is not None]
    problems.extend(_check_mirrored_columns(facts))
    problems.extend(_check_projections(session, documents))
    artifacts_checked, artifact_problems = _check_artifacts(session, documents)
    problems.extend(artifact_problems)
    problems.extend(_check_kept_entries(facts, kept_entries))
    return report(problems, artifacts_checked)


def _check_kept_entries(facts: Sequence[_Examined], kept_entries: Sequence[str]) -> list[Problem]:
    """Entry hashes kept elsewhere that the log no longer holds as genuine entries."""
    genuine = {fact.row["entry_hash"] for fact in facts if fact.authentic}
    return [
        Problem(
            DELETED,
            None,
            None,
            None,
            f"entry {kept} (kept outside the log) is not in it: the log was emptied or rolled back past that entry",
        )
        for kept in dict.fromkeys(kept_entries)
        if kept != GENESIS_HASH and kept not in genuine
    ]
