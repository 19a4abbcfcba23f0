"""Shared fixtures. GPU-marked tests run only where torch sees a CUDA device (the lent GPU)."""

from __future__ import annotations

import gc
import inspect
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.postgres import create_database, postgres_server

# pytest-xdist runs the suite in parallel workers (pyproject's addopts): each gets its share of the cores,
# and so do the processes it starts (servers, job processes, ranks), instead of every one taking them all
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Where torch sees a GPU the tests measure it: parallel workers would measure each other, so one process."""
    if torch.cuda.is_available() and getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0
        config.option.dist = "no"


def pytest_report_header() -> str:
    """Whether this CPU multiplies bf16 natively, so that a CI log explains its own time.

    Without AVX512-BF16 or AMX, torch's bf16 matmul on the CPU runs about 35 times slower than fp32
    (tests/reference_loop.py `quarter_vocabulary` has the measurement), which moves the suite's time by minutes; the
    tests that really compute in bf16 keep their models small for it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "bf16 matmul on this CPU: unknown (no /proc/cpuinfo)"
    native = sorted({"avx512_bf16", "amx_bf16"} & set(flags))
    if native:
        return f"bf16 matmul on this CPU: native ({', '.join(native)})"
    return "bf16 matmul on this CPU: emulated, about 35x slower than fp32"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports made (torch, transformers, the test modules): it lives for the whole run.

    Every trial starts and ends with a full `gc.collect()` (the meters' `release`), and a full collection
    walks every tracked object; on the 2-core CI host the ~200k objects of the imports alone cost 0.2-0.4 s
    per walk, a fifth of a small trial. Frozen objects are still freed by reference counting; only the cycle
    collector stops visiting them, and nothing created by a test is frozen.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _imports_stay_frozen() -> Iterator[None]:
    """Freeze the imports again after a test that thawed them, without collecting first (on CPU-only hosts).

    A probe or estimate brackets its trials in `frozen_heap()` (probe/heap.py), whose outermost exit
    unfreezes everything, the imports frozen above included: every later trial in that worker would walk
    them again at each release. A collection before the freeze would cost a full walk (0.3 s on the CI host)
    after every such test, most of the suite's teardown time; without it, what the test left in reference
    cycles is frozen with the imports until the next build's `settle()`, which unfreezes and collects
    everything before any trial counts bytes. A CPU meter counts only what its own trials allocate, so a
    frozen leftover changes no reading; the CUDA allocator's statistics would count it, so where torch sees a
    GPU the leftovers are collected first, as before.
    """
    yield
    if gc.get_freeze_count() == 0:
        if torch.cuda.is_available():
            gc.collect()
        gc.freeze()


# The pyramid, one marker per layer (`python -m pytest -m unit` ...): the library's parts, the estimate engine (fake
# tensors, cuts, replay, what-if), the service's routes in process (TestClient), and the wire (a real uvicorn or
# other processes talking HTTP). A test's layer follows from where it lives and what it starts, so a new test
# needs no marker of its own.
ESTIMATE_MODULES = {"test_estimate", "test_cache_key", "test_extrapolate", "test_replay", "test_whatif", "test_cuda_attention",
                    "test_presets", "test_sharding", "test_qlora"}


def layer(item: pytest.Item) -> str:
    """unit, estimate, api or wire: the pyramid's layer of one collected test."""
    path = Path(str(item.fspath))
    if path.parent.name == "api":
        function = getattr(item, "function", None)
        starts_a_server = function is not None and "start_server(" in inspect.getsource(function)
        return "wire" if "server" in getattr(item, "fixturenames", ()) or starts_a_server else "api"
    return "estimate" if path.stem in ESTIMATE_MODULES else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer; deselect (not skip) `gpu` tests on CPU-only machines: nothing to measure there."""
    for item in items:
        item.add_marker(layer(item))
    if torch.cuda.is_available():
        return
    keep = [item for item in items if "gpu" not in item.keywords]
    dropped = [item for item in items if "gpu" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """One PostgreSQL server for the session (started on first use); each test takes its own database."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres: str) -> str:
    return create_database(postgres)
