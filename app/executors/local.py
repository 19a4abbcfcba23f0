"""Local executor: one worker thread per device, one job at a time per device, each in its own process.

Probes on a shared GPU would measure each other, so a device runs one job at a time. The job runs
in a process of its own that the worker watches: app/executors/base.py's follow loop copies its events
into the store as they arrive, and when the process ends its outcome (or the signal that killed it)
decides the job's status.

The job process is forked from a fork server that has imported torch and fitprobe's library already
(app/executors/forked.py: why, and how it still dies with the service); its items come back through a
pipe. It leads a process group (its own session), which is what a cancel or a timeout kills: the
device processes it spawns are in it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from fitprobe.app.config import Settings
from fitprobe.app.executors.base import ENDED, DbRetry, Follower, Stopping, internal_error, spec_for_device
from fitprobe.app.executors.forked import (
    LOST_WITH_FORK_SERVER,
    MAIN_GUARD_HINT,
    start_fork_server,
    start_job,
    wait_until_ready,
)
from fitprobe.app.store import JobRow, Store
from fitprobe_client.status import JobStatus
from fitprobe.app.worker import Item
from fitprobe.probe.devices import list_devices

if TYPE_CHECKING:
    from fitprobe.app.metrics import Metrics

DRAIN_TIMEOUT_S = 0.5
STOP_TIMEOUT_S = 30.0
WAIT_S = 0.2
log = logging.getLogger("fitprobe.executor")


def kill_process_tree(process: BaseProcess) -> None:
    """SIGKILL the job process and every process it started (they share its process group)."""
    if process.pid is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already: its leader was reaped, and its ranks died with it
    if process.is_alive():
        process.kill()


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the OOM-killer or `kill -9`?)" if name == "SIGKILL" else ""
        return f"job process died from {name}{hint}"
    if exitcode == LOST_WITH_FORK_SERVER:
        return "job process died with the fork server it was started from (the OOM-killer or `kill -9`?)"
    return f"job process exited with code {exitcode} before reporting a result"


class JobProcess:
    """A job running in a local process, its items arriving through a pipe (a RunningJob of base.py)."""

    def __init__(self, job_id: str, process: BaseProcess, outbox: Connection) -> None:
        self.job_id, self.process, self.outbox = job_id, process, outbox
        self.started_s = time.monotonic()
        self.placement: dict[str, Any] | None = None

    def receive(self) -> Item | None:
        alive = self.process.is_alive()
        try:
            if self.outbox.poll(WAIT_S if alive else DRAIN_TIMEOUT_S):
                return self.outbox.recv()
        except EOFError:
            return ENDED  # the job closed its end: it has sent all it ever will
        return None if alive else ENDED

    def kill(self) -> None:
        kill_process_tree(self.process)

    def why_hopeless(self) -> str | None:
        return None  # the process runs from the start: only the timeout ends a job that never finishes

    def timeout_note(self) -> str:
        return ""


class DeviceWorker(threading.Thread):
    """Claims queued jobs for one device and runs them one after another."""

    def __init__(self, device: str, store: Store, settings: Settings, stopping: threading.Event,
                 metrics: Metrics | None = None) -> None:
        super().__init__(name=f"fitprobe-worker-{device}", daemon=True)
        self.device, self.store, self.settings, self.stopping = device, store, settings, stopping
        self.metrics = metrics
        self.current: JobProcess | None = None
        self._db = DbRetry(f"worker {device}", stopping)
        self._follower = Follower(store, self._db, settings, stopping, metrics)
        self._fork_server_ready = False  # waited for before a claim: see app/executors/forked.py wait_until_ready
        self.fork_error: str | None = None  # why the fork server does not fork, while it does not (/readyz says it)

    @property
    def db_error(self) -> str | None:
        """What the database last answered, while retrying."""
        return self._db.error

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if not self._fork_server_ready:
                    try:
                        wait_until_ready()
                    except Exception as exc:
                        self.fork_error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
                        log.exception("worker %s: the fork server does not fork (%s); trying again; %s", self.device,
                                      self.fork_error, MAIN_GUARD_HINT)
                        self.stopping.wait(max(self.settings.poll_interval_s, 5.0))
                        continue
                    self._fork_server_ready, self.fork_error = True, None
                job = self._db(self.store.claim_next, self.device)
                if job is None:
                    self.stopping.wait(self.settings.poll_interval_s)
                    continue
                try:
                    self._run(job)
                except Stopping:
                    raise
                except Exception as exc:
                    log.exception("worker %s: job %s failed in the service", self.device, job["id"])
                    self._db(self.store.fail, job["id"], internal_error(exc))
        except Stopping:
            return

    def kill(self, job_id: str) -> bool:
        current = self.current
        if current and current.job_id == job_id and current.process.is_alive():
            current.kill()
            return True
        return False

    def _run(self, job: JobRow) -> None:
        # the job's TMPDIR, and its ranks': a cancel or a kill -9 skips every cleanup inside the job, so the
        # worker removes what the job left when it ends, however it ends
        scratch = tempfile.mkdtemp(prefix=scratch_prefix(job["id"]), dir=self.settings.scratch_dir)
        try:
            self._run_in(job, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run_in(self, job: JobRow, scratch: str) -> None:
        job_id = job["id"]
        outbox, job_end = multiprocessing.Pipe(duplex=False)
        try:
            process = start_job(spec_for_device(job["spec"], self.device, self.settings),
                                list(self.settings.allowed_factories), job_end, self.settings.hub_access == "offline",
                                scratch)
        except BaseException:
            outbox.close()
            raise
        finally:
            job_end.close()  # the job holds the only write end: its exit is the pipe's end
        running = JobProcess(job_id, process, outbox)
        self.current = running
        try:
            self._db(self.store.set_worker_pid, job_id, process.pid)
            outcome = self._follower.follow(running)
        except BaseException:  # stopping while the database is down, or a bug: no job process outlives it
            running.kill()
            raise
        finally:
            process.join()
            running.outbox.close()
            if self.metrics:
                self.metrics.job_duration_s.observe(time.monotonic() - running.started_s)
            self.current = None
        # no outcome, the service running on: a cancel killed the process, or it died (the signal says how)
        if outcome is None and not self.stopping.is_set() and self._db(self.store.get, job_id)["status"] != JobStatus.CANCELLED:
            outcome = "error", exit_reason(process.exitcode)
        self._fork_server_ready = process.exitcode != LOST_WITH_FORK_SERVER  # else a new one starts: wait for it
        process.close()
        self._follower.record(job_id, outcome)


SCRATCH_PREFIX = "fitprobe-job-"


def scratch_prefix(job_id: str) -> str:
    return f"{SCRATCH_PREFIX}{job_id}-"


def sweep_stale_scratch(store: Store, scratch_dir: str | None) -> list[str]:
    """Remove the job directories a killed service left (its worker's cleanup never ran): those of jobs that no
    process runs now. A compiler cache in a job's TMPDIR can be gigabytes, and every `kill -9` left one.

    Called at start-up, after the store re-queued the jobs of replicas that died on this host: a job still
    running belongs to a live replica (which may share the directory), and its directory is kept. A directory
    listed here whose job is claimed meanwhile is an old one: the new run makes a directory of its own."""
    root = scratch_dir or tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(root) if name.startswith(SCRATCH_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        job_id = name[len(SCRATCH_PREFIX):].split("-", 1)[0]  # ids are hex; mkdtemp's suffix follows a "-"
        try:
            running = store.get(job_id)["status"] == JobStatus.RUNNING
        except KeyError:  # a job this database never had: another service's, with its own sweep
            continue
        if not running:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


class LocalExecutor:
    """One worker per device NVML lists (the CPU device when it lists none)."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings, self.store = settings, store
        devices = list_devices(settings.cpu_capacity_bytes)
        self.device_kind = devices[0]["kind"]
        self.device_name = devices[0]["name"]
        self.stopping = threading.Event()
        self.workers = [DeviceWorker(d["device"], store, settings, self.stopping, metrics) for d in devices]
        self.devices = [worker.device for worker in self.workers]

    def start(self) -> None:
        removed = sweep_stale_scratch(self.store, self.settings.scratch_dir)
        if removed:
            log.warning("removed %d job directories that a killed service left: %s", len(removed), ", ".join(removed))
        start_fork_server()
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        self.stopping.set()
        for worker in self.workers:
            # a worker kills its job and hands it back (app/store.py release); one that was starting it may first
            # wait for the fork server's imports (seconds on a loaded host)
            worker.join(timeout=STOP_TIMEOUT_S)

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
        return ([f"worker {w.device}: database error: {w.db_error} (retrying)" for w in alive if w.db_error]
                + [f"worker {w.device}: job processes cannot start: {w.fork_error} ({MAIN_GUARD_HINT})"
                   for w in alive if w.fork_error])
