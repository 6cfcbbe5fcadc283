"""The audit log of model versions: append-only, hash-chained, signed.

Every write goes through :meth:`AuditLog._append`, which in one database
transaction locks the chain head, validates the record against what is already
stored, stores the artefact bytes, writes the signed ledger entry and its typed
projection rows, and moves the chain head.  Either all of that commits or none of
it does, so a crash never leaves a half-written version, and because the chain
head is locked first, concurrent writers queue up instead of forking the chain.

Version identifiers are short and human-usable: ``b1, b2, ...`` for backbones and
``h1, h2, ...`` for heads, allocated in order under the same lock.  Anywhere a
version is expected, a unique sha256 prefix (6+ hex digits) of its artefact or the
word ``current`` (the current head) is accepted too.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, func, insert, select, union
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from server.audit.artifacts import checked_digest, load_artifact, store_artifact
from server.audit.canonical import canonical_json, sha256_hex, to_plain
from server.audit.db import (
    create_audit_engine,
    default_db_url,
    describe_database_error,
    read_session,
    write_session,
)
from server.audit.errors import (
    AuditError,
    InvalidRecordError,
    SigningKeyError,
    StoreError,
    UnknownArtifactError,
    UnknownVersionError,
)
from server.audit.migrate import upgrade
from server.audit.models import (
    HEAD_ROW_ID,
    ChainHead,
    ClassAddition,
    Deployment,
    ModelVersion,
    Participant,
    Rejection,
    Rollback,
)
from server.audit.models import Entry as EntryRow
from server.audit.projection import entry_row, projection_rows
from server.audit.records import (
    ALL_KINDS,
    KIND_BACKBONE,
    KIND_CLASS_ADDITION,
    KIND_DEPLOYMENT,
    KIND_EVALUATION,
    KIND_HEAD,
    KIND_REJECTION,
    KIND_ROLLBACK,
    VERSION_KINDS,
    VERSION_PREFIX,
    DeploymentInfo,
    Entry,
    ParticipantInfo,
    VersionInfo,
    format_time,
    utc,
)
from server.audit.signing import (
    Signer,
    Verifier,
    default_key_path,
    load_or_create_signer,
    load_signer,
)
from server.audit.verify import VerifyReport, verify_log

_P = ParamSpec("_P")
_R = TypeVar("_R")
_SHA_PREFIX = re.compile(r"[0-9a-f]{6,64}")
_MAX_NAME_LENGTH = 200


def _database_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Report driver failures (unreachable server, locked file, ...) as StoreError."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except DBAPIError as exc:
            raise StoreError(f"database error: {describe_database_error(exc)}") from exc

    return wrapper


@dataclass(frozen=True)
class EntryFilter:
    """Which entries :meth:`AuditLog.entries` returns.  Unset fields do not filter.

    ``clinic_id`` matches entries that concern the clinic: versions it took part
    in, deployments to it, its rejected updates and the classes it added.
    ``limit`` keeps the most recent matching entries (still returned oldest first).
    """

    run_id: str | None = None
    clinic_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    kinds: tuple[str, ...] = ()
    version: str | None = None
    limit: int | None = None


def _text(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecordError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_NAME_LENGTH:
        raise InvalidRecordError(f"{name} is longer than {_MAX_NAME_LENGTH} characters")
    return value


def _count(value: Any, name: str, *, optional: bool = False) -> int | None:
    """A non-negative integer (numpy integers welcome, bools and floats not)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 0:
        raise InvalidRecordError(f"{name} must be a non-negative integer, got {value!r}")
    return operator.index(value)


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRecordError(f"{name} must be a mapping, got {type(value).__name__}")
    plain = to_plain(value, name)
    assert isinstance(plain, dict)
    return plain


