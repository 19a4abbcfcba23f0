"""Job processes forked from a process that has already imported what every job imports.

A job process started as a fresh interpreter spent its first seconds importing
torch, fitprobe's library and transformers' model code: on the 2-core host about 2.5 s of CPU before a
small job's first event, three times what a gpt-nano probe with its verification then costs (0.7 s). So
the local executor starts each job (and the model sizer, app/sizer.py) through multiprocessing's fork
server: one process that imports app/executors/job_preload.py once, at the service's start-up, and forks
every job from there.

What the fresh interpreter guaranteed, a forked job keeps (probe/forked.py, the fork server's machinery, says
how): it dies with the service, `kill -9` too; it inherits no device state; and here it gets
- its own session, the process group a cancel or a timeout kills whole, ranks included (the ranks' own fork
  server is the job's child: probe/verify/ranks.py).
- its own TMPDIR, which the worker removes when the job ends, however it ends.
Its exit status reaches the service through the fork server: `exitcode` is negative for a signal, as
`subprocess`'s `returncode` was.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from fitprobe.probe import forked

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
log = logging.getLogger("fitprobe.executor")


def start_fork_server() -> None:
    """Start the fork server now, at the service's start-up, so that its imports are done before the first job
    (probe/forked.py: one per process, owned by a thread that lives as long as the service)."""
    forked.start_fork_server([_PRELOAD])


def start_forked(target: Callable[..., None], *args: Any) -> BaseProcess:
    """`target(*args)` in a process forked from the service's fork server, bound to die with it before the target
    runs. `target` must be importable by name and `args` picklable (a Connection travels as its fd)."""
    return forked.start_forked([_PRELOAD], target, *args)


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


def _run_job(spec: dict[str, Any], allowed_factories: list[str], outbox: Connection, hub_offline: bool,
             scratch: str) -> None:
    os.setsid()
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # the fork server may have read TMPDIR already: read it again
    from fitprobe.app.worker import execute

    with outbox:
        execute(spec, allowed_factories, outbox.send, hub_offline)
