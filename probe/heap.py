"""Garbage collection that walks only what the trials made.

Every trial starts and ends with a full `gc.collect()` (a meter's `release`): reference cycles left
by the last step may hold tensors, and a byte count must not include them. A full collection walks
every tracked object in the process, and once torch, transformers and a model are loaded that is
half a million objects: about a quarter of an estimate's trial went into those walks, over objects
that live as long as the model does.

Inside `frozen_heap()`, `settle()` — called right after a model is built — collects everything
and freezes what survives (`gc.freeze`): the imports and the model. Until the next `settle` or the
end of the bracket, a release's collection walks only what was made since, which is what trials
make and drop. Freezing only ever follows a full collection of everything (`gc.unfreeze` first),
so no garbage is frozen, and a model dropped for the next build is collected by that build's
`settle`, before any trial counts bytes. The trials themselves never freeze: an object that lives
across a release and dies later (a model built per trial, as sharded estimates do) stays with the
collector.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # brackets open in this process: only the outermost one unfreezes


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Within this block `settle()` freezes what is alive; on leaving, everything is collectable again."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def settle() -> None:
    """After a build: inside `frozen_heap()`, collect everything and freeze the survivors; else nothing."""
    if _depth:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
