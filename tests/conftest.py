"""Shared fixtures. GPU-marked tests run only where torch sees a CUDA device (the lent GPU)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) `gpu` tests on CPU-only machines: they have nothing to measure there."""
    if torch.cuda.is_available():
        return
    keep = [item for item in items if "gpu" not in item.keywords]
    dropped = [item for item in items if "gpu" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
