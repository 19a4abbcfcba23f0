"""Requests per client per minute for the routes that store nothing (a synchronous plan): the store's
count of a client's rows (app/store.py) bounds the others. Kept in this replica's memory, so with several
replicas a client gets the limit on each."""

from __future__ import annotations

import threading
import time
from collections import deque

from fitprobe.app.store import ClientQuota

WINDOW_S = 60


class PerClientRate:
    """At most `per_minute` calls of one client in any WINDOW_S; beyond, ClientQuota naming `setting`."""

    def __init__(self, per_minute: int, setting: str) -> None:
        self.per_minute, self.setting = per_minute, setting
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, calls in self._calls.items() if calls[-1] <= now - WINDOW_S]:
                del self._calls[key]  # clients idle for a window: the table holds only recent ones
            calls = self._calls.setdefault(client, deque())
            while calls and calls[0] <= now - WINDOW_S:
                calls.popleft()
            if len(calls) >= self.per_minute:
                retry_after_s = max(int(calls[0] + WINDOW_S - now) + 1, 1)
                raise ClientQuota(f"this client made {len(calls)} of these requests in the last {WINDOW_S} s, its "
                                  f"limit ({self.setting}={self.per_minute}); retry later", retry_after_s)
            calls.append(now)
