"""What every process fitprobe starts does first: die with the process that started it.

A job process, and the device processes it spawns, hold memory on the device. If their parent is
killed (even with `kill -9`, which runs no cleanup) they must not run on, holding a GPU that the
restarted service then hands to the next job.

Every process fitprobe starts (the service's jobs and model sizer, the ranks of a verification or a
sharded trial) is forked from a preloaded fork server (probe/forked.py), whose preload calls
`die_with_parent` first, as each forked child does before its target runs. This module imports
nothing heavy, so a preload can guard itself before its imports.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 70  # the parent was gone before the guard was set: the target never ran


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
