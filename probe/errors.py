"""The library's one error for a request it cannot run as given.

Its own module, below every other: probe/spec.py raises it while validating, and the modules spec
asks (e.g. probe/gpus.py for a card's capacity) raise it too, without importing spec back.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A request that cannot be run as given; the message says what to change."""
