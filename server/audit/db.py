"""Connecting to the audit database: URLs, engines, and the write lock.

SQLite is the default (one file, nothing to run); any SQLAlchemy URL works, and
PostgreSQL is what production uses.  The two differ in how a writer gets the
exclusive right to append, so that difference is kept here:

* SQLite: Python's sqlite3 module normally opens transactions lazily and in
  DEFERRED mode, which lets two writers both read the chain head and then
  collide.  We take over transaction control and start write transactions with
  ``BEGIN IMMEDIATE``, which takes the database's write lock up front; other
  writers wait (busy timeout) instead of failing.  WAL mode lets readers carry on
  meanwhile.
* Everything else: the writer locks the chain-head row with SELECT ... FOR UPDATE
  (see store.py), which PostgreSQL holds until commit.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session

from server.audit.errors import StoreError

DB_ENV_VAR = "QANA_AUDIT_DB"
VERSION_TABLE = "audit_alembic_version"  # alembic's table in an audit database (migrate.py)
SQLITE_BUSY_TIMEOUT_SECONDS = 60.0
_BEGIN_OPTION = "qana_sqlite_begin"


def default_db_url() -> str:
    """``$QANA_AUDIT_DB`` or a SQLite file at ``~/.qana/audit.db``."""
    configured = os.environ.get(DB_ENV_VAR)
    if configured:
        return configured
    return f"sqlite:///{Path.home() / '.qana' / 'audit.db'}"


def parse_url(url: str | URL) -> URL:
    """Parse a database URL, turning SQLAlchemy's errors into a one-line StoreError."""
    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except ArgumentError:
        raise StoreError(
            f"not a database URL: {url!r} (expected e.g. sqlite:///audit.db or postgresql://...)"
        ) from None


def display_url(url: URL) -> str:
    """The URL without its password, for messages."""
    return url.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The file of a file-backed SQLite URL; None for other databases and :memory:."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def create_audit_engine(url: str | URL, *, must_exist: bool = False) -> Engine:
    """Create an engine configured for the audit log.

    ``must_exist`` refuses to create a new SQLite file: read-only commands pointed
    at a mistyped path must say so, not report an empty (and thus "valid") log.
    """
    parsed = parse_url(url)
    database_file = sqlite_file(parsed)
    if database_file is not None:
        if must_exist and not database_file.exists():
            raise StoreError(f"no audit database at {database_file}")
        if not must_exist:
            try:
                database_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create directory for {database_file}: {exc.strerror}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
            _take_over_sqlite_transactions(engine)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError:
        raise StoreError(f"unsupported database URL scheme: {parsed.drivername!r}") from None
    except (ArgumentError, ImportError) as exc:
        raise StoreError(f"cannot use database URL {display_url(parsed)}: {exc}") from None
    if must_exist:
        try:
            _refuse_without_an_audit_log(parsed, engine)
        except StoreError:
            engine.dispose()
            raise
    return engine


def _refuse_without_an_audit_log(parsed: URL, engine: Engine) -> None:
    """Read-only commands pointed at another database (the SuperLink's superlink.db, a typo'd
    PostgreSQL name) must say so and leave it untouched: migrating it would add the audit
    tables to it (and switch a SQLite file to WAL), then report an empty, "valid" log. A SQLite
    file is looked at through a read-only connection, because any connection of ``engine``
    switches the file to WAL."""
    database_file = sqlite_file(parsed)
    try:
        if database_file is not None:
            uri = f"{database_file.resolve().as_uri()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True)) as connection:
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        else:
            tables = set(inspect(engine).get_table_names())
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the audit database {database_file}: {exc}") from None
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the audit database: {describe_database_error(exc)}") from None
    if VERSION_TABLE not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        holds = f"its tables: {shown}" if tables else "it is empty"
        raise StoreError(f"no QANA audit log in {display_url(parsed)} ({holds}); check --db / ${DB_ENV_VAR}")


def _take_over_sqlite_transactions(engine: Engine) -> None:
    """Emit BEGIN ourselves so write transactions can be BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver stops issuing BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def writer_engine(engine: Engine) -> Engine:
    """The same engine, but its transactions take SQLite's write lock immediately."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    return engine


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error."""
    with Session(writer_engine(engine), expire_on_commit=False) as session:
        with session.begin():
            yield session


@contextmanager
def read_session(engine: Engine, *, snapshot: bool = False) -> Iterator[Session]:
    """A session for queries.

    ``snapshot`` makes every statement see the same state of the database even
    while writers append (verify reads several tables and must not see half of a
    later append).  SQLite transactions are snapshots already; PostgreSQL needs
    REPEATABLE READ for that.
    """
    bind = engine
    if snapshot and engine.dialect.name != "sqlite":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    with Session(bind, expire_on_commit=False) as session:
        with session.begin():
            yield session


def describe_database_error(error: BaseException) -> str:
    """One line saying what the database driver complained about (never the password)."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__
