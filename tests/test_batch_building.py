"""Synthetic batches: the same labels and mask as a per-row loop writes them, at a cost that does not grow
with the rows (an estimate at micro-batch 65,536 held the device ~20 minutes building them row by row)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import IGNORE_INDEX, synthetic_batch, worst_case_batch


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_labels_and_mask_are_those_a_loop_over_the_rows_writes():
    lengths = [7, 7, 5, 9, 9, 9, 1, 0, 12, 3, 3]
    seq_len = 9
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(100, len(lengths), seq_len, "cpu", generator, lengths)
    ids = batch.input_ids
    labels = torch.full_like(ids, IGNORE_INDEX)  # the loop users write: shift, then cut each row at its length
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        for position in range(seq_len):
            if position < min(length, seq_len) - 1:
                labels[row, position] = ids[row, position + 1]
            if position >= length:
                mask[row, position] = 0
    assert torch.equal(batch.labels, labels) and torch.equal(batch.attention_mask, mask)
    assert batch.row_targets == tuple(max(min(n, seq_len) - 1, 0) for n in lengths)


def test_a_worst_case_padded_batch_costs_the_same_ops_at_65536_rows_as_at_4():
    spec = ProbeSpec(model="builtin:gpt-nano", seq_len=4, collation="padded")
    counts = []
    for rows in (4, 65_536):
        with CountOps() as counter:
            worst_case_batch(10, rows, spec, "cpu", torch.Generator().manual_seed(0))
        counts.append(counter.ops)
    assert counts[0] == counts[1]
