"""What every process fitprobe starts does first: die with the process that started it.

A job process, and the device processes it spawns, hold memory on the device. If their parent is
killed (even with `kill -9`, which runs no cleanup) they must not run on, holding a GPU that the
restarted service then hands to the next job.

The service's job processes and its model sizer fork from a preloaded fork server instead
(app/executors/forked.py), which keeps this guard and pays the caveat below once, at start-up. The
processes a job starts (the ranks of a verification or a sharded trial) start here, as
`python -m fitprobe.probe.lifetime PARENT_PID`, not through multiprocessing: a
spawned multiprocessing child first re-imports the parent's main module (`fitprobe.probe.cli`, hence torch)
and then unpickles its target (torch's `mp.spawn` wrapper, torch again), seconds in which a dead
parent leaves it running. This module imports nothing heavy: the guard is its first work, and only
then is the target unpickled from stdin and run.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import fitprobe  # only its location: the package itself is a docstring

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 70  # the parent was gone before the guard was set: the target never ran


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_guarded(target: Callable[..., None], args: tuple[Any, ...], **popen: Any) -> subprocess.Popen:
    """Run `target(*args)` in a fresh interpreter that dies with this process (this thread) from its start.

    `target` must be importable by name and `args` picklable; `popen` goes to `subprocess.Popen`.
    """
    # `-m fitprobe.probe.lifetime` must import wherever this process imported fitprobe from (a checkout, not
    # installed): the directory that holds the `fitprobe` package, whichever directory holds this file
    root = os.path.dirname(os.path.dirname(os.path.abspath(fitprobe.__file__)))
    env = popen.pop("env", None) or os.environ
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-m", "fitprobe.probe.lifetime", str(os.getpid())],
                               stdin=subprocess.PIPE, env=env, **popen)
    assert process.stdin is not None
    try:
        # the path first: unpickling the target imports its module, which may live on the parent's path only
        pickle.dump(sys.path, process.stdin)
        pickle.dump((target, args), process.stdin)
        process.stdin.close()
    except BrokenPipeError:
        pass  # it exited before reading (EXIT_ORPHANED, or killed): its exit code says so
    return process


def _main() -> None:
    die_with_parent()
    # a parent that died before the line above left this process to init, and no signal will come
    if os.getppid() != int(sys.argv[1]):
        os._exit(EXIT_ORPHANED)
    sys.path[:] = pickle.load(sys.stdin.buffer)
    target, args = pickle.load(sys.stdin.buffer)
    target(*args)


if __name__ == "__main__":
    _main()
