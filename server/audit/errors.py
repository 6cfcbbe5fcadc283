"""Errors the audit log raises on purpose.

Every subclass of :class:`AuditError` describes something a person can act on
(an unknown version, a wrong key, an unreachable database).  The CLI prints
them as a single line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class: a problem with the input or the environment, not a bug."""


class StoreError(AuditError):
    """The database cannot be opened, migrated or written."""


class DamagedEntryError(StoreError):
    """A stored entry cannot be decoded: it was edited or damaged after it was signed."""


class UnknownVersionError(AuditError):
    """A version reference (``h3``, ``b1``, a sha256 prefix) matches nothing, or several things."""


class InvalidRecordError(AuditError):
    """A record_* call was given data that cannot be recorded faithfully."""


class SigningKeyError(AuditError):
    """The signing key is missing, unreadable, or not the key that signed this log."""


class UnknownArtifactError(AuditError):
    """No artefact is stored under the given sha256."""
