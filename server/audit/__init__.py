"""Audit log of model versions: append-only, hash-chained, Ed25519-signed, on SQLAlchemy.

Use :class:`AuditLog` (``AuditLog.open(url, key_path)``) to record and query;
``qana-server audit ...`` is the command line over it.
"""

from server.audit.errors import (
    AuditError,
    InvalidRecordError,
    SigningKeyError,
    StoreError,
    UnknownArtifactError,
    UnknownVersionError,
)
from server.audit.records import DeploymentInfo, Entry, ParticipantInfo, VersionInfo
from server.audit.store import AuditLog, EntryFilter
from server.audit.verify import Problem, VerifyReport

__all__ = [
    "AuditError",
    "AuditLog",
    "DeploymentInfo",
    "Entry",
    "EntryFilter",
    "InvalidRecordError",
    "ParticipantInfo",
    "Problem",
    "SigningKeyError",
    "StoreError",
    "UnknownArtifactError",
    "UnknownVersionError",
    "VerifyReport",
    "VersionInfo",
]
