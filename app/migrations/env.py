"""Alembic's entry point: run the revisions on the connection app/migrate.py hands over.

From the `alembic` command line (alembic.ini at the repository root; e.g. `alembic revision
--autogenerate -m "..."` after changing app/store.py), it connects to FITPROBE_DATABASE_URL, or the
default SQLite database, itself.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from fitprobe.app.store import metadata


def run_migrations(connection: sa.Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most of a table, so batch operations copy it into a new
    # one there; PostgreSQL gets plain ALTERs. One set of revisions serves both.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("fitprobe migrates online only: drop --sql and point FITPROBE_DATABASE_URL at the database")
connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    from fitprobe.app.config import Settings

    with sa.create_engine(Settings().resolved_database_url).begin() as connection:
        run_migrations(connection)
