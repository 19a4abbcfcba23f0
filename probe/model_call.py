"""A transformers model called as HF Trainer and TRL call it in training: `use_cache=False`.

The Trainer sets `model.config.use_cache = args.use_cache` (False by default) and TRL passes
`use_cache=False`. The cache is not a detail: with one, transformers' mask code skips its packed-sequence
detection, so flattened rows (DataCollatorWithFlattening) would attend across each other with no
block-diagonal mask, and it changes what autograd keeps (Phi-3's values, copied into the cache, free its
fused qkv buffer early).

Without a cache, and with no attention mask, transformers decides from the *values* of the position ids
whether rows are packed (`masking_utils.find_packed_sequence_indices`: a position that does not follow
the one before starts a row). Fake tensors have no values, so under them transformers always assumes
packed rows and builds the explicit mask, which the real run builds only when rows restart. fitprobe
made the batch and knows the answer: position ids are passed exactly when several rows were flattened
into one (probe/step.py `flattened_batch`). Under fake tensors the detection answers from that; on real
tensors transformers reads the values as always.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor


def hf_logits(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of one training forward, the model called as the Trainer calls it."""
    with _rows_restart(position_ids is not None):
        if position_ids is not None:  # flattened rows: as DataCollatorWithFlattening's batches reach the model
            return module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits
        return module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@contextmanager
def _rows_restart(restart: bool) -> Iterator[None]:
    """Within: transformers' packed-sequence detection, on fake position ids, answers `restart`."""
    from transformers import masking_utils

    detect = masking_utils.find_packed_sequence_indices

    def as_the_batch_was_made(position_ids: torch.Tensor) -> torch.Tensor | None:
        if isinstance(position_ids, FakeTensor) and not restart:
            return None  # what the values would say: positions 0, 1, 2, ... in every row
        return detect(position_ids)

    masking_utils.find_packed_sequence_indices = as_the_batch_was_made
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = detect
