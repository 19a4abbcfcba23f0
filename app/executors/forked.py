"""Job processes forked from a process that has already imported what every job imports.

A job process started as a fresh interpreter (probe/lifetime.py) spent its first seconds importing
torch, fitprobe's library and transformers' model code: on the 2-core host about 2.5 s of CPU before a
small job's first event, three times what a gpt-nano probe with its verification then costs (0.7 s). So
the local executor starts each job (and the model sizer, app/sizer.py) through multiprocessing's fork
server: one process that imports app/executors/job_preload.py once, at the service's start-up, and forks
every job from there.

What the fresh interpreter guaranteed, a forked job keeps:
- it dies with the service. The fork server is killed when the service's thread that started it ends
  (job_preload.py): a thread of its own that lives as long as the service, so any death of the service
  ends it (`kill -9` too), and nothing else does. Each job asks for SIGKILL when the fork server goes
  (`die_with_parent`) before it runs anything. A job forked just as the server went finds another parent
  and exits at once (EXIT_ORPHANED).
- no inherited device state: the fork server only imports (job_preload.py says why).
- its own session, the process group a cancel or a timeout kills whole, ranks included.
- its own TMPDIR, which the worker removes when the job ends, however it ends.
Its exit status reaches the service through the fork server: `exitcode` is negative for a signal, as
`subprocess`'s `returncode` was.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from fitprobe.probe.lifetime import EXIT_ORPHANED, die_with_parent

_PRELOAD = "fitprobe.app.executors.job_preload"
# the exit code multiprocessing gives a job whose fork server went away before reporting the job's own (the job
# then died too: it dies with the fork server)
LOST_WITH_FORK_SERVER = 255
# multiprocessing runs the service's main module again in each forked process, as `__mp_main__` (`fitprobe
# serve`, `python -m fitprobe.app.cli` and uvicorn's command are guarded already): a script of a user's own that
# starts the service must be too
MAIN_GUARD_HINT = ("a script that starts the service must do so under `if __name__ == \"__main__\":`, since "
                   "job processes import the main module again; or run `fitprobe serve`")
READY_TIMEOUT_S = 120.0  # the fork server's imports: seconds on the 2-core test host, more under load
_context = multiprocessing.get_context("forkserver")
log = logging.getLogger("fitprobe.executor")


def start_fork_server() -> None:
    """Start the fork server now, at the service's start-up, so that its imports are done before the first job.

    Idempotent: a fork server that runs already is kept (one per service process). It is started from one
    thread that lives as long as this process (`_owner`): the fork server dies when the thread that started
    it ends (job_preload.py), and a worker's or a request's thread ends before the service does (an app's
    lifespan thread under a test client: every app after it would pay the imports again)."""
    global _owner
    with _owner_lock:
        if _owner is None:
            _owner = threading.Thread(target=_own_fork_server, name="fitprobe-fork-server", daemon=True)
            _owner.start()
    done = threading.Event()
    _requests.put(done)
    done.wait()


_owner: threading.Thread | None = None
_owner_lock = threading.Lock()
_requests: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()


def _own_fork_server() -> None:
    _context.set_forkserver_preload([_PRELOAD])
    while True:
        done = _requests.get()
        try:
            multiprocessing.forkserver.ensure_running()  # a no-op while it runs; else (it died) a new one
        except Exception:  # the caller's fork then fails and says so; this thread must go on
            log.exception("the fork server did not start")
        finally:
            done.set()


def start_forked(target: Callable[..., None], *args: Any) -> BaseProcess:
    """`target(*args)` in a process forked from the fork server, bound to die with it before the target runs.

    `target` must be importable by name and `args` picklable (a multiprocessing Connection travels as its fd)."""
    start_fork_server()  # a no-op when it runs; else (it died) a new one
    # daemon: a service that exits while a job runs ends it (multiprocessing joins other children at exit)
    process = _context.Process(target=_guarded, args=(target, *args), name=f"fitprobe-{target.__name__}", daemon=True)
    process.start()
    return process


def wait_until_ready() -> None:
    """Return once the fork server forks: its imports done (the first call waits seconds, later ones a fork).

    A worker calls this before it claims a job, not inside the start of one: a worker blocked in `start_job`
    while the fork server imports renews no lease, and another replica takes the job and runs it again."""
    process = start_forked(_ready)
    process.join(READY_TIMEOUT_S)
    if process.exitcode is None:
        process.kill()
        raise RuntimeError(f"the fork server did not fork within {READY_TIMEOUT_S:g} s")
    if process.exitcode != 0:
        raise RuntimeError(f"the fork server's process exited with code {process.exitcode} before it forked")


def _ready() -> None:
    """Nothing: a process forked to learn that the fork server forks."""


def start_job(spec: dict[str, Any], allowed_factories: list[str], outbox: Connection, hub_offline: bool,
              scratch: str) -> BaseProcess:
    """The job `app/worker.py execute` runs, in a forked process of its own session; its items go to `outbox`."""
    return start_forked(_run_job, spec, allowed_factories, outbox, hub_offline, scratch)


def _guarded(target: Callable[..., None], *args: Any) -> None:
    die_with_parent()
    from fitprobe.app.executors import job_preload  # imported already: the fork server preloaded it

    if os.getppid() != job_preload.FORK_SERVER_PID:  # the server went before the line above: no signal will come
        os._exit(EXIT_ORPHANED)
    target(*args)


def _run_job(spec: dict[str, Any], allowed_factories: list[str], outbox: Connection, hub_offline: bool,
             scratch: str) -> None:
    os.setsid()
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # the fork server may have read TMPDIR already: read it again
    from fitprobe.app.worker import execute

    with outbox:
        execute(spec, allowed_factories, outbox.send, hub_offline)
