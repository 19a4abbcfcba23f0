"""The schema, brought to this code's revision before the service reads a row (Alembic, app/migrations/).

SQLite and PostgreSQL run the same revisions. A database whose revision this code does not know
was migrated by a newer fitprobe: starting on it could misread or corrupt rows, so the service
refuses with the way out. A database made before migrations existed (`create_all`, no
`alembic_version` table) holds the first revision's schema: it is stamped with it and upgraded.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"  # the schema `metadata.create_all` made before migrations
MIGRATE_LOCK_KEY = 0x66697471  # PostgreSQL advisory lock: replicas starting together migrate one at a time


class SchemaAhead(RuntimeError):
    """The database was migrated by a newer fitprobe than this one."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration without an .ini file: the scripts ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine) -> None:
    """Migrate the database to head, in one transaction where the database allows (PostgreSQL)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
        config = alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
        if current is not None and current not in known:
            head = ScriptDirectory.from_config(config).get_current_head()
            raise SchemaAhead(
                f"the database {engine.url.render_as_string(hide_password=True)} has schema revision {current!r}, "
                f"which this fitprobe does not know (it knows up to {head!r}): "
                "a newer fitprobe migrated it. Run that version (or newer) against this database, or point "
                "FITPROBE_DATABASE_URL at another one; fitprobe never downgrades a schema it does not know.")
        if current is None and sa.inspect(conn).has_table("jobs"):
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")