def _participants(participants: Iterable[Mapping[str, Any] | ParticipantInfo]) -> list[dict[str, Any]]:
    """Validate and normalise participants; sorted by clinic so the content is order-independent."""
    normalised: dict[str, dict[str, Any]] = {}
    for index, participant in enumerate(participants):
        if isinstance(participant, ParticipantInfo):
            participant = participant.to_dict()
        if not isinstance(participant, Mapping):
            raise InvalidRecordError(f"participants[{index}] must be a mapping with clinic_id and num_examples")
        unknown = set(participant) - {"clinic_id", "num_examples", "metrics"}
        if unknown:
            raise InvalidRecordError(f"participants[{index}] has unknown fields: {', '.join(sorted(unknown))}")
        clinic_id = _text(participant.get("clinic_id"), f"participants[{index}].clinic_id")
        assert clinic_id is not None
        examples = _count(participant.get("num_examples"), f"participants[{index}].num_examples")
        if clinic_id in normalised:
            raise InvalidRecordError(f"clinic {clinic_id!r} appears twice among the participants")
        normalised[clinic_id] = {
            "clinic_id": clinic_id,
            "num_examples": examples,
            "metrics": _mapping(participant.get("metrics"), f"participants[{index}].metrics"),
        }
    return [normalised[clinic] for clinic in sorted(normalised)]


@_database_errors
def _log_signer(engine: Engine) -> str | None:
    """Fingerprint of the key that signed the log's last entry (None for a log without entries).

    Checked when the log is opened for writing, so a wrong or mistyped --audit-key fails at
    `qana-server start`, not at the first write after clinics have connected.
    """
    with read_session(engine) as session:
        head = session.execute(select(ChainHead).where(ChainHead.id == HEAD_ROW_ID)).scalar_one_or_none()
    return None if head is None else head.signer


