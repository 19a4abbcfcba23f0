"""The store's share of fairness and disk: per-client limits, the retention sweep and the disk-full
predicate, on a real SQLite database."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg.errors
import pytest
import sqlalchemy as sa

from fitprobe.app import migrate
from fitprobe.app.store import (
    ClientLimits,
    ClientQuota,
    Store,
    events,
    is_disk_full,
    jobs,
)
from fitprobe_client.status import JobStatus


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'fitprobe.db'}")
    migrate.upgrade(store.engine)
    return store


def _job(store: Store, status: str, finished_days_ago: float | None, n: int) -> str:
    job_id = store.create({"n": n}, f"fp{n}", max_queued=10_000)["id"]
    store.add_event(job_id, {"type": "trial", "micro_batch": n})
    finished = None if finished_days_ago is None else datetime.now(timezone.utc) - timedelta(days=finished_days_ago)
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status=status, finished_at=finished))
    return job_id


def _ids(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(jobs.c.id)).scalars())


def test_sweep_deletes_expired_finished_jobs_with_their_events_and_never_unfinished_ones(store):
    old = [_job(store, status, 40, n)
           for n, status in enumerate((JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED))]
    young = _job(store, JobStatus.SUCCEEDED, 1, 10)
    unfinished = [_job(store, JobStatus.QUEUED, None, 11), _job(store, JobStatus.RUNNING, None, 12)]
    assert store.sweep(retention_days=30, max_stored=10_000) == 3
    assert _ids(store) == {young, *unfinished}
    with store.engine.connect() as conn:
        assert set(conn.execute(sa.select(events.c.job_id)).scalars()) == {young, *unfinished}
    assert store.sweep(retention_days=30, max_stored=10_000) == 0
    assert set(old).isdisjoint(_ids(store))


def test_sweep_keeps_at_most_max_stored_jobs_oldest_finished_first_in_bounded_batches(store):
    finished = [_job(store, JobStatus.SUCCEEDED, 10 - n, n) for n in range(10)]  # finished[0] is the oldest
    running = _job(store, JobStatus.RUNNING, None, 99)
    assert store.sweep(retention_days=30, max_stored=4, batch=3) == 3  # a bounded sweep
    assert _ids(store) == {*finished[3:], running}
    assert store.sweep(retention_days=30, max_stored=4, batch=3) == 3
    assert store.sweep(retention_days=30, max_stored=4, batch=3) == 1
    assert _ids(store) == {*finished[7:], running}
    assert store.sweep(retention_days=30, max_stored=1, batch=100) == 3  # the running job stays, over the limit
    assert _ids(store) == {running}


def test_a_client_at_its_job_limit_is_refused_and_other_clients_are_not(store):
    limits = ClientLimits(max_jobs=2, max_submits_per_minute=100)
    for n in range(2):
        store.create({"n": n}, "fp", max_queued=100, client="address:a", limits=limits)
    with pytest.raises(ClientQuota, match="FITPROBE_MAX_JOBS_PER_CLIENT=2"):
        store.create({"n": 3}, "fp", max_queued=100, client="address:a", limits=limits)
    store.create({"n": 4}, "fp", max_queued=100, client="address:b", limits=limits)
    # a cached answer holds no device: it counts only against the submit rate
    store.create_cached({"n": 5}, "fp", {"search": {}}, client="address:a", limits=limits)


def test_cached_answers_count_against_the_clients_submits_per_minute(store):
    limits = ClientLimits(max_jobs=2, max_submits_per_minute=3)
    for n in range(3):
        store.create_cached({"n": n}, "fp", {"search": {}}, client="token:abc", limits=limits)
    with pytest.raises(ClientQuota, match="FITPROBE_MAX_SUBMITS_PER_CLIENT_PER_MINUTE=3") as refused:
        store.create_cached({"n": 4}, "fp", {"search": {}}, client="token:abc", limits=limits)
    assert refused.value.retry_after_s == 60
    assert len(_ids(store)) == 3


def test_disk_full_is_recognised_from_sqlite_and_postgresql_errors(tmp_path):
    # a real SQLITE_FULL: max_page_count caps the database file as a full disk would
    database = sqlite3.connect(tmp_path / "tiny.db")
    database.execute("CREATE TABLE t (x BLOB)")
    database.execute("PRAGMA max_page_count = 4")
    with pytest.raises(sqlite3.OperationalError) as full:
        database.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    assert is_disk_full(full.value)
    assert is_disk_full(sa.exc.OperationalError("INSERT", {}, full.value))
    assert is_disk_full(sa.exc.OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file")))
    assert not is_disk_full(sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")))
    assert not is_disk_full(sa.exc.OperationalError("SELECT", {}, psycopg.errors.QueryCanceled("timeout")))
