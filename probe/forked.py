"""Processes forked from a fork server that has already imported what they import.

A fresh interpreter spends its first seconds importing torch, fitprobe's library and transformers' model
code (about 5 s of CPU on the 2-core host), once per process: per job, and per device of a verification or
a sharded trial, every trial again. So fitprobe starts those processes through multiprocessing's fork
server: one process per parent that imports a preload module once and forks every child from there. The
service's jobs and model sizer fork from one that preloads app/executors/job_preload.py; the ranks a job
(or the CLI) starts fork from one that preloads probe/verify/rank_preload.py. multiprocessing keeps one
fork server per process, so the first preload asked for in a process is the one it gets; a child that
needs more imports it after the fork.

What fitprobe asks of every process it starts (probe/lifetime.py), a forked child keeps:
- it dies with its parent. The fork server dies when the thread of this process that started it ends
  (every preload module calls `die_with_parent` first): a thread of its own that lives as long as this
  process (`_owner`), so any death of this process ends it, `kill -9` too. Each child asks for SIGKILL
  when the fork server goes before it runs anything, and a child forked just as the server went finds
  another parent and exits at once (EXIT_ORPHANED).
- no inherited device state: a fork server only imports (no torch op, no CUDA).
- its parent's process group: the fork server is this process's child, the children are its own.
Its exit status comes back through the fork server: `exitcode` is negative for a signal, as
`subprocess`'s `returncode` was.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import multiprocessing.spawn
import os
import queue
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from fitprobe.probe.lifetime import EXIT_ORPHANED, die_with_parent

# read at import, so in a fork server: every preload module imports this module, so each child finds this pid as
# its parent's while the server lives (imported by the child itself instead, it would hold the child's own pid)
FORK_SERVER_PID = os.getpid()
_context = multiprocessing.get_context("forkserver")
log = logging.getLogger("fitprobe.forked")

_owner: threading.Thread | None = None
_owner_lock = threading.Lock()
_requests: queue.SimpleQueue[tuple[list[str], threading.Event]] = queue.SimpleQueue()


def start_fork_server(preload: list[str]) -> None:
    """Start this process's fork server now, preloading `preload`, so that its imports are done before a child.

    Idempotent: a fork server that runs already is kept, whatever it preloaded. It is started from one thread
    that lives as long as this process (`_owner`): the fork server dies when the thread that started it ends,
    and a worker's or a request's thread ends before the process does (an app's lifespan thread under a test
    client: every app after it would pay the imports again)."""
    global _owner
    with _owner_lock:
        if _owner is None:
            _owner = threading.Thread(target=_own_fork_server, name="fitprobe-fork-server", daemon=True)
            _owner.start()
    done = threading.Event()
    _requests.put((preload, done))
    done.wait()


def _own_fork_server() -> None:
    preloading = False
    while True:
        preload, done = _requests.get()
        try:
            if not preloading:  # the first asked for: a fork server that died comes back with it
                _context.set_forkserver_preload(preload)
                preloading = True
            multiprocessing.forkserver.ensure_running()  # a no-op while it runs; else (it died) a new one
        except Exception:  # the caller's fork then fails and says so; this thread must go on
            log.exception("the fork server did not start")
        finally:
            done.set()


def start_forked(preload: list[str], target: Callable[..., None], *args: Any, parent_main: bool = True) -> BaseProcess:
    """`target(*args)` in a process forked from this process's fork server, bound to die with it first.

    `target` must be importable by name and `args` picklable (a multiprocessing Connection travels as its fd).
    multiprocessing imports the parent's main module again in the child, as `__mp_main__` (why a script that starts
    fitprobe's service needs `if __name__ == "__main__":`); `parent_main=False` leaves it out, for children whose
    parent is anyone's script that calls fitprobe's library (the ranks: probe/verify/ranks.py)."""
    start_fork_server(preload)  # a no-op when it runs; else (it died) a new one
    kind = _context.Process if parent_main else _WithoutParentMain
    # daemon: a process that exits while its child runs ends it (multiprocessing joins other children at exit)
    process = kind(target=_guarded, args=(target, *args), name=f"fitprobe-{target.__name__}", daemon=True)
    process.start()
    return process


_get_preparation_data = multiprocessing.spawn.get_preparation_data
_preparing = threading.Lock()


def _without_parent_main(name: str) -> dict[str, Any]:
    data = _get_preparation_data(name)
    data.pop("init_main_from_name", None)
    data.pop("init_main_from_path", None)
    return data


class _PopenWithoutParentMain(multiprocessing.popen_forkserver.Popen):
    """The fork server's child, told nothing of the parent's main module: multiprocessing reads what the child
    imports from `spawn.get_preparation_data`, which has no switch for it, so it is swapped for the one launch. A
    job forked by another thread in that instant skips the main module too, which fitprobe's jobs never need."""

    def _launch(self, process_obj: Any) -> None:
        with _preparing:
            multiprocessing.spawn.get_preparation_data = _without_parent_main
            try:
                super()._launch(process_obj)  # type: ignore[misc]  # typeshed leaves the private method out
            finally:
                multiprocessing.spawn.get_preparation_data = _get_preparation_data


class _WithoutParentMain(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _PopenWithoutParentMain:
        return _PopenWithoutParentMain(process_obj)


def _guarded(target: Callable[..., None], *args: Any) -> None:
    die_with_parent()
    if os.getppid() != FORK_SERVER_PID:  # the server went before the line above: no signal will come
        os._exit(EXIT_ORPHANED)
    # daemonic in its parent, so that the parent's exit ends it; in here the flag would only forbid children of
    # its own (a job's ranks), which die with it as it dies with its parent
    multiprocessing.current_process().daemon = False
    target(*args)
