"""The reference the verification's gradient check compares against, computed without step.py.

The accumulated gradient of a plan must equal the full-batch mean gradient. The reference cuts the
same examples differently (whole when they fit at once, else other micro-batch sizes) and sums token
losses over all target tokens by hand, on the bare module (no DDP hooks), so a wrong loss
normalisation in step.py, or an all-reduce that averages where it should sum, shows as a difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import MicroBatch, global_target_tokens, token_loss_sum, trainable_parameters


def _chunks(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


def reference_sizes(plan_sizes: list[int], fits_at_once: int) -> list[int]:
    """Another cut of the same examples: whole when it fits, else halves of the plan's micro-batch."""
    total = sum(plan_sizes)
    sizes = _chunks(total, max(1, min(total, fits_at_once)))
    return sizes if sizes != plan_sizes else _chunks(total, max(1, plan_sizes[0] // 2))


def joined(micro_batches: list[MicroBatch]) -> MicroBatch:
    """The micro-batches as one batch again, to be cut the reference's way."""
    masks = [mb.attention_mask for mb in micro_batches if mb.attention_mask is not None]
    if masks and len(masks) != len(micro_batches):
        raise ValueError("micro-batches to join must all carry an attention mask or none of them")
    return MicroBatch(torch.cat([mb.input_ids for mb in micro_batches]), torch.cat([mb.labels for mb in micro_batches]),
                      torch.cat(masks) if masks else None)


def reference_gradient(model: LoadedModel, module: torch.nn.Module, batches: list[MicroBatch],
                       spec: ProbeSpec) -> list[torch.Tensor]:
    """The full-batch mean gradient, computed without step.py: sum of token losses / all target tokens.

    Runs on the bare module (no DDP hooks); across devices the summed gradients are all-reduced by hand.
    """
    module.zero_grad(set_to_none=True)
    total_tokens = max(global_target_tokens(batches), 1)
    for mb in batches:
        token_loss_sum(model, module, mb, spec).backward()
    grads = []
    for p in trainable_parameters(module):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(grad)
        grads.append(grad.detach().to("cpu", torch.float64) / total_tokens)
    module.zero_grad(set_to_none=True)
    return grads


def relative_error(params: list[torch.nn.Parameter], reference: list[torch.Tensor], scale: float = 1.0) -> float:
    """|G - G_ref| / |G_ref| over all trainable parameters, in float64 on the host."""
    diff_sq = ref_sq = 0.0
    for p, ref in zip(params, reference, strict=True):
        grad = p.grad.detach().to("cpu", torch.float64) / scale if p.grad is not None else torch.zeros_like(ref)
        diff_sq += float((grad - ref).pow(2).sum())
        ref_sq += float(ref.pow(2).sum())
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)


@contextmanager
def dropout_off(module: torch.nn.Module) -> Iterator[None]:
    """Dropout probabilities set to 0 (not eval mode, which would also switch checkpointing off).

    The gradient check compares two cuts of the same examples; with dropout on, each cut draws its
    own masks and the gradients differ by design. With p = 0 dropout returns its input, so this
    step holds no masks: the steps after it run with dropout and carry the memory peak.
    """
    saved: list[tuple[Any, str, float]] = []
    for owner in module.modules():
        for name in ("p", "attention_dropout", "attn_dropout_p", "dropout"):
            value = getattr(owner, name, None)
            if isinstance(value, float) and value > 0 and (name != "p" or isinstance(owner, torch.nn.Dropout)):
                saved.append((owner, name, value))
                setattr(owner, name, 0.0)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
