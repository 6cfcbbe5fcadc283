"""Database tables of the audit log.

Two layers, deliberately:

* ``audit_entries`` is the ledger.  Each row holds the exact canonical JSON that
  was hashed and signed (``content``), the hash of the previous entry and its own
  hash and signature.  This is the single source of truth.
* The other tables (versions, participants, deployments, rejections, class
  additions, rollbacks) are typed projections of the ledger, so that a data
  protection officer can answer questions with plain SQL and the CLI can filter
  by clinic or run with indexes.  They are written in the same transaction as the
  ledger row, and ``verify`` rebuilds them from the signed content and compares,
  so editing a projection is detected just like editing the ledger.

Artefacts (the model bytes) are stored by sha256 in ``audit_artifacts``, inside
the same transaction, so a version is never recorded without its bytes.

``audit_chain_head`` has exactly one row: the last sequence number and hash,
signed.  Writers lock it (SELECT ... FOR UPDATE; BEGIN IMMEDIATE on SQLite), which
serialises appends so the chain cannot fork under concurrent writers.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

HASH = String(64)
NAME = String(200)
VERSION_ID = String(32)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

HEAD_ROW_ID = 1
GENESIS_HASH = "0" * 64


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ChainHead(Base):
    """The one row naming the last entry; locking it serialises writers."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    entry_hash: Mapped[str] = mapped_column(HASH, nullable=False)
    signer: Mapped[str | None] = mapped_column(String(16))
    signature: Mapped[str | None] = mapped_column(String(128))


class Entry(Base):
    """One ledger entry: the signed canonical content plus indexed copies of key fields."""

    __tablename__ = "audit_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    version: Mapped[str | None] = mapped_column(VERSION_ID)
    run_id: Mapped[str | None] = mapped_column(NAME, index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(HASH, nullable=False)
    entry_hash: Mapped[str] = mapped_column(HASH, nullable=False, unique=True)
    signer: Mapped[str] = mapped_column(String(16), nullable=False)
    signature: Mapped[str] = mapped_column(String(128), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)


class Artifact(Base):
    """Content-addressed model bytes (head .npz, backbone bundle)."""

    __tablename__ = "audit_artifacts"

    sha256: Mapped[str] = mapped_column(HASH, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class ModelVersion(Base):
    """A backbone (``b<n>``) or head (``h<n>``) version."""

    __tablename__ = "audit_versions"
    __table_args__ = (UniqueConstraint("kind", "number", name="uq_audit_versions_kind_number"),)

    version: Mapped[str] = mapped_column(VERSION_ID, primary_key=True)
    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(ForeignKey("audit_artifacts.sha256"), nullable=False, index=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    parent: Mapped[str | None] = mapped_column(ForeignKey("audit_versions.version"))
    backbone: Mapped[str | None] = mapped_column(ForeignKey("audit_versions.version"))
    run_id: Mapped[str | None] = mapped_column(NAME)
    round: Mapped[int | None] = mapped_column(Integer)
    strategy: Mapped[str | None] = mapped_column(NAME)
    strategy_config: Mapped[str] = mapped_column(Text, nullable=False)
    aggregate_metrics: Mapped[str] = mapped_column(Text, nullable=False)
    note: Mapped[str | None] = mapped_column(Text)


class Participant(Base):
    """A clinic's contribution to a version: example count and reported metrics."""

    __tablename__ = "audit_participants"

    version: Mapped[str] = mapped_column(ForeignKey("audit_versions.version"), primary_key=True)
    clinic_id: Mapped[str] = mapped_column(NAME, primary_key=True, index=True)
    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), nullable=False, index=True)
    num_examples: Mapped[int] = mapped_column(BigInteger, nullable=False)
    metrics: Mapped[str] = mapped_column(Text, nullable=False)


class Deployment(Base):
    """A clinic received a version."""

    __tablename__ = "audit_deployments"

    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), primary_key=True, autoincrement=False)
    clinic_id: Mapped[str] = mapped_column(NAME, nullable=False, index=True)
    version: Mapped[str] = mapped_column(ForeignKey("audit_versions.version"), nullable=False, index=True)


class Rejection(Base):
    """A clinic's update was refused by the coordinator, and why."""

    __tablename__ = "audit_rejections"

    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), primary_key=True, autoincrement=False)
    run_id: Mapped[str] = mapped_column(NAME, nullable=False)
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    clinic_id: Mapped[str] = mapped_column(NAME, nullable=False, index=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False)


class ClassAddition(Base):
    """A new lesion class entered the head, contributed by a clinic."""

    __tablename__ = "audit_class_additions"

    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), primary_key=True, autoincrement=False)
    run_id: Mapped[str] = mapped_column(NAME, nullable=False)
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    class_name: Mapped[str] = mapped_column(NAME, nullable=False)
    clinic_id: Mapped[str] = mapped_column(NAME, nullable=False, index=True)


class Rollback(Base):
    """An earlier version was made current again."""

    __tablename__ = "audit_rollbacks"

    seq: Mapped[int] = mapped_column(ForeignKey("audit_entries.seq"), primary_key=True, autoincrement=False)
    version: Mapped[str] = mapped_column(ForeignKey("audit_versions.version"), nullable=False, index=True)
    previous_version: Mapped[str | None] = mapped_column(ForeignKey("audit_versions.version"))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(NAME)


# Projection tables in the order verify compares them (parents before children).
PROJECTION_MODELS: tuple[type[Base], ...] = (
    ModelVersion,
    Participant,
    Deployment,
    Rejection,
    ClassAddition,
    Rollback,
)

__all__ = [
    "GENESIS_HASH",
    "HEAD_ROW_ID",
    "PROJECTION_MODELS",
    "Artifact",
    "Base",
    "ChainHead",
    "ClassAddition",
    "Deployment",
    "Entry",
    "ModelVersion",
    "Participant",
    "Rejection",
    "Rollback",
]
