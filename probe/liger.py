"""`--liger`: Liger's patches for the model's family, counted under fake tensors.

Liger (`use_liger_kernel=True`) swaps RMSNorm, RoPE and SwiGLU for its own autograd functions and,
with the HF Trainer, the LM head and loss for a fused linear cross-entropy. Each of those functions
is Python host code that sizes its buffers, allocates them with torch (outputs, saved tensors,
`grad_input`, the fp32 weight-gradient accumulator, one chunk of logits at a time) and then launches
Triton kernels that write into them. A Triton kernel cannot allocate device memory, so the buffers
the host code allocates are everything the card holds for these layers: running the host code with
the launches skipped counts the same bytes without computing a value.

The rule for the fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py): with
BT tokens, hidden H and vocabulary V, `inc_factor = ceil(V / H)` and
`chunk_size = next_power_of_2(ceil(BT / inc_factor))`; one `[chunk_size, V]` logits chunk is alive at
a time (≈ BT × H elements), beside `grad_input` `[BT, H]` and the weight gradient `[V, H]` in fp32.
The plain head holds `[BT, V]` logits and their fp32 log-probabilities instead, so at a 32k vocabulary
Liger's peak is lower by about `BT × V × (logits + 4) bytes` less those buffers.

Two things make the host code run on fake tensors: every Triton launch (`kernel[grid](...)`) is a
no-op, and the few reads of a value (`.item()` of the count of non-ignored targets, `torch.equal` of
the incoming gradient with 1) get a plausible answer; neither changes a buffer's size.

Known limitations. This host has no CUDA, so the host code takes its CPU branches: on CUDA the
fused cross-entropy may reuse one logits buffer across chunks (`_can_use_mm_out`) and accumulate the
weight gradient with `addmm(out=...)`, where the CPU branch allocates each chunk's product anew (at
most one more chunk of logits). Liger patches the family's modeling module for the whole process, as
it does in a training script: fitprobe's service runs every job in its own process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_WRAPPED = "_fitprobe_fake_safe"


class _ValuesAnswered(TorchDispatchMode):
    """Answers the reads of a value that Liger's host code makes; entered inside the fake mode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # a count of targets or a sum of weights: a divisor of the loss, never a buffer size
            return 1.0 if args[0].dtype.is_floating_point else 1
        if func is torch.ops.aten.equal.default:
            return True  # grad_output == 1: the branch that skips a scaling kernel (which allocates nothing)
        return func(*args, **(kwargs or {}))


@contextmanager
def _launches_skipped() -> Iterator[None]:
    """`kernel[grid](...)` does nothing, for every Triton kernel (jit, autotuned or heuristic)."""
    from triton.runtime.jit import KernelInterface

    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch


def _fake_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd function's forward/backward as is on real tensors, with launches skipped on fake ones."""

    @functools.wraps(fn)
    def run(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(leaf, FakeTensor) for leaf in tree_leaves((args, kwargs))):
            return fn(ctx, *args, **kwargs)
        with _launches_skipped(), _ValuesAnswered():
            return fn(ctx, *args, **kwargs)

    setattr(run, _WRAPPED, True)
    return run


def _liger_functions() -> list[type[torch.autograd.Function]]:
    """Every autograd function Liger defines (the ones its patches call), once imported."""
    import liger_kernel.transformers  # noqa: F401  (imports the ops its patches use)

    found, todo = [], list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("liger_kernel."):
            found.append(cls)
    return found


def _make_fake_safe() -> None:
    for cls in _liger_functions():
        for name in ("forward", "backward"):
            fn = cls.__dict__.get(name)
            if isinstance(fn, staticmethod) and not getattr(fn.__func__, _WRAPPED, False):
                setattr(cls, name, staticmethod(_fake_safe(fn.__func__)))


def apply_liger(module: nn.Module, fused_linear_cross_entropy: bool) -> None:
    """What HF Trainer does with `use_liger_kernel=True`: transformers' own `apply_liger_kernel` on the model
    (PEFT unwrapped), with the kernel config the trainer sets."""
    from transformers.integrations.liger import apply_liger_kernel

    _make_fake_safe()
    apply_liger_kernel(module, {"fused_linear_cross_entropy": fused_linear_cross_entropy})
