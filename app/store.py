"""Jobs and their events in SQL (SQLite WAL by default, Postgres for replicas).

This module owns every status transition: queued → running → succeeded | failed | cancelled.
Routes and executors call these methods; none of them writes a status itself. Each transition is
one UPDATE guarded by the status it leaves, so two workers (or a cancel racing a finish) cannot
both win.

Several service replicas may share one PostgreSQL database. Each `Store` speaks for one replica
(`owner`, hostname-pid-random): a claimed job carries its owner and a lease (`lease_until`) that the
running worker renews (`heartbeat`). A replica that dies stops renewing; once the lease has run out,
the next claim on any other replica re-queues the job (or fails it after MAX_ATTEMPTS), so nothing stays
`running` because a machine went away. Leases compare the replicas' clocks: NTP keeps them far
closer than a lease (FITPROBE_LEASE_S). The schema itself belongs to the Alembic migrations
(app/migrate.py), which the service runs before it opens a `Store`.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from fitprobe_client.status import TERMINAL, UNFINISHED, JobStatus
from fitprobe.probe.events import Phase

STATUSES = tuple(JobStatus)
# job kinds; the job body reads its kind from the spec (app/worker.py)
PROBE, WHATIF, RECOMMEND = "probe", "whatif", "recommend"

MAX_ATTEMPTS = 2  # a job interrupted by a service crash is re-queued once, then failed
# a `\uD800`..`\uDFFF` escape: the JSON may decode to a lone surrogate, which no response can encode
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SUBMIT_LOCK_KEY = 0x66697470  # PostgreSQL advisory lock that serialises submits (ASCII "fitp")
SUBMIT_WINDOW_S = 60  # the window of a client's submit rate (FITPROBE_MAX_SUBMITS_PER_CLIENT_PER_MINUTE)
SWEEP_BATCH = 500  # jobs one retention sweep deletes at most: a sweep never holds the database for long
SQLITE_FULL = 13  # sqlite3's result code for "database or disk is full"
POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full (psycopg.errors.DiskFull)
LATEST_EVENT_CANDIDATES = 8  # rows latest_event decodes at most: a match that is not the event is rare

class JobRow(TypedDict):
    """A job as the store hands it out: the `jobs` row, its JSON columns decoded, its times ISO 8601 strings.

    Routes, executors and the worker read it (app/routes/, app/executors/); only the store writes it.
    """

    id: str
    kind: str
    status: str  # a JobStatus value
    phase: str | None  # a Phase value: where the job last said it was
    spec: Any  # the request as stored (a dict with its `kind`), or None where the stored text is unreadable
    fingerprint: str | None
    device: str | None
    attempts: int
    worker_pid: int | None
    owner: str | None
    lease_until: str | None
    cached: bool
    client: str | None
    result: Any  # the answer (a report, a table, a recommendation) once succeeded
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


metadata = sa.MetaData()
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    # what the job runs (PROBE, WHATIF or RECOMMEND): routes read and list their own kind only
    sa.Column("kind", sa.String(16), nullable=False, server_default=PROBE, index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("phase", sa.String(32)),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(64), index=True),
    sa.Column("device", sa.String(32)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("owner", sa.String(128)),  # the replica running the job (see new_replica_id)
    sa.Column("lease_until", sa.DateTime(timezone=True)),  # the owner heartbeats before this, or has gone
    sa.Column("cached", sa.Boolean, nullable=False, default=False),
    sa.Column("client", sa.String(64), index=True),  # who submitted: a token's hash or an address (app/deps.py)
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


class ClientQuota(Exception):
    """One client holds its share of the service; it may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ClientLimits:
    """What one client may hold (FITPROBE_MAX_JOBS_PER_CLIENT) and store per minute
    (…_SUBMITS_PER_CLIENT_PER_MINUTE)."""

    max_jobs: int
    max_submits_per_minute: int