class AuditLog:
    """Append-only, signed, hash-chained record of every model version and what happened to it."""

    def __init__(self, engine: Engine, signer: Signer | None = None) -> None:
        self._engine = engine
        self._signer = signer

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        url: str | None = None,
        key_path: str | Path | None = None,
        *,
        create: bool = True,
        sign: bool = True,
    ) -> AuditLog:
        """Open (and migrate) the audit database at ``url``.

        ``create`` allows creating a new SQLite file and a new signing key; the CLI
        opens with ``create=False`` so a mistyped path is an error, not a fresh log.
        ``sign`` loads the signing key, which writing needs and reading does not.
        """
        engine = create_audit_engine(url or default_db_url(), must_exist=not create)
        try:
            upgrade(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open the audit database: {describe_database_error(exc)}") from exc
        except AuditError:
            engine.dispose()
            raise
        signer = None
        if sign:
            path = Path(key_path).expanduser() if key_path is not None else default_key_path()
            try:
                signed_by = _log_signer(engine)
                if signed_by is not None and not path.exists():
                    # A new key could never write to this log: do not make one.
                    raise SigningKeyError(f"signing key not found: {path} (this log is signed by key {signed_by})")
                signer = load_or_create_signer(path) if create else load_signer(path)
                if signed_by is not None and signed_by != signer.fingerprint:
                    raise SigningKeyError(
                        f"this log is signed by key {signed_by}, but the signing key {path} is {signer.fingerprint}"
                    )
            except AuditError:
                engine.dispose()
                raise
        return cls(engine, signer)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def _require_signer(self) -> Signer:
        if self._signer is None:
            raise SigningKeyError("this audit log was opened without a signing key, so it cannot record")
        return self._signer

    @_database_errors
    def _append(
        self,
        kind: str,
        make_body: Callable[[Session], dict[str, Any]],
        artifact: tuple[bytes, str] | None = None,
    ) -> Entry:
        """Write one signed entry (and its artefact and projections) atomically."""
        signer = self._require_signer()
        with write_session(self._engine) as session:
            head = session.execute(
                select(ChainHead).where(ChainHead.id == HEAD_ROW_ID).with_for_update()
            ).scalar_one_or_none()
            if head is None:
                raise StoreError("the audit database has no chain head row; it was not created by qana-server")
            if head.signer is not None and head.signer != signer.fingerprint:
                raise SigningKeyError(
                    f"this log is signed by key {head.signer}, but the signing key given is {signer.fingerprint}"
                )
            body = make_body(session)
            if artifact is not None:
                store_artifact(session, *artifact)
            seq = head.seq + 1
            content = canonical_json(
                {
                    "seq": seq,
                    "kind": kind,
                    "created_at": format_time(datetime.now(UTC)),
                    "prev_hash": head.entry_hash,
                    "signer": signer.fingerprint,
                    "body": body,
                }
            )
            entry_hash = sha256_hex(content)
            signature = signer.sign_entry(entry_hash)
            # Projections are built from the signed text itself, exactly as verify will.
            document = json.loads(content)
            session.execute(insert(EntryRow), [entry_row(document, content, entry_hash, signature)])
            for model, row in projection_rows(document):
                session.execute(insert(model), [row])
            head.seq = seq
            head.entry_hash = entry_hash
            head.signer = signer.fingerprint
            head.signature = signer.sign_head(seq, entry_hash)
        return Entry.from_content(content, entry_hash, signature)

    def _record_version(
        self,
        kind: str,
        data: bytes,
        sha256: str | None,
        *,
        parent: str | None,
        backbone: str | None,
        run_id: str | None,
        round: int | None,
        strategy: str | None,
        strategy_config: Mapping[str, Any] | None,
        participants: Iterable[Mapping[str, Any] | ParticipantInfo],
        aggregate_metrics: Mapping[str, Any] | None,
        note: str | None,
    ) -> VersionInfo:
        digest = checked_digest(data, sha256)
        fields = {
            "sha256": digest,
            "size": len(data),
            "run_id": _text(run_id, "run_id", optional=True),
            "round": _count(round, "round", optional=True),
            "strategy": _text(strategy, "strategy", optional=True),
            "strategy_config": _mapping(strategy_config, "strategy_config"),
            "participants": _participants(participants),
            "aggregate_metrics": _mapping(aggregate_metrics, "aggregate_metrics"),
            "note": note if note is None else str(note),
        }

        def body(session: Session) -> dict[str, Any]:
            number = (
                session.execute(select(func.max(ModelVersion.number)).where(ModelVersion.kind == kind)).scalar() or 0
            ) + 1
            return {
                "version": f"{VERSION_PREFIX[kind]}{number}",
                "number": number,
                "parent": self._reference(session, parent, kind, "parent"),
                "backbone": self._reference(session, backbone, KIND_BACKBONE, "backbone"),
                **fields,
            }

        entry = self._append(kind, body, artifact=(bytes(data), digest))
        return VersionInfo.from_entry(entry)

    def record_backbone(
        self,
        data: bytes,
        sha256: str | None = None,
        *,
        parent: str | None = None,
        run_id: str | None = None,
        round: int | None = None,
        strategy: str | None = None,
        strategy_config: Mapping[str, Any] | None = None,
        participants: Iterable[Mapping[str, Any] | ParticipantInfo] = (),
        aggregate_metrics: Mapping[str, Any] | None = None,
        note: str | None = None,
    ) -> VersionInfo:
        """Record a backbone bundle (the bytes are stored and hashed); returns version ``b<n>``."""
        return self._record_version(
            KIND_BACKBONE,
            data,
            sha256,
            parent=parent,
            backbone=None,
            run_id=run_id,
            round=round,
            strategy=strategy,
            strategy_config=strategy_config,
            participants=participants,
            aggregate_metrics=aggregate_metrics,
            note=note,
        )

    def record_head(
        self,
        run_id: str,
        round: int,
        data: bytes,
        sha256: str | None = None,
        *,
        parent: str | None,
        strategy: str,
        strategy_config: Mapping[str, Any] | None,
        participants: Iterable[Mapping[str, Any] | ParticipantInfo],
        aggregate_metrics: Mapping[str, Any] | None,
        backbone: str | None = None,
        note: str | None = None,
    ) -> VersionInfo:
        """Record the head produced by a federated round; returns version ``h<n>``.

        ``data`` is the .npz of the head arrays; ``participants`` are mappings with
        ``clinic_id``, ``num_examples`` and ``metrics``.  ``parent`` (the head the
        round started from) and ``backbone`` must be versions already recorded.
        """
        return self._record_version(
            KIND_HEAD,
            data,
            sha256,
            parent=parent,
            backbone=backbone,
            run_id=_text(run_id, "run_id"),
            round=_count(round, "round"),
            strategy=_text(strategy, "strategy"),
            strategy_config=strategy_config,
            participants=participants,
            aggregate_metrics=aggregate_metrics,
            note=note,
        )

    def record_deployment(self, clinic_id: str, version: str) -> Entry:
        """Record that ``clinic_id`` received ``version``."""
        clinic = _text(clinic_id, "clinic_id")

        def body(session: Session) -> dict[str, Any]:
            return {"clinic_id": clinic, "version": self._resolve(session, version).version}

        return self._append(KIND_DEPLOYMENT, body)

    def record_evaluation(self, version: str, run_id: str, round: int, metrics: Mapping[str, Any]) -> Entry:
        """Record how clinics scored ``version`` (already recorded: a head is recorded before
        it is sent anywhere, and scored only once clinics have it)."""
        fields = {"run_id": _text(run_id, "run_id"), "round": _count(round, "round"), "metrics": _mapping(metrics, "metrics")}

        def body(session: Session) -> dict[str, Any]:
            return {"version": self._resolve(session, version).version, **fields}

        return self._append(KIND_EVALUATION, body)

    def record_rejection(self, run_id: str, round: int, clinic_id: str, reason: str) -> Entry:
        """Record that the coordinator refused a clinic's update in a round, and why."""
        fields = {
            "run_id": _text(run_id, "run_id"),
            "round": _count(round, "round"),
            "clinic_id": _text(clinic_id, "clinic_id"),
            "reason": self._reason(reason, required=True),
        }
        return self._append(KIND_REJECTION, lambda _session: dict(fields))

    def record_class_addition(self, run_id: str, round: int, class_name: str, clinic_id: str) -> Entry:
        """Record that a new class entered the head in a round, contributed by ``clinic_id``."""
        fields = {
            "run_id": _text(run_id, "run_id"),
            "round": _count(round, "round"),
            "class_name": _text(class_name, "class_name"),
            "clinic_id": _text(clinic_id, "clinic_id"),
        }
        return self._append(KIND_CLASS_ADDITION, lambda _session: dict(fields))

    def rollback(self, version: str, *, reason: str | None = None, actor: str | None = None) -> Entry:
        """Make an earlier (or any other) version current again, and record who did it and why."""
        why = self._reason(reason, required=False)
        who = _text(actor, "actor", optional=True)

        def body(session: Session) -> dict[str, Any]:
            target = self._resolve(session, version)
            current = self._current(session, target.kind)
            if current == target.version:
                raise InvalidRecordError(f"{target.version} is already the current {target.kind} version")
            return {"version": target.version, "previous_version": current, "reason": why, "actor": who}

        return self._append(KIND_ROLLBACK, body)

    @staticmethod
    def _reason(reason: Any, *, required: bool) -> str | None:
        if reason is None and not required:
            return None
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidRecordError(f"reason must be a non-empty string, got {reason!r}")
        return reason

    # ------------------------------------------------------------------ reading

    def _resolve(self, session: Session, reference: str) -> ModelVersion:
        """Find a version by id (``h3``), unique sha256 prefix, or ``current``."""
        if not isinstance(reference, str) or not reference.strip():
            raise UnknownVersionError(f"not a version: {reference!r}")
        wanted = reference.strip().lower()
        if wanted == "current":
            current = self._current(session, KIND_HEAD)
            if current is None:
                raise UnknownVersionError("there is no current head version yet")
            wanted = current
        found = session.get(ModelVersion, wanted)
        if found is not None:
            return found
        if _SHA_PREFIX.fullmatch(wanted):
            matches = (
                session.execute(
                    select(ModelVersion).where(ModelVersion.sha256.like(f"{wanted}%")).order_by(ModelVersion.seq)
                )
                .scalars()
                .all()
            )
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                names = ", ".join(match.version for match in matches)
                raise UnknownVersionError(f"sha256 prefix {reference!r} is ambiguous: {names}")
        raise UnknownVersionError(
            f"unknown version {reference!r} (use an id such as h3 or b1, a sha256 prefix of 6+ hex digits, "
            "or 'current')"
        )

    def _reference(self, session: Session, reference: str | None, kind: str, role: str) -> str | None:
        """Resolve a parent/backbone reference and check it is of the right kind."""
        if reference is None:
            return None
        try:
            found = self._resolve(session, reference)
        except UnknownVersionError as exc:
            raise UnknownVersionError(f"{role}: {exc}") from None
        if found.kind != kind:
            raise InvalidRecordError(f"{role} {found.version} is a {found.kind} version, not a {kind} version")
        return found.version

    @staticmethod
    def _current(session: Session, kind: str) -> str | None:
        newest = session.execute(
            select(ModelVersion.version, ModelVersion.seq)
            .where(ModelVersion.kind == kind)
            .order_by(ModelVersion.seq.desc())
            .limit(1)
        ).first()
        if newest is None:
            return None
        rolled_back = session.execute(
            select(Rollback.version, Rollback.seq)
            .join(ModelVersion, ModelVersion.version == Rollback.version)
            .where(ModelVersion.kind == kind)
            .order_by(Rollback.seq.desc())
            .limit(1)
        ).first()
        if rolled_back is not None and rolled_back.seq > newest.seq:
            return rolled_back.version
        return newest.version

    @staticmethod
    def _load_entry(session: Session, seq: int) -> Entry:
        row = session.execute(
            select(EntryRow.content, EntryRow.entry_hash, EntryRow.signature).where(EntryRow.seq == seq)
        ).one()
        return Entry.from_content(row.content, row.entry_hash, row.signature, seq=seq)

    @_database_errors
    def resolve_version(self, reference: str) -> str:
        """The canonical id (``h3``) of a version reference."""
        with read_session(self._engine) as session:
            return self._resolve(session, reference).version

    @_database_errors
    def current_version(self, kind: str = KIND_HEAD) -> str | None:
        """The version in use: the newest one, unless a later rollback chose another."""
        if kind not in VERSION_KINDS:
            raise InvalidRecordError(f"kind must be one of {', '.join(VERSION_KINDS)}")
        with read_session(self._engine) as session:
            return self._current(session, kind)

    @_database_errors
    def version(self, reference: str) -> VersionInfo:
        """Everything recorded about one version."""
        with read_session(self._engine) as session:
            found = self._resolve(session, reference)
            scored = session.execute(
                select(EntryRow.seq, EntryRow.content, EntryRow.entry_hash, EntryRow.signature)
                .where(EntryRow.kind == KIND_EVALUATION, EntryRow.version == found.version)
                .order_by(EntryRow.seq)
            ).all()
            evaluations = [Entry.from_content(row.content, row.entry_hash, row.signature, seq=row.seq) for row in scored]
            return VersionInfo.from_entry(self._load_entry(session, found.seq), evaluations)

    @_database_errors
    def deployments(self, version: str | None = None, clinic_id: str | None = None) -> list[DeploymentInfo]:
        """Where versions were deployed, oldest first."""
        with read_session(self._engine) as session:
            query = select(Deployment.seq, Deployment.clinic_id, Deployment.version, EntryRow.created_at).join(
                EntryRow, EntryRow.seq == Deployment.seq
            )
            if version is not None:
                query = query.where(Deployment.version == self._resolve(session, version).version)
            if clinic_id is not None:
                query = query.where(Deployment.clinic_id == clinic_id)
            return [
                DeploymentInfo(row.seq, row.clinic_id, row.version, utc(row.created_at))
                for row in session.execute(query.order_by(Deployment.seq))
            ]

    @_database_errors
    def entries(self, filters: EntryFilter | None = None) -> list[Entry]:
        """Ledger entries matching ``filters``, oldest first."""
        filters = filters or EntryFilter()
        unknown = set(filters.kinds) - set(ALL_KINDS)
        if unknown:
            raise InvalidRecordError(f"unknown entry kind(s): {', '.join(sorted(unknown))}")
        with read_session(self._engine) as session:
            query = select(EntryRow.seq, EntryRow.content, EntryRow.entry_hash, EntryRow.signature)
            if filters.run_id is not None:
                query = query.where(EntryRow.run_id == filters.run_id)
            if filters.since is not None:
                query = query.where(EntryRow.created_at >= utc(filters.since))
            if filters.until is not None:
                query = query.where(EntryRow.created_at <= utc(filters.until))
            if filters.kinds:
                query = query.where(EntryRow.kind.in_(filters.kinds))
            if filters.version is not None:
                query = query.where(EntryRow.version == self._resolve(session, filters.version).version)
            if filters.clinic_id is not None:
                clinic = filters.clinic_id
                concerning = union(
                    select(Participant.seq).where(Participant.clinic_id == clinic),
                    select(Deployment.seq).where(Deployment.clinic_id == clinic),
                    select(Rejection.seq).where(Rejection.clinic_id == clinic),
                    select(ClassAddition.seq).where(ClassAddition.clinic_id == clinic),
                )
                query = query.where(EntryRow.seq.in_(select(concerning.subquery().c[0])))
            if filters.limit is not None:
                if filters.limit < 1:
                    raise InvalidRecordError("limit must be at least 1")
                query = query.order_by(EntryRow.seq.desc()).limit(filters.limit)
                rows = list(reversed(session.execute(query).all()))
            else:
                rows = session.execute(query.order_by(EntryRow.seq)).all()
            return [Entry.from_content(row.content, row.entry_hash, row.signature, seq=row.seq) for row in rows]

    @_database_errors
    def get_artifact(self, sha256: str) -> bytes:
        """The stored bytes with this sha256, checked against it before they are handed out."""
        digest = sha256.strip().lower()
        with read_session(self._engine) as session:
            data = load_artifact(session, digest)
        if data is None:
            raise UnknownArtifactError(f"no artefact stored with sha256 {sha256}")
        if sha256_hex(data) != digest:
            raise StoreError(f"the stored artefact {digest} has been modified: its bytes no longer match its hash")
        return data

    def artifact_of(self, version: str) -> bytes:
        """The bytes of a version (head .npz or backbone bundle)."""
        return self.get_artifact(self.version(version).sha256)

    @_database_errors
    def verify(self, verifier: Verifier | None = None, kept_entries: Sequence[str] = ()) -> VerifyReport:
        """Check the chain, every signature, every projection row and every artefact.

        Uses the given verifier (e.g. loaded from a public-key PEM), or else the
        public half of the signing key this log was opened with. `kept_entries`:
        entry hashes kept outside the database, which must still be in the log.
        """
        if verifier is None:
            if self._signer is None:
                raise SigningKeyError("verify needs the coordinator's public or private key")
            verifier = self._signer.verifier
        with read_session(self._engine, snapshot=True) as session:
            return verify_log(session, verifier, kept_entries)


__all__ = ["AuditLog", "EntryFilter"]
