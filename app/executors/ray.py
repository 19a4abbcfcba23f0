"""Ray executor (FITPROBE_EXECUTOR=ray): each job is one Ray task on a cluster that already runs.

The service keeps the queue and every status in its store, as with the local executor; Ray places
and runs the jobs. What each choice buys:

- The task is a *streaming generator* (`fitprobe.app.worker.run_job_ray_task`, around the same `execute` the
  local job process runs): it yields each event as the job emits it, and the service, the store's
  only writer, copies them in as they arrive. Cluster nodes never see the database, so SQLite on
  one machine and PostgreSQL across machines work the same.
- Devices are Ray resources: `num_gpus=N` on a GPU cluster (and `accelerator_type` when
  FITPROBE_RAY_ACCELERATOR_TYPE names a card); on a CPU cluster a custom resource `fitprobe_device`
  stands in for GPUs. Ray grants one task's resources on one node, so a multi-device job gets all
  its devices on one node without a placement group; one asking for more than any live node has
  would wait inside Ray forever, so it is failed with the reason instead.
- `max_calls=1`: a fresh worker process per job, as the local executor spawns one, so one job's
  allocator state or leaks never reach the next. `max_retries=0`: a job whose worker or node died
  fails with that reason rather than silently running twice.
- A job is claimed only while the cluster has a device no job of this service holds, so waiting
  jobs wait in the store (listed, counted against the queue limit, recovered after a crash).
- Cancel is Ray's own `ray.cancel(ref, force=True)`, which kills the task's worker process.
- What streams back is followed into the store by the loop both executors share
  (app/executors/base.py): a `RayJob` is how that loop reads one task's stream.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from fitprobe.app.config import Settings
from fitprobe.app.executors.base import DbRetry, Follower, Stopping, internal_error, spec_for_device
from fitprobe.app.store import JobRow, Store
from fitprobe_client.status import JobStatus
from fitprobe.app.worker import Item, run_job_ray_task
from fitprobe.probe.events import Phase, phase
from fitprobe.probe.spec import ProbeSpec

if TYPE_CHECKING:
    from fitprobe.app.metrics import Metrics

DEVICE_RESOURCE = "fitprobe_device"  # a custom Ray resource standing in for one GPU on CPU nodes
CPU_DEVICE_NAME = "cpu (virtual capacity)"  # as fitprobe.probe.devices names it: results cache across executors
CLUSTER_REFRESH_S = 5.0
WAIT_S = 0.2
log = logging.getLogger("fitprobe.ray")


class RayJob:
    """A job this service submitted to Ray, its items streaming back (a RunningJob of base.py)."""

    def __init__(self, job_id: str, devices: int, ref: Any, resource: str,
                 node_devices: Callable[[], list[int]]) -> None:
        self.job_id, self.devices, self.ref = job_id, devices, ref  # ref: the task's ObjectRefGenerator
        self.resource, self.node_devices = resource, node_devices
        self.started_s = time.monotonic()
        self.placement: dict[str, Any] | None = None  # where it runs, once the task reports it
        self.thread: threading.Thread | None = None  # the one that follows it

    def receive(self) -> Item | None:
        ready, _ = ray.wait([self.ref], timeout=WAIT_S)
        if not ready:
            return None
        try:
            return ray.get(next(self.ref))
        except StopIteration:
            return "error", "the Ray task ended without reporting a result"
        except ray.exceptions.TaskCancelledError:
            return "cancelled", None
        except ray.exceptions.RayError as exc:
            return "error", failure_reason(exc, self.placement)

    def kill(self) -> None:
        ray.cancel(self.ref, force=True)

    def why_hopeless(self) -> str | None:
        most = max(self.node_devices(), default=0)
        if self.placement is None and self.devices > most:  # the nodes that could run it are gone
            return too_many(self.devices, most, self.resource)
        return None

    def timeout_note(self) -> str:
        return "" if self.placement else ", still waiting for Ray to place it"


def devices_needed(spec: dict[str, Any]) -> int:
    """One device, or num_devices when the job runs a process on each (the spec's own count, which the door
    bounded: a verification of a target in rows or in tokens, or a measured sharded trial)."""
    fields = {key: value for key, value in spec.items() if key in ProbeSpec.model_fields}  # not search_from
    return max(ProbeSpec.model_validate(fields).device_processes(), 1)


def too_many(needs: int, most: int, resource: str) -> str:
    """Why a job that needs more devices on one node than any live node has cannot run."""
    return (f"this job needs {needs} {resource} on one node, and the largest live node of the Ray cluster "
            f"has {most}: lower num_devices, or add a node with {needs}")


def failure_reason(exc: Exception, placement: dict[str, Any] | None) -> str:
    """What a user reads when Ray could not finish the job: who died, where, and Ray's name for it."""
    where = f" (worker pid {placement['pid']} on node {placement['node_ip']})" if placement else ""
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return f"the Ray node running this job died{where}; Ray: NodeDiedError"
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return f"Ray's memory monitor killed the worker running this job{where}: the node ran low on host memory"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return (f"the Ray worker running this job died{where}: killed (the OOM-killer or `kill -9`?) or crashed; "
                "Ray: WorkerCrashedError")
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return f"the Ray task failed: {type(exc.cause).__name__}: {exc.cause}"
    return f"Ray could not finish this job{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