def is_disk_full(exc: BaseException) -> bool:
    """Whether a database error means the disk (or the database's size limit) is full.

    SQLite says SQLITE_FULL ("database or disk is full"); PostgreSQL says SQLSTATE 53100 (psycopg's
    DiskFull). Either way nothing was written, and the same request succeeds once space frees.
    """
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.OperationalError):
        return getattr(orig, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(orig)
    return getattr(orig, "sqlstate", None) == POSTGRES_DISK_FULL


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for the UTC ones stored."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


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


def new_replica_id() -> str:
    """hostname-pid-random: the host and pid let a restarted replica recognise its own dead jobs at once,
    the random part tells a restarted container (same hostname, pid 1 again) from its earlier life."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _gone_from_this_host(owner: str, me: str) -> bool:
    """Whether `owner` was a replica on this host that is no longer running.

    Its jobs can be recovered at start-up without waiting out their lease. A replica elsewhere, or
    one whose pid still lives, is left to its lease: only its missed heartbeats prove it gone.
    """
    host, _, rest = owner.rpartition("-")[0].rpartition("-")
    if owner == me or host != socket.gethostname() or not rest.isdigit():
        return False
    pid = int(rest)
    if pid == os.getpid():
        return True  # our own pid with another random part: this process's earlier life (container restart)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def _enable_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    def __init__(self, url: str, owner: str | None = None, lease_s: float = 30.0) -> None:
        sqlite = url.startswith("sqlite")
        # one connection per request thread: FastAPI runs sync routes on a 40-thread pool
        self.engine = sa.create_engine(url, connect_args={"check_same_thread": False} if sqlite else {},
                                       pool_size=20, max_overflow=20)
        if sqlite:
            sa_event.listen(self.engine, "connect", _enable_wal)
        self.owner = owner or new_replica_id()
        self.lease_s = lease_s
        self._next_sweep_s = 0.0  # time.monotonic() of the next look for abandoned jobs

    # ---- creation -------------------------------------------------------------------------
    def create(self, spec: dict[str, Any], fingerprint: str, max_queued: int, client: str | None = None,
               limits: ClientLimits | None = None, kind: str = PROBE) -> JobRow:
        """Queue a job unless `max_queued` jobs already wait, or `client` is at its `limits`: the counts
        and the insert are one statement.

        Counting first and inserting after let 50 concurrent submits queue 34 jobs against a limit of
        5. A single INSERT ... SELECT ... WHERE (count) < limit is atomic on SQLite, which takes the
        database's write lock before the statement reads; PostgreSQL reads a snapshot, so there the
        submits also queue behind one transaction-scoped advisory lock.
        """
        row = {"kind": kind, "status": JobStatus.QUEUED, "phase": Phase.QUEUED.value, "attempts": 0, "cached": False}
        queued = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED).scalar_subquery()
        job_id = self._insert(row, spec, fingerprint, client, limits, queued < max_queued)
        if job_id is None:
            raise QueueFull(f"{max_queued} jobs are already queued (FITPROBE_MAX_QUEUED_JOBS={max_queued})")
        return self.get(job_id)

    def create_cached(self, spec: dict[str, Any], fingerprint: str, result: dict[str, Any],
                      client: str | None = None, limits: ClientLimits | None = None) -> JobRow:
        """Store a job answered from the cache: it costs no device, but a row, so it counts against the client."""
        now = _now()
        row = {"status": JobStatus.SUCCEEDED, "phase": Phase.DONE.value, "attempts": 0, "cached": True,
               "result": json.dumps(result), "started_at": now, "finished_at": now}
        job_id = self._insert(row, spec, fingerprint, client, limits, sa.true())
        assert job_id is not None  # nothing but the client's limits refuses a cached row
        return self.get(job_id)

    def _insert(self, row: dict[str, Any], spec: dict[str, Any], fingerprint: str, client: str | None,
                limits: ClientLimits | None, allowed: Any) -> str | None:
        """INSERT ... SELECT ... WHERE `allowed` and the client is within its limits; the new id, or None when
        `allowed` refused it. Raises ClientQuota when the client's own limits did."""
        job_id, now = uuid.uuid4().hex[:16], _now()
        row = {"id": job_id, **row, "spec": json.dumps(spec), "fingerprint": fingerprint, "client": client,
               "created_at": now}
        held, recent = self._client_counts(client, now)
        if client is not None and limits is not None:
            if not row["cached"]:  # a cached answer holds no device: only its row counts
                allowed = allowed & (held < limits.max_jobs)
            allowed = allowed & (recent < limits.max_submits_per_minute)
        values = sa.select(*(sa.literal(value, jobs.c[name].type) for name, value in row.items()))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUBMIT_LOCK_KEY})
            # without preserve_rowcount, SQLAlchemy answers -1 for an INSERT construct on psycopg: every submit a 429
            inserted = conn.execute(jobs.insert().from_select(list(row), values.where(allowed)),
                                    execution_options={"preserve_rowcount": True}).rowcount
            if inserted != 1 and client is not None and limits is not None:
                self._raise_quota(conn.execute(sa.select(held, recent)).one(), limits, bool(row["cached"]))
        return job_id if inserted == 1 else None

    def check_quota(self, client: str, limits: ClientLimits, cached: bool) -> None:
        """Raise ClientQuota now if `client` is at its limits: a route calls this before any work a refused
        request would waste (a cached answer's plan, remade for the new effective batch, costs CPU). The
        insert checks again, atomically; this read only answers a client at its limit early."""
        with self.engine.connect() as conn:
            counts = conn.execute(sa.select(*self._client_counts(client, _now()))).one()
        held, recent = counts
        if (not cached and held >= limits.max_jobs) or recent >= limits.max_submits_per_minute:
            self._raise_quota(counts, limits, cached)

    @staticmethod
    def _client_counts(client: str | None, now: datetime) -> tuple[Any, Any]:
        """The client's queued + running jobs, and the rows it stored in the last SUBMIT_WINDOW_S (subqueries)."""
        mine = jobs.c.client == client
        held = sa.select(sa.func.count()).select_from(jobs).where(mine, jobs.c.status.in_(UNFINISHED))
        window_start = now - timedelta(seconds=SUBMIT_WINDOW_S)
        recent = sa.select(sa.func.count()).select_from(jobs).where(mine, jobs.c.created_at >= window_start)
        return held.scalar_subquery(), recent.scalar_subquery()

    @staticmethod
    def _raise_quota(counts: Any, limits: ClientLimits, cached: bool) -> None:
        held, recent = counts
        if not cached and held >= limits.max_jobs:
            raise ClientQuota(f"this client already has {held} jobs queued or running, its limit "
                              f"(FITPROBE_MAX_JOBS_PER_CLIENT={limits.max_jobs}); wait for one to finish or "
                              "cancel one, then retry", retry_after_s=30)
        if recent >= limits.max_submits_per_minute:
            raise ClientQuota(f"this client stored {recent} probes in the last {SUBMIT_WINDOW_S} s, its limit "
                              f"(FITPROBE_MAX_SUBMITS_PER_CLIENT_PER_MINUTE={limits.max_submits_per_minute}); "
                              "answers from the cache count too: retry later", retry_after_s=SUBMIT_WINDOW_S)

    def cached_result(self, fingerprint: str) -> tuple[str, dict[str, Any]] | None:
        """The id and result of the newest measured (not itself cached) job with this fingerprint."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs.c.id, jobs.c.result).where(
                jobs.c.fingerprint == fingerprint, jobs.c.status == JobStatus.SUCCEEDED, jobs.c.cached.is_(False),
            ).order_by(jobs.c.finished_at.desc()).limit(1)).first()
        if row is None:
            return None
        result = _read_json(row.result)[0]
        return (row.id, result) if result is not None else None  # an unreadable result is a cache miss

    # ---- transitions ----------------------------------------------------------------------
    def claim_next(self, device: str) -> JobRow | None:
        """The next client's oldest queued job, now running on `device` for this replica; None when the queue is
        empty. Clients take turns: the one served longest ago goes next.

        First, at most every half lease, jobs abandoned by a dead replica go back to the queue: a
        worker about to claim has free hands, so recovery needs no thread of its own.

        PostgreSQL: FOR UPDATE SKIP LOCKED, so replicas claiming at the same moment each take a
        different job instead of all waiting on the oldest one. SQLite renders no FOR UPDATE; there
        the UPDATE guarded by `status = 'queued'` lets exactly one claimer win.
        """
        if time.monotonic() >= self._next_sweep_s:
            self._next_sweep_s = time.monotonic() + self.lease_s / 2
            self.requeue_abandoned()
        # round-robin over clients: the client whose last job started longest ago (or never) goes first, its
        # oldest job first; FIFO let one client's 8 jobs run hours ahead of everyone else's
        earlier = jobs.alias("earlier")
        last_start = (sa.select(sa.func.max(earlier.c.started_at)).where(earlier.c.client == jobs.c.client)
                      .correlate(jobs).scalar_subquery())
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED)
                               .order_by(sa.nullsfirst(last_start.asc()), jobs.c.created_at).limit(1)
                               .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            now = _now()
            claimed = conn.execute(jobs.update().where(jobs.c.id == row.id, jobs.c.status == JobStatus.QUEUED).values(
                status=JobStatus.RUNNING, phase="starting", device=device, started_at=now, owner=self.owner,
                lease_until=now + timedelta(seconds=self.lease_s), attempts=jobs.c.attempts + 1)).rowcount
        job = self.get(row.id) if claimed else None
        if job is not None and job["spec"] is None:  # an unreadable row: nothing to run
            self.fail(job["id"], job["error"] or "this job's stored spec is empty")
            return None
        return job

    def set_worker_pid(self, job_id: str, pid: int | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(worker_pid=pid))

    def heartbeat(self, job_id: str) -> bool:
        """Renew this replica's lease on a running job; False when the job is no longer this replica's to run.

        A job stops being this replica's when it is cancelled (perhaps through another replica, which
        cannot kill a process here) or re-queued because this replica missed its lease: the caller
        then stops its run.
        """
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING,
                                                    jobs.c.owner == self.owner)
                                .values(lease_until=_now() + timedelta(seconds=self.lease_s))).rowcount == 1

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        """Record the result of a job this replica runs (a late result from a replica that lost the job is dropped)."""
        return self._finish(job_id, JobStatus.SUCCEEDED, owned=True, result=json.dumps(result), phase="done")

    def fail(self, job_id: str, error: str) -> bool:
        """Fail a job this replica runs (a replica that lost the job cannot fail its new run)."""
        return self._finish(job_id, JobStatus.FAILED, owned=True, error=error[:2000], phase="failed")

    def release(self, job_id: str) -> bool:
        """A job this replica stops running because it shuts down cleanly (SIGTERM): back to the queue, and the
        run does not count against MAX_ATTEMPTS, which is for runs a crash cut short (a kill -9 still spends one)."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING,
                                                    jobs.c.owner == self.owner).values(
                status=JobStatus.QUEUED, phase="requeued", attempts=jobs.c.attempts - 1, worker_pid=None, owner=None,
                lease_until=None)).rowcount == 1

    def cancel(self, job_id: str) -> JobRow:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise Conflict(f"job {job_id} is already {job['status']}; only queued or running jobs can be cancelled")
        if not self._finish(job_id, JobStatus.CANCELLED, phase="cancelled", error="cancelled by request"):
            raise Conflict(f"job {job_id} finished before it could be cancelled")
        return self.get(job_id)

    def _finish(self, job_id: str, status: str, owned: bool = False, **values: Any) -> bool:
        """One guarded transition out of queued/running; `owned`: a running job only if this replica runs it."""
        unfinished: sa.ColumnElement[bool] = jobs.c.status.in_(UNFINISHED)
        if owned:
            unfinished = (jobs.c.status == JobStatus.QUEUED) | (
                (jobs.c.status == JobStatus.RUNNING) & (jobs.c.owner == self.owner))
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(jobs.c.id == job_id, unfinished).values(
                status=status, finished_at=_now(), worker_pid=None, lease_until=None, **values)).rowcount == 1

    def recover(self) -> tuple[int, int]:
        """At start-up: jobs whose replica is gone go back to the queue once, then fail as interrupted.

        Gone means the lease ran out, or the replica ran on this host and its process no longer
        does (the usual single-machine restart): those are recovered at once, not a lease later.
        """
        with self.engine.connect() as conn:
            owners = conn.execute(sa.select(jobs.c.owner).distinct().where(
                jobs.c.status == JobStatus.RUNNING, jobs.c.owner.is_not(None))).scalars().all()
        return self.requeue_abandoned([owner for owner in owners if _gone_from_this_host(owner, self.owner)])

    def requeue_abandoned(self, gone_owners: Sequence[str] = ()) -> tuple[int, int]:
        """Other replicas' running jobs whose lease ran out (or whose owner is in `gone_owners`): re-queued, or
        failed after MAX_ATTEMPTS runs. A job no replica has leased (written before leases existed) counts as
        abandoned.

        Two replicas may sweep at once: each UPDATE re-checks `status = 'running'` on the rows it
        changes, so a job is re-queued once and a job claimed meanwhile carries a fresh lease.
        """
        now = _now()
        expired = jobs.c.lease_until.is_(None) | (jobs.c.lease_until < now)
        # never this replica's own jobs: it is alive, and its executor finishes (or fails) what it started
        abandoned = (jobs.c.status == JobStatus.RUNNING) & (
            (expired & jobs.c.owner.is_distinct_from(self.owner)) | jobs.c.owner.in_(list(gone_owners)))
        cleared = {"worker_pid": None, "owner": None, "lease_until": None}
        with self.engine.begin() as conn:
            requeued = conn.execute(jobs.update().where(abandoned, jobs.c.attempts < MAX_ATTEMPTS)
                                    .values(status=JobStatus.QUEUED, phase="requeued", **cleared)).rowcount
            failed = conn.execute(jobs.update().where(abandoned).values(
                status=JobStatus.FAILED, phase="failed", finished_at=now, **cleared,
                error=f"interrupted: the service running this job stopped during each of its {MAX_ATTEMPTS} runs")
            ).rowcount
        return requeued, failed

    # ---- retention ------------------------------------------------------------------------
    def sweep(self, retention_days: float, max_stored: int, batch: int = SWEEP_BATCH,
              max_stored_bytes: int | None = None) -> int:
        """Delete finished jobs older than `retention_days`, and the oldest finished ones beyond `max_stored`
        jobs or `max_stored_bytes` of specs and results in all, with their events; at most `batch` jobs per
        call. Queued and running jobs stay.

        Every rule picks the oldest finished jobs first, so the jobs to delete are a prefix of the finished
        jobs ordered by finish time: the longest of the prefixes, capped at `batch`. Replicas sweeping
        at once delete the same rows, which is harmless. Bytes count because rows differ by 1,000×: a cached
        answer to a request with a 149 KB data profile stored 363 KB, so 10,000 rows were 3.6 GB.
        """
        cutoff = _now() - timedelta(days=retention_days)
        finished = jobs.c.status.in_(TERMINAL)
        size = sa.func.coalesce(sa.func.length(jobs.c.spec), 0) + sa.func.coalesce(sa.func.length(jobs.c.result), 0)
        with self.engine.connect() as conn:
            total, total_bytes = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(size), 0))
                                              .select_from(jobs)).one()
            oldest = conn.execute(sa.select(jobs.c.id, jobs.c.finished_at, size.label("size")).where(finished)
                                  .order_by(jobs.c.finished_at, jobs.c.id).limit(batch)).all()
        expired = sum(1 for row in oldest if row.finished_at is not None and _aware(row.finished_at) < cutoff)
        over_bytes = 0
        excess_bytes = total_bytes - max_stored_bytes if max_stored_bytes is not None else 0
        while excess_bytes > 0 and over_bytes < len(oldest):
            excess_bytes -= oldest[over_bytes].size
            over_bytes += 1
        doomed = [row.id for row in oldest[:max(expired, total - max_stored, over_bytes, 0)]]
        if not doomed:
            return 0
        with self.engine.begin() as conn:
            conn.execute(events.delete().where(events.c.job_id.in_(doomed)))
            return conn.execute(jobs.delete().where(jobs.c.id.in_(doomed), finished)).rowcount

    # ---- events ---------------------------------------------------------------------------
    def add_event(self, job_id: str, data: dict[str, Any]) -> None:
        """Store an event, stamped with the job's attempt (its run: a restart runs a job again).

        The attempt is read before the write transaction: it changes only when the job is claimed, and
        this replica's executor adds events only to a run it claimed.
        """
        with self.engine.connect() as conn:
            attempt = conn.execute(sa.select(jobs.c.attempts).where(jobs.c.id == job_id)).scalar()
        with self.engine.begin() as conn:
            conn.execute(events.insert().values(job_id=job_id, data=json.dumps({**data, "attempt": attempt}),
                                                created_at=_now()))
            if data.get("type") == "phase":
                conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING)
                             .values(phase=data["phase"]))

    def events_after(self, job_id: str, after_id: int = 0, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events.c.id, events.c.data).where(
                events.c.job_id == job_id, events.c.id > after_id).order_by(events.c.id).limit(limit)).all()
        decoded = [(row.id, _read_json(row.data)[0]) for row in rows]
        return [(event_id, data) for event_id, data in decoded if data is not None]  # skip unreadable rows

    def latest_event(self, job_id: str, event_type: str) -> dict[str, Any] | None:
        """The job's newest event of `event_type` (say, its latest progress count), or None: one query that
        stops at the newest match, where reading the job's whole log cost a list of 200 jobs 200 logs.

        The type lives inside the JSON text, so the query matches the text add_event writes for it
        (json.dumps: `"type": "<type>"`): no JSON functions, which SQLite and PostgreSQL spell apart and
        which fail the whole query on one hand-edited row that is not JSON. A match is then decoded and its
        own `type` checked, which passes over the same text nested inside an event of another type.
        """
        written = f'"type": {json.dumps(str(event_type))}'
        query = (sa.select(events.c.data)
                 .where(events.c.job_id == job_id, events.c.data.contains(written, autoescape=True))
                 .order_by(events.c.id.desc()).limit(LATEST_EVENT_CANDIDATES))
        with self.engine.connect() as conn:
            for text in conn.execute(query).scalars():
                data = _read_json(text)[0]
                if isinstance(data, dict) and data.get("type") == event_type:
                    return data
        return None

    # ---- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRow:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise KeyError(job_id)
        return self._as_dict(row)

    def version(self, job_id: str, kind: str | None = None) -> tuple[Any, ...] | None:
        """What changes whenever a job's public representation does: one indexed read, no JSON.

        Status, phase and finished_at cover every transition and the result; the newest event id
        covers trials and phases. None when there is no such job (of `kind`, when given).
        """
        last_event = sa.select(sa.func.max(events.c.id)).where(events.c.job_id == job_id).scalar_subquery()
        query = sa.select(jobs.c.status, jobs.c.phase, jobs.c.finished_at, last_event).where(jobs.c.id == job_id)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return tuple(row) if row else None

    def list(self, status: str | None, limit: int, offset: int, kind: str = PROBE
             ) -> tuple[builtins.list[JobRow], int]:
        query = sa.select(jobs).where(jobs.c.kind == kind)
        count = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.kind == kind)
        if status:
            query, count = query.where(jobs.c.status == status), count.where(jobs.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(jobs.c.created_at.desc()).limit(limit).offset(offset)).all()
            total = conn.execute(count).scalar_one()
        return [self._as_dict(row) for row in rows], total

    def counts_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
        return {status.value: 0 for status in JobStatus} | {row[0]: row[1] for row in rows}

    def trials(self, job_id: str) -> builtins.list[dict[str, Any]]:  # builtins: `list` here is the method above
        return [data for data in self.trial_events(job_id) if data.get("type") == "trial"]

    def trial_events(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """Trials started and finished, in order: a start without its result is the trial running now."""
        return [data for _, data in self.events_after(job_id, 0, 10_000)
                if data.get("type") in ("trial", "trial_started")]

    @staticmethod
    def _as_dict(row: Any) -> JobRow:
        job = dict(row._mapping)
        job["spec"], spec_problem = _read_json(job["spec"])
        job["result"], result_problem = _read_json(job["result"])
        if spec_problem or result_problem:
            job["error"] = f"this job's stored record is unreadable ({spec_problem or result_problem})"
        for key in ("created_at", "started_at", "finished_at", "lease_until"):
            job[key] = job[key].isoformat() if job[key] else None
        return cast(JobRow, job)  # the `jobs` table's columns, each decoded as JobRow says
