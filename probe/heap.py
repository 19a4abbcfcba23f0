"""Garbage collection that walks only what the trials made.

Every trial starts and ends with a full `gc.collect()` (a meter's `release`): reference cycles left
by the last step may hold tensors, and a byte count must not include them. A full collection walks
every tracked object in the process, and after torch, transformers and a model are loaded that is
half a million objects: about a quarter of an estimate's trial went into those walks, over objects
that live as long as the job does.

Inside `frozen_heap()`, each release collects and then freezes what survived (`gc.freeze`), so the
next collection walks only what was made since. Freezing follows a full collection, so it keeps
only live objects; one that becomes cyclic garbage later waits until the bracket ends (then
`gc.unfreeze()` hands it back to the collector). A trial's own objects (optimizer state,
activations, an OOM's frames) are made and dropped between two releases, so they are never frozen.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # brackets open in this process: only the outermost one unfreezes


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Within this block `collect()` freezes what survives it; on leaving, everything is collectable again."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def collect() -> None:
    """A full collection (what a meter's release needs); inside `frozen_heap()`, the survivors are frozen."""
    gc.collect()
    if _depth:
        gc.freeze()