class RayExecutor:
    """Submits claimed jobs as Ray tasks and copies what they stream back into the store."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics | None = None) -> None:
        self.store, self.settings, self.metrics = store, settings, metrics
        self.stopping = threading.Event()
        self._db = DbRetry("ray executor", self.stopping)
        self._follower = Follower(store, self._db, settings, self.stopping, metrics)
        self.jobs: dict[str, RayJob] = {}
        self.jobs_lock = threading.Lock()
        self._connect()
        self._task = ray.remote(num_returns="streaming", max_calls=1, max_retries=0)(run_job_ray_task)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.resource, self.device_kind = ("GPU", "cuda") if gpus else (DEVICE_RESOURCE, "cpu")
        self._node_devices: list[int] = []
        self.ray_error: str | None = None  # what Ray last answered when asked for its nodes, while it fails
        self._refreshed_s = -CLUSTER_REFRESH_S
        if not self.node_devices():
            raise RuntimeError(f"the Ray cluster has no {self.resource} on any live node: start GPU nodes, or CPU "
                               f"nodes with `ray start --resources='{{\"{DEVICE_RESOURCE}\": N}}'`")
        self.device_name = CPU_DEVICE_NAME if not gpus else self._gpu_name()
        self.devices = ["cuda:0" if gpus else "cpu"]  # the task sees the devices Ray granted it from 0
        self.dispatcher = threading.Thread(target=self._dispatch, name="fitprobe-ray-dispatcher", daemon=True)

    def _connect(self) -> None:
        """Join FITPROBE_RAY_ADDRESS; without one, join this machine's `ray start`, else start Ray here.

        `ray.init` replaces the SIGTERM and SIGINT handlers with its own `sys.exit`, which would
        cut uvicorn's graceful shutdown (open requests, the executor's stop) short: they are put back.
        """
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._init_ray()
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    def _init_ray(self) -> None:
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                   "log_to_driver": False, "namespace": "fitprobe"}
        if self.settings.ray_address:
            ray.init(address=self.settings.ray_address, **options)
            return
        try:
            ray.init(address="auto", **options)
        except ConnectionError:
            from fitprobe.probe.devices import list_devices

            local = list_devices(self.settings.cpu_capacity_bytes)
            extra: dict[str, Any] = {} if local[0]["kind"] == "cuda" else {"resources": {DEVICE_RESOURCE: len(local)}}
            ray.init(**options, **extra)

    def _gpu_name(self) -> str:
        """The card jobs run on, for the result cache: the configured type, or the cluster's only one."""
        if self.settings.ray_accelerator_type:
            return self.settings.ray_accelerator_type
        types = sorted({name.removeprefix("accelerator_type:") for node in ray.nodes() if node["Alive"]
                        for name in node["Resources"] if name.startswith("accelerator_type:")})
        return "+".join(types) if types else "GPU (type unknown to Ray)"

    def node_devices(self) -> list[int]:
        """Devices on each live node, read from Ray at most every CLUSTER_REFRESH_S (nodes come and go).

        While Ray does not answer, the last answer stands and /readyz says why.
        """
        if time.monotonic() - self._refreshed_s > CLUSTER_REFRESH_S:
            self._refreshed_s = time.monotonic()
            try:
                nodes = ray.nodes()
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the service keeps serving
                self.ray_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                log.warning("ray executor: cannot list the cluster's nodes: %s", self.ray_error)
                return self._node_devices
            self.ray_error = None
            self._node_devices = [int(node["Resources"].get(self.resource, 0)) for node in nodes
                                  if node["Alive"] and node["Resources"].get(self.resource, 0) >= 1]
        return self._node_devices

    # ---- the executor interface (fitprobe.app.executors.base.Executor) -----------------------------
    def start(self) -> None:
        self.dispatcher.start()

    def stop(self) -> None:
        """Cancel what runs (its jobs go back to the queue), leave Ray."""
        self.stopping.set()
        with self.jobs_lock:
            followed = list(self.jobs.values())
        for job in followed:
            job.kill()
        self.dispatcher.join(timeout=5)
        for job in followed:
            if job.thread is not None:
                job.thread.join(timeout=5)
        ray.shutdown()

    def kill(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.kill()
        return True

    def busy_devices(self) -> int:
        with self.jobs_lock:
            return sum(job.devices for job in self.jobs.values())

    def job_devices_limit(self) -> tuple[int, str]:
        most = max(self.node_devices(), default=0)
        if self.device_kind == "cpu" and self.settings.max_verify_processes < most:
            most = self.settings.max_verify_processes
            return most, f"at most {most} processes on a CPU device (FITPROBE_MAX_VERIFY_PROCESSES)"
        return most, f"{most} {self.resource} on one node of the Ray cluster (a job runs on one node)"

    def not_ready(self) -> list[str]:
        problems = []
        if not self.dispatcher.is_alive():
            problems.append("the Ray dispatcher is not running")
        if self.ray_error:
            problems.append(f"ray executor: the cluster does not answer: {self.ray_error}")
        elif not self._node_devices:
            problems.append(f"the Ray cluster has no {self.resource} on any live node")
        if self._db.error:
            problems.append(f"ray executor: database error: {self._db.error} (retrying)")
        return problems

    # ---- claiming and submitting ----------------------------------------------------------
    def _dispatch(self) -> None:
        while not self.stopping.is_set():
            try:
                claimed = self._claim_and_submit()
            except Stopping:
                return
            except Exception:  # Ray or a bug failing once must not end the dispatcher
                log.exception("ray executor: dispatching failed; trying again")
                claimed = False
            if not claimed:
                self.stopping.wait(self.settings.poll_interval_s)

    def _claim_and_submit(self) -> bool:
        """Claim the oldest queued job while a device is free, and submit it; False when there was none."""
        if self.busy_devices() >= sum(self.node_devices()):
            return False
        job = self._db(self.store.claim_next, "ray")
        if job is None:
            return False
        try:
            self._submit(job)
        except Stopping:
            raise
        except Exception as exc:  # a job the service could not submit fails, with where to look
            log.exception("ray executor: job %s failed in the service", job["id"])
            self._db(self.store.fail, job["id"], internal_error(exc))
        return True

    def _submit(self, job: JobRow) -> None:
        job_id = job["id"]
        spec = spec_for_device(job["spec"], self.devices[0], self.settings)
        needs = devices_needed(spec)
        most = max(self.node_devices(), default=0)
        if needs > most:
            self._db(self.store.fail, job_id, too_many(needs, most, self.resource))
            return
        options: dict[str, Any] = {"name": f"fitprobe-job-{job_id}"}
        if self.device_kind == "cuda":
            options["num_gpus"] = needs
            if self.settings.ray_accelerator_type:
                options["accelerator_type"] = self.settings.ray_accelerator_type
        else:
            options["resources"] = {DEVICE_RESOURCE: needs}
        ref = self._task.options(**options).remote(spec, list(self.settings.allowed_factories),
                                                   self.settings.hub_access == "offline")
        followed = RayJob(job_id, needs, ref, self.resource, self.node_devices)
        with self.jobs_lock:
            self.jobs[job_id] = followed
        self._db(self.store.add_event, job_id, phase(Phase.SCHEDULING, devices=needs,
                                                                   resource=self.resource))
        followed.thread = threading.Thread(target=self._follow, args=(followed,), name=f"fitprobe-ray-{job_id}",
                                             daemon=True)
        followed.thread.start()
        if self._db(self.store.get, job_id)["status"] == JobStatus.CANCELLED:  # cancelled before `kill` could find it
            ray.cancel(ref, force=True)

    # ---- following a job --------------------------------------------------------------------
    def _follow(self, job: RayJob) -> None:
        try:
            self._follower.record(job.job_id, self._follower.follow(job))
        except Stopping:
            return
        except Exception as exc:  # one job's failure in the service must not hang it in running
            log.exception("ray executor: following job %s failed", job.job_id)
            job.kill()
            self._db(self.store.fail, job.job_id, internal_error(exc))
        finally:
            with self.jobs_lock:
                self.jobs.pop(job.job_id, None)
            if self.metrics:
                self.metrics.job_duration_s.observe(time.monotonic() - job.started_s)
