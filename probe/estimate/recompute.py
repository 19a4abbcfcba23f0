"""Gradient checkpointing's recomputation under the torch function modes its forward ran under.

torch's non-reentrant checkpoint recomputes a block inside the backward, where the torch function
modes active at the forward are not: an estimate for a named card, whose SDPA calls run as that card's
CUDA kernels (probe/estimate/cuda_attention.py, a TorchFunctionMode), would recompute them as the host's kernels,
save a different set of tensors, and torch stops the backward ("a different number of tensors was saved
during the original forward and recomputation"). `context_fn` re-enters the forward's modes for the
recomputation; where none is active (every measured run) it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

from torch.overrides import _get_current_function_mode_stack


def context_fn() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """checkpoint's (forward, recomputation) contexts: nothing, then the forward's function modes again."""
    modes = list(_get_current_function_mode_stack())
    return nullcontext(), _entered(modes)


@contextmanager
def _entered(modes: list[Any]) -> Iterator[None]:
    with ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


# what every checkpointed block is run with: torch's non-reentrant checkpoint, as users enable it
CHECKPOINT_KWARGS: dict[str, Any] = {"use_reentrant": False, "context_fn": context_fn}
