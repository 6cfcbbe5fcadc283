"""Bring an audit database's schema up to date, safely under concurrency.

Called on every open, so the server, the CLI and the tests never need an
alembic.ini in the working directory.  Several processes may open a fresh
database at the same moment (a server and an operator's CLI, or the concurrency
tests), so the check-and-upgrade runs inside one exclusive transaction: SQLite's
``BEGIN IMMEDIATE`` or a PostgreSQL transaction-scoped advisory lock.  Both
databases have transactional DDL, so a crash mid-migration leaves the old schema.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text

from server.audit.db import VERSION_TABLE, writer_engine
from server.audit.errors import StoreError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Arbitrary constant naming "the audit-log migration lock" (pg_advisory_xact_lock key).
_PG_MIGRATION_LOCK = 0x51414E41_0001


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision this software knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None for an empty database)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest revision, if it is not there already."""
    target = head_revision()
    with writer_engine(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        current = current_revision(connection)
        if current == target:
            return
        known = {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}
        if current is not None and current not in known:
            raise StoreError(
                f"the audit database is at schema revision {current!r}, which this software does not know "
                "(it was written by a newer version of qana-server)"
            )
        try:
            command.upgrade(_config(connection), "head")
        except CommandError as exc:
            raise StoreError(f"cannot migrate the audit database: {exc}") from None
