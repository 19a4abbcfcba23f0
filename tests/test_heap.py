"""What probe/heap.py promises a trial: no garbage frozen, no dropped model kept, the imports left out of each walk."""

from __future__ import annotations

import gc
import weakref

from torch import nn

from fitprobe.probe.heap import frozen_heap, settle


class CyclicModel(nn.Module):
    """A model in a reference cycle, as hooks and closures make them: only the cycle collector frees it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.me = [self]


def test_garbage_alive_when_the_block_begins_is_collected_not_frozen():
    dropped = CyclicModel()
    weight = weakref.ref(dropped.linear.weight)
    del dropped
    with frozen_heap():
        assert weight() is None


def test_a_model_dropped_for_the_next_build_is_collected_at_that_builds_settle():
    with frozen_heap():
        first = CyclicModel()
        settle()
        weight = weakref.ref(first.linear.weight)
        first = CyclicModel()  # the next build replaces the first
        settle()
        assert weight() is None, "a dropped build must not hold its tensors (on a GPU: device memory) into the next"
        assert first.linear.weight.shape == (8, 8)


def test_the_block_freezes_what_was_alive_once_and_nothing_it_makes():
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0, "the imports and what the caller holds are left out of the trials' walks"
        built = [CyclicModel() for _ in range(5)]
        settle()
        with frozen_heap():  # an inner block (an evaluation inside a job) freezes nothing more
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen, "what the block builds stays collectable"
        del built
    assert gc.get_freeze_count() == 0, "leaving the block makes everything collectable again"
