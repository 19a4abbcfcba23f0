"""Jobs and their events in SQL (SQLite WAL by default, Postgres for replicas).

This module owns every status transition: queued → running → succeeded | failed | cancelled.
Routes and executors call these methods; none of them writes a status itself. Each transition is
one UPDATE guarded by the status it leaves, so two workers (or a cancel racing a finish) cannot
both win.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
MAX_ATTEMPTS = 2  # a job interrupted by a service crash is re-queued once, then failed
# a `\uD800`..`\uDFFF` escape: the JSON may decode to a lone surrogate, which no response can encode
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SUBMIT_LOCK_KEY = 0x66697470  # PostgreSQL advisory lock that serialises submits (ASCII "fitp")

metadata = sa.MetaData()
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("phase", sa.String(32)),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(64), index=True),
    sa.Column("device", sa.String(32)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("cached", sa.Boolean, nullable=False, default=False),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class QueueFull(Exception):
    """Too many queued jobs; the client should retry later."""


class Conflict(Exception):
    """The job is not in a state that allows the request."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _read_json(text: str | None) -> tuple[Any, str | None]:
    """A stored JSON column decoded, or None and why not.

    Rows are written by this module, but a database outlives versions and can be edited by hand: one
    unreadable row must show up as such, not fail every listing that includes it.
    """
    if not text:
        return None, None
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeEncodeError are ValueErrors
        return None, f"{type(exc).__name__}: {str(exc)[:100]}"
    return value, None


