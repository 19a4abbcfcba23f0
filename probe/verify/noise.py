"""The gradient noise scale B_simple, from gradient norms the verification run measures anyway.

B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A): the batch size past which more examples per step buy little. Both terms come from the
squared gradient norms at two batch sizes at the same weights: one micro-batch alone (|G_small|²)
and the accumulated effective batch (|G_big|²). Each step gives one noisy pair; the estimate
averages the terms over steps before dividing.
"""

from __future__ import annotations

import statistics

import torch

from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import MicroBatch, token_loss_sum, trainable_parameters


def squared_norm(params: list[torch.nn.Parameter], scale: float = 1.0) -> float:
    """|grad|² without a parameter-sized temporary (vector_norm reduces in place)."""
    total = sum(float(torch.linalg.vector_norm(p.grad.float())) ** 2 for p in params if p.grad is not None)
    return total / scale**2


def micro_batch_squared_norm(model: LoadedModel, module: torch.nn.Module, mb: MicroBatch, spec: ProbeSpec) -> float:
    """|G_small|²: the gradient of one micro-batch alone, mean over its own target tokens."""
    module.zero_grad(set_to_none=True)
    (token_loss_sum(model, module, mb, spec) / max(mb.target_tokens(), 1)).backward()
    value = squared_norm(trainable_parameters(module))
    module.zero_grad(set_to_none=True)
    return value


def noise_terms(small_sq: float, big_sq: float, small_batch: int, big_batch: int) -> tuple[float, float]:
    """Unbiased |G|² and tr(Σ) estimates from two batch sizes (McCandlish et al. 2018, eq. A.2-A.3)."""
    g2 = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    s = (small_sq - big_sq) / (1 / small_batch - 1 / big_batch)
    return g2, s


def noise_scale(g2_per_step: list[float], s_per_step: list[float], effective_batch: int) -> tuple[float | None, str]:
    """B_simple from each step's terms, and a sentence saying what it is worth; None where not estimable."""
    if not g2_per_step:
        return None, "not estimated: the effective batch equals the micro-batch, so there are no two batch sizes to compare"
    g2, s = statistics.fmean(g2_per_step), statistics.fmean(s_per_step)
    if g2 <= 0 or s <= 0:
        return None, (f"not estimated: after {len(g2_per_step)} steps the estimate of |G|² or of the noise is not "
                      "positive, i.e. noise dominates; run more verify steps")
    value = s / g2
    relation = "below" if value < effective_batch else "above"
    return value, (f"B_simple ≈ {value:.3g} examples, {relation} your effective batch of {effective_batch}. Far above "
                   "B_simple, more examples per step buy little; far below, steps are dominated by noise. This is "
                   f"a noisy estimate from {len(g2_per_step)} steps at random initialisation on synthetic data: treat "
                   "it as an order of magnitude, not a target")
