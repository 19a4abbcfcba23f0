"""Where jobs run: `make_executor` picks the local or the Ray executor from FITPROBE_EXECUTOR.

base.py holds what both share (the interface, retried store calls, the one follow loop); local.py
runs each job in a process on this machine, ray.py each as a task on a Ray cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fitprobe.app.config import Settings
from fitprobe.app.executors.base import Executor
from fitprobe.app.executors.local import LocalExecutor
from fitprobe.app.store import Store

if TYPE_CHECKING:
    from fitprobe.app.metrics import Metrics

__all__ = ["Executor", "make_executor"]


def make_executor(store: Store, settings: Settings, metrics: Metrics | None = None) -> Executor:
    if settings.executor == "ray":
        from fitprobe.app.executors.ray import RayExecutor  # ray is an optional extra: imported only when asked for

        return RayExecutor(store, settings, metrics)
    return LocalExecutor(store, settings, metrics)
