"""Content-addressed storage of model bytes, inside the audit database.

Storing the bytes in the same database as the ledger (rather than in files next
to it) means the artefact and the entry that names it commit or roll back
together, and a backup of the database is a complete backup of every version.
Identical bytes are stored once: the key is their sha256.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit.canonical import sha256_hex
from server.audit.errors import InvalidRecordError
from server.audit.models import Artifact


def checked_digest(data: bytes, claimed_sha256: str | None) -> str:
    """sha256 of ``data``; if the caller also passed a digest, it must match."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRecordError(f"artefact must be bytes, got {type(data).__name__}")
    digest = sha256_hex(bytes(data))
    if claimed_sha256 is not None and claimed_sha256.lower() != digest:
        raise InvalidRecordError(f"artefact sha256 mismatch: caller says {claimed_sha256}, the bytes hash to {digest}")
    return digest


def store_artifact(session: Session, data: bytes, digest: str) -> None:
    """Add the bytes under their digest unless they are already there."""
    exists = session.execute(select(Artifact.sha256).where(Artifact.sha256 == digest)).first()
    if exists is None:
        session.add(Artifact(sha256=digest, size=len(data), data=bytes(data)))


def load_artifact(session: Session, digest: str) -> bytes | None:
    """The stored bytes for a digest, or None if there are none."""
    return session.execute(select(Artifact.data).where(Artifact.sha256 == digest)).scalar_one_or_none()
