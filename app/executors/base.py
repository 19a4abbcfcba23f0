"""What every executor shares: its interface, retried store calls, and THE loop that follows a job.

An executor (local processes, Ray tasks) differs only in how it starts a job and how the job's
items reach the service. Everything after that is the same and lives here once: copy each event
into the store as it arrives, renew the job's lease, stop the job when the service stops, when it
runs past FITPROBE_JOB_TIMEOUT_S or when another replica cancelled it, and record its outcome
through the store, which owns every status transition.

A database error (SQLite's "database is locked" past the busy timeout, a PostgreSQL restart) is
retried with backoff, never allowed to end a worker: `/readyz` reports it meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa

from fitprobe.app.config import Settings
from fitprobe.app.store import Conflict, Store
from fitprobe.app.worker import Item
from fitprobe.probe.events import Phase, phase

if TYPE_CHECKING:
    from fitprobe.app.metrics import Metrics

DB_RETRY_FIRST_S, DB_RETRY_MAX_S = 0.5, 10.0
log = logging.getLogger("fitprobe.executor")
T = TypeVar("T")
Outcome = Item  # ("result", report) | ("error", message) | ("cancelled", None)
ENDED: Item = ("ended", None)  # the job is gone without an outcome: its executor works out why


class Executor(Protocol):
    """What the routes and the lifespan use, whichever executor runs the jobs (local or Ray).

    An executor claims queued jobs from the store, runs them and records their events and outcome
    through the store, which owns every status transition.
    """

    device_kind: str  # "cuda" or "cpu": the result cache and the checks at the door key on it
    device_name: str
    devices: list[str]  # the devices a request may name

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self, job_id: str) -> bool: ...  # stop a cancelled job's run, if it runs here
    def busy_devices(self) -> int: ...
    def job_devices_limit(self) -> tuple[int, str]: ...  # the most devices one job gets, and why no more
    def not_ready(self) -> list[str]: ...  # why this replica cannot run jobs now; empty when it can


class Stopping(Exception):
    """The service stops while a worker waits for the database to answer again."""


class DbRetry:
    """Store calls retried with backoff while the database fails; `error` says what it last answered.

    Every store call of an executor goes through one of these: each is one transaction that either
    committed or rolled back, so trying it again is safe.
    """

    def __init__(self, label: str, stopping: threading.Event) -> None:
        self.label, self.stopping = label, stopping
        self.error: str | None = None

    def __call__(self, call: Callable[..., T], *args: Any) -> T:
        delay_s = DB_RETRY_FIRST_S
        while True:
            try:
                answer = call(*args)
            except sa.exc.OperationalError as exc:
                self.error = str(exc.orig or exc).splitlines()[0][:200]
                log.warning("%s: database error in %s: %s; retrying in %.1fs", self.label,
                            call.__name__, self.error, delay_s)
                if self.stopping.wait(delay_s):
                    raise Stopping from exc
                delay_s = min(2 * delay_s, DB_RETRY_MAX_S)
                continue
            if self.error is not None:
                log.warning("%s: the database answers again", self.label)
                self.error = None
            return answer


def spec_for_device(spec: dict[str, Any], device: str, settings: Settings) -> dict[str, Any]:
    """The stored spec as the job runs it: on `device`, with the CPU device's default capacity."""
    spec = dict(spec, device=device)
    for service_only in ("reuse", "verify_cached"):
        spec.pop(service_only, None)
    if device == "cpu" and spec.get("capacity_bytes") is None:
        spec["capacity_bytes"] = settings.cpu_capacity_bytes
    return spec


def internal_error(exc: Exception) -> str:
    """A job's error when the service itself failed handling it: the details go to the log, not the user."""
    return f"internal error ({type(exc).__name__}); the service log has the details"


class RunningJob(Protocol):
    """A started job as the follow loop sees it, whatever runs it (a local process, a Ray task)."""

    job_id: str
    started_s: float  # time.monotonic() when it was handed over to run: FITPROBE_JOB_TIMEOUT_S counts from here
    placement: dict[str, Any] | None  # where it runs, once it says so

    def receive(self) -> Item | None:
        """The job's next item, waiting a moment for it; None while none came; ENDED once none ever will."""

    def kill(self) -> None:
        """End the job's run now (its process, its task)."""

    def why_hopeless(self) -> str | None:
        """Why the job can never start (e.g. the nodes that could run it are gone); None while it can."""

    def timeout_note(self) -> str:
        """What the timeout's message adds, e.g. that the job was never placed."""


class Follower:
    """THE loop that follows a running job into the store, for one executor's worker.

    `follow` copies the job's events as they arrive and returns its outcome; `record` stores it.
    """

    def __init__(self, store: Store, db: DbRetry, settings: Settings, stopping: threading.Event,
                 metrics: Metrics | None = None) -> None:
        self.store, self.db, self.settings, self.stopping, self.metrics = store, db, settings, stopping, metrics

    def follow(self, job: RunningJob) -> Outcome | None:
        """The job's outcome once it ends, after copying each event into the store as it came.

        None when there is nothing to record: the service stops (`record` puts the job back in the
        queue), another replica cancelled it or took its lease, or the job ended without an outcome.
        """
        deadline_s = job.started_s + self.settings.job_timeout_s
        trial_started_s, trials = time.monotonic(), 0
        heartbeat_s = time.monotonic() + self.settings.lease_s / 3
        while True:
            item = job.receive()
            if self.stopping.is_set():
                job.kill()
                return None
            if time.monotonic() >= heartbeat_s:
                # the lease tells other replicas this one still runs the job (see app/store.py)
                heartbeat_s = time.monotonic() + self.settings.lease_s / 3
                if not self.db(self.store.heartbeat, job.job_id):  # cancelled via another replica, or lease lost
                    job.kill()
                    return None
            if item is None:
                if time.monotonic() > deadline_s:
                    job.kill()
                    return "error", (f"timed out after {self.settings.job_timeout_s:.0f}s{job.timeout_note()} "
                                     "(FITPROBE_JOB_TIMEOUT_S)")
                hopeless = job.why_hopeless()
                if hopeless:
                    job.kill()
                    return "error", hopeless
                continue
            kind, payload = item
            if kind == "ended":
                return None
            if kind == "placed":
                job.placement = payload
                self.db(self.store.set_worker_pid, job.job_id, payload["pid"])
                self.db(self.store.add_event, job.job_id, phase(Phase.PLACED, **payload))
            elif kind == "event":
                self.db(self.store.add_event, job.job_id, payload)
                if payload.get("type") == "trial_started":
                    trial_started_s = time.monotonic()
                elif payload.get("type") == "trial" and self.metrics:
                    trials += 1
                    self.metrics.trial_duration_s.observe(time.monotonic() - trial_started_s)
            else:
                if self.metrics and trials:
                    self.metrics.trials_per_job.observe(trials)
                return kind, payload

    def record(self, job_id: str, outcome: Outcome | None) -> None:
        """The outcome, through the store's guarded transitions: one that lost a race (a cancel) changes nothing.

        No outcome while the service stops: the job is queued again, without spending an attempt.
        """
        if outcome is None:
            if self.stopping.is_set():
                self.db(self.store.release, job_id)
            return
        kind, payload = outcome
        if kind == "result":
            self.db(self.store.succeed, job_id, payload)
        elif kind == "cancelled":  # by this service's DELETE (already cancelled), or by someone using Ray directly
            try:
                self.db(self.store.cancel, job_id)
            except Conflict:
                pass
        else:
            self.db(self.store.fail, job_id, payload)
