"""A result that several tests read, computed once per test run even when xdist splits them across workers.

pytest-xdist's worksteal hands a module's tests to whichever worker is idle, and a module-scoped fixture
runs once per worker that gets one of them: an expensive shared table would be built twice on the 2-core
CI host. The first worker to ask builds it and pickles it into the run's shared temporary directory; the
others wait on the lock and read it (pytest-xdist's documented recipe for session-wide data).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import pytest
from filelock import FileLock

T = TypeVar("T")


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, produce: Callable[[], T]) -> T:
    """`produce()` run by the first process of this test run that asks for `name`; the others get a copy."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return produce()
    shared = tmp_path_factory.getbasetemp().parent / f"{name}.pickle"
    with FileLock(f"{shared}.lock"):
        if shared.is_file():
            return pickle.loads(shared.read_bytes())
        result = produce()
        shared.write_bytes(pickle.dumps(result))
        return result
