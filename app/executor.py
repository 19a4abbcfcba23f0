"""Local executor: one worker thread per device, one job at a time per device, each in its own process.

Probes on a shared GPU would measure each other, so a device runs one job at a time. The job runs
in a spawned process that the worker watches: events are copied into the store as they arrive,
and when the process ends its outcome (or the signal that killed it) decides the job's status.

The job process starts through probe/lifetime.py, which binds it to die with the service (the
kernel kills it when its worker thread goes) before it imports anything heavy; its items come back
through a pipe. It leads a process group (its own session), which is what a cancel or a timeout
kills: the device processes it spawns are in it. A database error (SQLite's "database is locked" past the busy timeout,
a PostgreSQL restart) is retried with backoff, never allowed to end the worker: `/readyz` reports it
meanwhile.

`Executor` is the small interface both executors (this one and app/ray_executor.py) offer the
routes; `make_executor` picks one from FITPROBE_EXECUTOR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa

from app.config import Settings
from app.store import Store
from app.worker import run_job_process
from fitprobe_client.status import JobStatus
from probe.devices import list_devices
from probe.lifetime import start_guarded

if TYPE_CHECKING:
    from app.routes.health import Metrics

DRAIN_TIMEOUT_S = 0.5
DB_RETRY_FIRST_S, DB_RETRY_MAX_S = 0.5, 10.0
log = logging.getLogger("fitprobe.executor")
T = TypeVar("T")


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


def make_executor(store: Store, settings: Settings, metrics: Metrics | None = None) -> Executor:
    if settings.executor == "ray":
        from app.ray_executor import RayExecutor  # ray is an optional extra: imported only when asked for

        return RayExecutor(store, settings, metrics)
    return LocalExecutor(store, settings, metrics)


class _Stopping(Exception):
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
                    raise _Stopping from exc
                delay_s = min(2 * delay_s, DB_RETRY_MAX_S)
                continue
            if self.error is not None:
                log.warning("%s: the database answers again", self.label)
                self.error = None
            return answer


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL the job process and every process it started (they share its process group)."""
    # the group may be gone already: its leader was reaped, and its ranks died with it
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()


def spec_for_device(spec: dict[str, Any], device: str, settings: Settings) -> dict[str, Any]:
    """The stored spec as the job runs it: on `device`, with the CPU device's default capacity."""
    spec = dict(spec, device=device)
    for service_only in ("reuse", "verify_cached"):
        spec.pop(service_only, None)
    if device == "cpu" and spec.get("capacity_bytes") is None:
        spec["capacity_bytes"] = settings.cpu_capacity_bytes
    return spec


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the OOM-killer or `kill -9`?)" if name == "SIGKILL" else ""
        return f"job process died from {name}{hint}"
    return f"job process exited with code {exitcode} before reporting a result"


