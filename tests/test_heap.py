"""What probe/heap.py promises a trial: no garbage frozen, no dropped build kept, the imports left out of each walk."""

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


def test_garbage_is_collected_before_a_build_is_frozen_never_frozen_with_it():
    dropped = CyclicModel()
    weight = weakref.ref(dropped.linear.weight)
    del dropped
    with frozen_heap():
        settle()
        assert weight() is None


def test_a_build_dropped_for_the_next_is_collected_at_that_builds_settle():
    with frozen_heap():
        first = CyclicModel()
        settle()
        weight = weakref.ref(first.linear.weight)
        first = CyclicModel()  # the next build replaces the first
        settle()
        assert weight() is None, "a dropped build must not hold its tensors (on a GPU: device memory) into the next"


def test_a_settled_build_and_the_imports_are_left_out_of_the_trials_walks_until_the_block_ends():
    with frozen_heap():
        build = CyclicModel()
        settle()
        assert gc.get_freeze_count() > 0
        walked = set(map(id, gc.get_objects()))  # what a collection visits: the frozen are not among them
        assert id(build) not in walked and id(build.linear) not in walked, "a trial's collection walks neither"
    del build
    assert gc.get_freeze_count() == 0, "leaving the block makes everything collectable again"
