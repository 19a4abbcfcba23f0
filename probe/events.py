"""The progress callback every long step of the library announces itself through.

A caller (the CLI's progress line, the service's event stream) passes `emit`; a caller that wants
no progress passes nothing and gets `ignore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
Emit = Callable[[Event], None]


def ignore(_: Event) -> None:
    """The default `emit`: progress nobody asked for goes nowhere."""
    return None
