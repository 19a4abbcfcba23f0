"""The peak by category: what the bytes at a trial's peak are for, summing to the peak exactly.

Users size a run with calculators that add weights, gradients, optimizer state and activations; the
breakdown says which of those a measured (or estimated) peak is made of. Every storage the meter counts
carries one category, given when it is allocated and moved when the step learns what it is:

- `weights`: everything live when the trial starts but its batches: the model's parameters and
  buffers (and a quantized model's constants);
- `batch`: the trial's token ids, labels and masks;
- `gradients`: a parameter's `.grad`, from the moment autograd accumulates it
  (`register_post_accumulate_grad_hook`);
- `optimizer_state`: the tensors in `optimizer.state`, from the end of the step that made them;
- `activations`: what the forward leaves live for the backward, read when it reaches the LM head
  (saved tensors, and the layer inputs gradient checkpointing keeps);
- `loss_head`: what the LM head and the loss allocate, from the head's forward until the backward
  leaves it (the logits, their float copy, the loss's buffers, the logits' gradient);
- `temporaries`: everything else (an op's workspace, a layer's intermediate outputs before the head,
  the backward's gradients of activations, an optimizer's scratch).

The meter keeps one byte count per category beside its live count, so the categories always add up to
the live bytes, and it keeps the counts of the latest moment at the peak. Cheap: a retag is a dict
lookup, and the whole-heap pass (temporaries become activations) runs once per micro-step.

Known limitations: a buffer is classed by what it is at the peak's moment, so a gradient buffer that an
op has just written and autograd has not yet assigned to `.grad` is a temporary; optimizer state made
during the first step is a temporary until that step ends (the trial's later steps hold it as state);
activations that exist before the forward reaches the head are temporaries; CUDA's allocator has no
per-allocation hook here, so a measured CUDA trial reports no breakdown (estimate for the card instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch only where the step runs: the report and the command line read the names without it
    import torch
    from torch import nn

    from fitprobe.probe.step import MicroBatch

CATEGORIES = ("weights", "batch", "gradients", "optimizer_state", "activations", "loss_head", "temporaries")
WEIGHTS, BATCH, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, LOSS_HEAD, TEMPORARIES = range(len(CATEGORIES))
CUDA_NOT_BROKEN_DOWN = ("a measured CUDA trial has no breakdown: the caching allocator's statistics do not say "
                        "what each allocation is for; an estimate for the card (--estimate --gpu) has one")


class Tagger(Protocol):
    """What a meter offers the step to class its storages (probe/meter.py CpuMeter; CUDA's do nothing)."""

    def tag(self, tensors: list[torch.Tensor], category: int) -> None: ...
    def allocate_as(self, category: int) -> None: ...
    def keep_for_backward(self) -> None: ...


def as_dict(counts: list[int] | tuple[int, ...]) -> dict[str, int]:
    """Bytes by category name, in CATEGORIES' order."""
    return dict(zip(CATEGORIES, counts, strict=True))


_SHORT_NAMES = {"gradients": "grads", "optimizer_state": "optimizer", "loss_head": "loss head"}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def describe(peak_bytes: int, breakdown: dict[str, int]) -> str:
    """One short line: `peak 1.23 GiB = weights 0.40 + grads 0.40 + optimizer 0.20 + ...`, in the peak's unit,
    the categories that hold any bytes."""
    unit, size = next(((name, size) for name, size in _UNITS if peak_bytes >= size), _UNITS[-1])
    parts = [f"{_SHORT_NAMES.get(name, name)} {n_bytes / size:.2f}" for name, n_bytes in breakdown.items() if n_bytes]
    return f"peak {peak_bytes / size:.2f} {unit} = {' + '.join(parts)}"


def output_head(module: nn.Module) -> nn.Module | None:
    """The module that turns hidden states into logits (HF's output embeddings, the builtin GPT's lm_head)."""
    from torch import nn

    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(module, "lm_head", None)
    return head if isinstance(head, nn.Module) else None


@contextmanager
def classified(meter: Tagger, module: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[MicroBatch]) -> Iterator[None]:
    """Hooks that tell `meter` what the step's storages are, for the step run inside; removed on leaving.

    Call right after the meter's trial started (everything live then is weights); the batches are tagged here.
    """
    import torch

    meter.tag([t for mb in batches for t in (mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids)
               if t is not None], BATCH)
    with ExitStack() as hooks:
        for parameter in module.parameters():
            if parameter.requires_grad:
                hooks.callback(parameter.register_post_accumulate_grad_hook(
                    lambda p: meter.tag([p.grad], GRADIENTS) if p.grad is not None else None).remove)

        def state_made(opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
            meter.tag([t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)],
                      OPTIMIZER_STATE)

        hooks.callback(optimizer.register_step_post_hook(state_made).remove)
        # a micro-step's forward starts as temporaries (also when the last one left the head's context on)
        hooks.callback(module.register_forward_pre_hook(lambda *_: meter.allocate_as(TEMPORARIES)).remove)
        head = output_head(module)
        if head is not None:
            hooks.callback(head.register_forward_pre_hook(_entering_head(meter)).remove)
        yield


def _entering_head(meter: Tagger) -> Callable[[nn.Module, tuple], None]:
    """The head's pre-hook: the forward's leftovers become activations, and allocations the loss head's until
    the backward has passed the head again (the gradient of its input is ready)."""
    import torch

    def entering(_module: nn.Module, args: tuple) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # recomputed inside a backward: not the forward reaching the head
        meter.keep_for_backward()
        meter.allocate_as(LOSS_HEAD)
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if hidden is not None and hidden.requires_grad:
            hidden.register_hook(lambda _grad: meter.allocate_as(TEMPORARIES))

    return entering