def _enable_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        # one connection per request thread: FastAPI runs sync routes on a 40-thread pool
        self.engine = sa.create_engine(url, connect_args={"check_same_thread": False} if sqlite else {},
                                       pool_size=20, max_overflow=20)
        if sqlite:
            sa_event.listen(self.engine, "connect", _enable_wal)
        metadata.create_all(self.engine)

    # ---- creation -------------------------------------------------------------------------
    def create(self, spec: dict[str, Any], fingerprint: str, max_queued: int) -> dict[str, Any]:
        """Queue a job unless `max_queued` jobs already wait: the count and the insert are one statement.

        Counting first and inserting after let 50 concurrent submits queue 34 jobs against a limit of
        5. A single INSERT ... SELECT ... WHERE (count) < limit is atomic on SQLite, which takes the
        database's write lock before the statement reads; PostgreSQL reads a snapshot, so there the
        submits also queue behind one transaction-scoped advisory lock.
        """
        job_id = uuid.uuid4().hex[:16]
        row = {"id": job_id, "status": QUEUED, "phase": "queued", "spec": json.dumps(spec),
               "fingerprint": fingerprint, "attempts": 0, "cached": False, "created_at": _now()}
        queued = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == QUEUED).scalar_subquery()
        values = sa.select(*(sa.literal(value, jobs.c[name].type) for name, value in row.items()))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUBMIT_LOCK_KEY})
            inserted = conn.execute(jobs.insert().from_select(list(row), values.where(queued < max_queued))).rowcount
        if inserted != 1:
            raise QueueFull(f"{max_queued} jobs are already queued (FITPROBE_MAX_QUEUED_JOBS={max_queued})")
        return self.get(job_id)

    def create_cached(self, spec: dict[str, Any], fingerprint: str, result: dict[str, Any]) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:16]
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(id=job_id, status=SUCCEEDED, phase="done", spec=json.dumps(spec),
                                              fingerprint=fingerprint, attempts=0, cached=True,
                                              result=json.dumps(result), created_at=now, started_at=now,
                                              finished_at=now))
        return self.get(job_id)

    def cached_result(self, fingerprint: str) -> dict[str, Any] | None:
        """The newest measured (not itself cached) result with this fingerprint."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs.c.result).where(
                jobs.c.fingerprint == fingerprint, jobs.c.status == SUCCEEDED, jobs.c.cached.is_(False),
            ).order_by(jobs.c.finished_at.desc()).limit(1)).first()
        return _read_json(row.result)[0] if row else None  # an unreadable result is a cache miss

    # ---- transitions ----------------------------------------------------------------------
    def claim_next(self, device: str) -> dict[str, Any] | None:
        """Oldest queued job, now running on `device`; None when the queue is empty."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.id).where(jobs.c.status == QUEUED)
                               .order_by(jobs.c.created_at).limit(1)).first()
            if row is None:
                return None
            claimed = conn.execute(jobs.update().where(jobs.c.id == row.id, jobs.c.status == QUEUED).values(
                status=RUNNING, phase="starting", device=device, started_at=_now(),
                attempts=jobs.c.attempts + 1)).rowcount
        job = self.get(row.id) if claimed else None
        if job is not None and job["spec"] is None:  # an unreadable row: nothing to run
            self.fail(job["id"], job["error"] or "this job's stored spec is empty")
            return None
        return job

    def set_worker_pid(self, job_id: str, pid: int | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(worker_pid=pid))

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        return self._finish(job_id, SUCCEEDED, result=json.dumps(result), phase="done")

    def fail(self, job_id: str, error: str) -> bool:
        return self._finish(job_id, FAILED, error=error[:2000], phase="failed")

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise Conflict(f"job {job_id} is already {job['status']}; only queued or running jobs can be cancelled")
        if not self._finish(job_id, CANCELLED, phase="cancelled", error="cancelled by request"):
            raise Conflict(f"job {job_id} finished before it could be cancelled")
        return self.get(job_id)

    def _finish(self, job_id: str, status: str, **values: Any) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_((QUEUED, RUNNING)))
                                .values(status=status, finished_at=_now(), worker_pid=None, **values)).rowcount == 1

    def recover(self) -> tuple[int, int]:
        """After a crash: running jobs go back to the queue once, then fail as interrupted."""
        with self.engine.begin() as conn:
            requeued = conn.execute(jobs.update().where(jobs.c.status == RUNNING, jobs.c.attempts < MAX_ATTEMPTS)
                                    .values(status=QUEUED, phase="requeued", worker_pid=None)).rowcount
            failed = conn.execute(jobs.update().where(jobs.c.status == RUNNING).values(
                status=FAILED, phase="failed", worker_pid=None, finished_at=_now(),
                error="interrupted: the service stopped while this job ran, twice")).rowcount
        return requeued, failed

    # ---- events ---------------------------------------------------------------------------
    def add_event(self, job_id: str, data: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(events.insert().values(job_id=job_id, data=json.dumps(data), created_at=_now()))
            if data.get("type") == "phase":
                conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == RUNNING)
                             .values(phase=data["phase"]))

    def events_after(self, job_id: str, after_id: int = 0, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events.c.id, events.c.data).where(
                events.c.job_id == job_id, events.c.id > after_id).order_by(events.c.id).limit(limit)).all()
        decoded = [(row.id, _read_json(row.data)[0]) for row in rows]
        return [(event_id, data) for event_id, data in decoded if data is not None]  # skip unreadable rows

    # ---- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise KeyError(job_id)
        return self._as_dict(row)

    def version(self, job_id: str) -> tuple[Any, ...] | None:
        """What changes whenever a job's public representation does: one indexed read, no JSON.

        Status, phase and finished_at cover every transition and the result; the newest event id
        covers trials and phases. None when there is no such job.
        """
        last_event = sa.select(sa.func.max(events.c.id)).where(events.c.job_id == job_id).scalar_subquery()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs.c.status, jobs.c.phase, jobs.c.finished_at, last_event)
                               .where(jobs.c.id == job_id)).first()
        return tuple(row) if row else None

    def list(self, status: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        query = sa.select(jobs)
        count = sa.select(sa.func.count()).select_from(jobs)
        if status:
            query, count = query.where(jobs.c.status == status), count.where(jobs.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(jobs.c.created_at.desc()).limit(limit).offset(offset)).all()
            total = conn.execute(count).scalar_one()
        return [self._as_dict(row) for row in rows], total

    def counts_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        return [data for _, data in self.events_after(job_id, 0, 10_000) if data.get("type") == "trial"]

    @staticmethod
    def _as_dict(row: Any) -> dict[str, Any]:
        job = dict(row._mapping)
        job["spec"], spec_problem = _read_json(job["spec"])
        job["result"], result_problem = _read_json(job["result"])
        if spec_problem or result_problem:
            job["error"] = f"this job's stored record is unreadable ({spec_problem or result_problem})"
        for key in ("created_at", "started_at", "finished_at"):
            job[key] = job[key].isoformat() if job[key] else None
        return job
