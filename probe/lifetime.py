"""What every process fitprobe starts does first: die with the process that started it.

A job process, and the device processes its verification spawns, hold memory on the device. If
their parent is killed (even with `kill -9`, which runs no cleanup) they must not run on, holding a
GPU that the restarted service then hands to the next job.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