class DeviceWorker(threading.Thread):
    """Claims queued jobs for one device and runs them one after another."""

    def __init__(self, device: str, store: Store, settings: Settings, stopping: threading.Event,
                 metrics: Metrics | None = None) -> None:
        super().__init__(name=f"fitprobe-worker-{device}", daemon=True)
        self.device, self.store, self.settings, self.stopping = device, store, settings, stopping
        self.metrics = metrics
        self.current: tuple[str, subprocess.Popen] | None = None
        self.busy_since_s: float | None = None
        self._db = DbRetry(f"worker {device}", stopping)

    @property
    def db_error(self) -> str | None:
        """What the database last answered, while retrying."""
        return self._db.error

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                job = self._db(self.store.claim_next, self.device)
                if job is None:
                    self.stopping.wait(self.settings.poll_interval_s)
                    continue
                try:
                    self._run(job)
                except _Stopping:
                    raise
                except Exception as exc:  # a bug in handling one job must not end the worker
                    log.exception("worker %s: job %s failed in the service", self.device, job["id"])
                    self._db(self.store.fail, job["id"], f"internal error ({type(exc).__name__}); "
                                                         "the service log has the details")
        except _Stopping:
            return

    def kill(self, job_id: str) -> bool:
        current = self.current
        if current and current[0] == job_id and current[1].poll() is None:
            kill_process_tree(current[1])
            return True
        return False

    def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        read_fd, write_fd = os.pipe()
        try:
            process = start_guarded(run_job_process, (
                spec_for_device(job["spec"], self.device, self.settings), list(self.settings.allowed_factories),
                write_fd, self.settings.hub_access == "offline"), pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)  # the job holds the only write end: its exit is the pipe's end
        outbox = Connection(read_fd, writable=False)
        self.current, self.busy_since_s = (job_id, process), time.monotonic()
        try:
            self._db(self.store.set_worker_pid, job_id, process.pid)
            outcome = self._follow(job_id, process, outbox)
        except BaseException:  # stopping while the database is down, or a bug: no job process outlives it
            kill_process_tree(process)
            raise
        finally:
            process.wait()
            outbox.close()
            if self.metrics:
                self.metrics.job_duration_s.observe(time.monotonic() - self.busy_since_s)
            self.current, self.busy_since_s = None, None
        if outcome is None and self.stopping.is_set():
            self._db(self.store.release, job_id)  # a clean stop: queued again, without spending an attempt
            return
        if outcome is None:
            if self._db(self.store.get, job_id)["status"] != JobStatus.CANCELLED:
                self._db(self.store.fail, job_id, exit_reason(process.returncode))
        elif outcome[0] == "result":
            self._db(self.store.succeed, job_id, outcome[1])
        else:
            self._db(self.store.fail, job_id, outcome[1])

    def _follow(self, job_id: str, process: subprocess.Popen, outbox: Connection) -> tuple[str, Any] | None:
        deadline_s = time.monotonic() + self.settings.job_timeout_s
        trial_started_s, trials = time.monotonic(), 0
        heartbeat_s = time.monotonic() + self.settings.lease_s / 3
        while True:
            if time.monotonic() >= heartbeat_s:
                heartbeat_s = time.monotonic() + self.settings.lease_s / 3
                if not self._db(self.store.heartbeat, job_id):  # cancelled via another replica, or lease lost
                    kill_process_tree(process)
                    return None
            alive = process.poll() is None
            try:
                item = outbox.recv() if outbox.poll(0.2 if alive else DRAIN_TIMEOUT_S) else None
            except EOFError:
                return None  # the job closed its end: it has sent all it ever will
            if item is None:
                if not alive:
                    return None
                if time.monotonic() > deadline_s:
                    kill_process_tree(process)
                    self._db(self.store.fail, job_id, f"timed out after {self.settings.job_timeout_s:.0f}s "
                                                      "(FITPROBE_JOB_TIMEOUT_S)")
                    return None
                if self.stopping.is_set():
                    kill_process_tree(process)
                    return None
                continue
            kind, payload = item
            if kind == "event":
                self._db(self.store.add_event, job_id, payload)
                if payload.get("type") == "trial_started":
                    trial_started_s = time.monotonic()
                elif payload.get("type") == "trial" and self.metrics:
                    trials += 1
                    self.metrics.trial_duration_s.observe(time.monotonic() - trial_started_s)
            else:
                if self.metrics and trials:
                    self.metrics.trials_per_job.observe(trials)
                return kind, payload


class LocalExecutor:
    """One worker per device NVML lists (the CPU device when it lists none)."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        devices = list_devices(settings.cpu_capacity_bytes)
        self.device_kind = devices[0]["kind"]
        self.device_name = devices[0]["name"]
        self.stopping = threading.Event()
        self.workers = [DeviceWorker(d["device"], store, settings, self.stopping, metrics) for d in devices]
        self.devices = [worker.device for worker in self.workers]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        self.stopping.set()
        for worker in self.workers:
            worker.join(timeout=5)

    def kill(self, job_id: str) -> bool:
        return any(worker.kill(job_id) for worker in self.workers)

    def busy_devices(self) -> int:
        return sum(worker.current is not None for worker in self.workers)

    def job_devices_limit(self) -> tuple[int, str]:
        if self.device_kind == "cpu":
            most = self.settings.max_verify_processes
            return most, f"at most {most} processes on the CPU device (FITPROBE_MAX_VERIFY_PROCESSES)"
        return len(self.devices), f"{len(self.devices)} GPU(s) on this machine"

    def not_ready(self) -> list[str]:
        alive = [worker for worker in self.workers if worker.is_alive()]
        if not alive:
            return ["no device worker is running"]
        # a worker retrying the database can record nothing: the store is shared, so this replica is not ready
        return [f"worker {w.device}: database error: {w.db_error} (retrying)" for w in alive if w.db_error]
