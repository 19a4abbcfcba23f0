"""Jobs and their events in SQL (SQLite WAL by default, Postgres for replicas).

This module owns every status transition: queued → running → succeeded | failed | cancelled.
Routes and executors call these methods; none of them writes a status itself. Each transition is
one UPDATE guarded by the status it leaves, so two workers (or a cancel racing a finish) cannot
both win.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
MAX_ATTEMPTS = 2  # a job interrupted by a service crash is re-queued once, then failed

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
        job_id = uuid.uuid4().hex[:16]
        with self.engine.begin() as conn:
            queued = conn.execute(sa.select(sa.func.count()).where(jobs.c.status == QUEUED)).scalar_one()
            if queued >= max_queued:
                raise QueueFull(f"{queued} jobs are already queued (limit {max_queued})")
            conn.execute(jobs.insert().values(id=job_id, status=QUEUED, phase="queued", spec=json.dumps(spec),
                                              fingerprint=fingerprint, attempts=0, cached=False,
                                              created_at=_now()))
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
        return json.loads(row.result) if row else None

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
        return self.get(row.id) if claimed else None

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
        return [(row.id, json.loads(row.data)) for row in rows]

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
        job["spec"] = json.loads(job["spec"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        for key in ("created_at", "started_at", "finished_at"):
            job[key] = job[key].isoformat() if job[key] else None
        return job
