"""Alembic environment for the audit log.

The audit store runs migrations itself when it opens a database
(server/audit/migrate.py), handing Alembic a connection that is already inside a
locked transaction; that path is the ``connection`` attribute below.  Developers
can also use the alembic CLI, e.g. to autogenerate a new revision:

    alembic -c server/alembic.ini -x db=sqlite:///scratch.db revision --autogenerate -m "..."
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from server.audit.db import VERSION_TABLE, default_db_url
from server.audit.models import Base

config = context.config


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("db") or default_db_url()
    engine = create_engine(url)
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported for the audit log")
run_migrations_online()
