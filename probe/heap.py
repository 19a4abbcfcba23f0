"""Garbage collection that walks only what the trials made.

Every trial starts and ends with a full `gc.collect()` (a meter's `release`): reference cycles left
by the last step may hold tensors, and a byte count must not include them. A full collection walks
every tracked object in the process, and once torch and transformers are imported that is half a
million objects: about a quarter of an estimate's trial went into those walks, over objects that
live as long as the process does.

`frozen_heap()` collects once on entry and freezes what survives (`gc.freeze`): the imports, and
whatever its caller holds. Until the block ends, a collection walks only what was made since: the
models built inside it and what trials make and drop. Those are a few thousand objects even for an
80-layer preset (modules, their dicts, parameters), so the models are never frozen: a model dropped
for the next build is garbage the next collection can reach, and a frozen one would outlive its
build (on a GPU, holding device memory that later trials would count). `settle()`, called right
after a build, collects what the previous build left, before any trial counts bytes. Freezing only
ever follows a collection, so no garbage is frozen; leaving the outermost block unfreezes everything.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # brackets open in this process: only the outermost one freezes and unfreezes


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Within this block collections skip what was alive when it began; on leaving, everything is collectable again."""
    global _depth
    if _depth == 0:
        gc.collect()
        gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


def settle() -> None:
    """After a build: inside `frozen_heap()`, collect what the last build left (a walk of what the block made)."""
    if _depth:
        gc.collect()
