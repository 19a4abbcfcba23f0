"""Alembic migrations on SQLite and on a real PostgreSQL: the same revisions build the models' schema,
old databases are carried forward, and a database from a newer fitprobe is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient

from fitprobe.app import migrate
from fitprobe.app.config import Settings
from fitprobe.app.main import create_app
from fitprobe.app.store import Store, metadata
from fitprobe_client.status import JobStatus

HEAD = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
# what `metadata.create_all` made on SQLite before migrations existed (fitprobe a37ff0e)
PRE_ALEMBIC_SCHEMA = """
CREATE TABLE jobs (id VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL, phase VARCHAR(32), spec TEXT NOT NULL,
    fingerprint VARCHAR(64), device VARCHAR(32), attempts INTEGER NOT NULL, worker_pid INTEGER,
    cached BOOLEAN NOT NULL, result TEXT, error TEXT, created_at DATETIME NOT NULL, started_at DATETIME,
    finished_at DATETIME, PRIMARY KEY (id));
CREATE INDEX ix_jobs_fingerprint ON jobs (fingerprint);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE TABLE events (id INTEGER NOT NULL, job_id VARCHAR(32) NOT NULL, data TEXT NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id), FOREIGN KEY(job_id) REFERENCES jobs (id));
CREATE INDEX ix_events_job_id ON events (job_id);
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fitprobe.db'}"
    return request.getfixturevalue("postgres_url")


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_upgrade_from_empty_builds_exactly_the_models_schema(database_url):
    engine = sa.create_engine(database_url)
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # every start-up runs it: a second time changes nothing
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert _revision(engine) == HEAD


def test_replicas_starting_together_migrate_once(postgres_url):
    # separate processes, as replicas are: Alembic's `op` and `context` are process-wide
    migrate_once = ("import sqlalchemy as sa; from fitprobe.app import migrate; "
                    f"migrate.upgrade(sa.create_engine({postgres_url!r}))")
    replicas = [subprocess.Popen([sys.executable, "-c", migrate_once], stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    errors = [replica.communicate(timeout=120)[1] for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], errors  # unlocked, two CREATE TABLE jobs
    assert _revision(sa.create_engine(postgres_url)) == HEAD


def test_a_database_from_before_migrations_is_stamped_upgraded_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "fitprobe.db"
    database = sqlite3.connect(path)
    with database:
        database.executescript(PRE_ALEMBIC_SCHEMA)
        database.execute("INSERT INTO jobs (id, status, phase, spec, attempts, cached, created_at, started_at) "
                         "VALUES ('runningbeforeup1', 'running', 'probing', '{}', 1, 0, "
                         "'2025-01-01 00:00:00.000000', '2025-01-01 00:00:01.000000')")
    database.close()
    store = Store(f"sqlite:///{path}")
    migrate.upgrade(store.engine)
    assert _revision(store.engine) == HEAD
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    # a job running when the old version died has no lease: the first start-up re-queues it
    assert store.recover() == (1, 0)
    assert store.get("runningbeforeup1")["status"] == JobStatus.QUEUED


def _from_a_newer_fitprobe(url: str) -> None:
    engine = sa.create_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()


def test_the_service_refuses_a_database_a_newer_fitprobe_migrated(database_url, tmp_path):
    _from_a_newer_fitprobe(database_url)
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=database_url))
    with pytest.raises(migrate.SchemaAhead, match="'9999_from_the_future', which this fitprobe does not know"), \
            TestClient(app):
        pass
    assert _revision(sa.create_engine(database_url)) == "9999_from_the_future"  # nothing was touched


def test_serve_on_a_newer_database_exits_with_the_way_out(tmp_path):
    url = f"sqlite:///{tmp_path / 'fitprobe.db'}"
    _from_a_newer_fitprobe(url)
    run = subprocess.run([sys.executable, "-m", "fitprobe.app.cli", "serve", "--port", "0", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={"FITPROBE_DATABASE_URL": url, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    assert "a newer fitprobe migrated it. Run that version (or newer)" in run.stderr
