"""Shared fixtures. GPU-marked tests run only where torch sees a CUDA device (the lent GPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.postgres import create_database, postgres_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) `gpu` tests on CPU-only machines: they have nothing to measure there."""
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
