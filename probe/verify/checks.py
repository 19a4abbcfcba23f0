"""The verification: train a few optimizer steps with the plan, for real, and check it holds up.

The run itself (probe/verify/run.py) trains the plan on every device and records what it measured;
this module turns that record into the checks a person reads: no OOM, peak memory within capacity
minus headroom, finite loss, loss goes down, accumulated gradient == gradient of the same examples
cut differently (relative error, probe/verify/gradient_check.py), and the examples per optimizer step
across devices == the effective batch. The gradient noise scale comes from probe/verify/noise.py.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Collection

from fitprobe.probe.events import Emit, verify_step
from fitprobe.probe.verify.noise import noise_scale
from fitprobe.probe.plan import Plan
from fitprobe.probe.report import Check, Verification
from fitprobe.probe.spec import ProbeSpec, SpecError, format_bytes
from fitprobe.probe.verify.run import RankResult, run_rank, run_spawned

# Relative error allowed between the accumulated and the reference gradient. fp32 must agree to
# rounding; 16-bit matmuls round differently for different batch shapes.
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16-mixed": 2e-2, "fp16-mixed": 2e-2, "bf16": 5e-2}
# Each verify step trains the whole effective batch, and the gradient check adds one more pass over
# it: two steps (the fewest the loss check can compare) keep verification near the probe's own time.
DEFAULT_VERIFY_STEPS = 2


def run_verification(spec: ProbeSpec, plan: Plan, steps: int = DEFAULT_VERIFY_STEPS, allowed_factories: Collection[str] = (),
                     fits_at_once: int | None = None, emit: Emit | None = None,
                     rows: list[list[int]] | None = None) -> Verification:
    """Train `steps` optimizer steps with the plan and report every check.

    `fits_at_once` is the largest micro-batch known to fit (the probe's max): the reference gradient
    uses one batch of that many examples per device at most. `emit` hears each step as it starts
    (on one device; spawned devices report when they are done). `rows`, the user's token ids, replace
    the synthetic batches, so the gradient noise scale is their data's.
    """
    if steps < 2:
        raise SpecError(f"verify_steps must be at least 2 (got {steps}): the loss check compares the first and last step")
    fits_at_once = fits_at_once or plan.split.micro_batch
    started_s = time.perf_counter()
    if plan.split.num_devices > 1:
        result = run_spawned(spec, plan, steps, allowed_factories, fits_at_once, rows)
    else:
        def on_step(step: int) -> None:
            if emit:
                emit(verify_step(step, steps))

        result = run_rank(spec, plan, steps, 0, 1, allowed_factories, fits_at_once, on_step, rows)
    batches = (f"the data's first {min(len(rows), plan.split.effective_batch)} rows" if rows else
               "synthetic: random tokens, rows from a quarter of seq_len to all of it")
    return _report(spec, plan, steps, result, batches, round(time.perf_counter() - started_s, 3))


def _checks(spec: ProbeSpec, plan: Plan, r: RankResult) -> list[Check]:
    limit_bytes = int(r.capacity_bytes * (1 - spec.headroom))
    peak = max(r.peak_reserved_bytes, default=0)
    tolerance = GRAD_TOLERANCE[spec.precision]
    target = plan.split.target_batch
    checks = [Check("no_oom", r.oom is None, r.oom or f"{len(r.losses)} optimizer steps ran without running out of memory")]
    if r.oom is not None:
        return checks + [Check(name, False, "not run: the step ran out of memory") for name in
                         ("memory_within_headroom", "finite_loss", "loss_decreases", "gradient_equivalence",
                          "examples_per_step") + (("tokens_per_step",) if spec.effective_batch_tokens else ())]
    checks.append(Check(
        "memory_within_headroom", peak <= limit_bytes,
        f"peak {format_bytes(peak)} per step of {format_bytes(r.capacity_bytes)} capacity; the limit with "
        f"{spec.headroom:.0%} headroom is {format_bytes(limit_bytes)}",
    ))
    finite = all(math.isfinite(loss) for loss in r.losses)
    checks.append(Check("finite_loss", finite, f"losses per step: {[round(loss, 4) for loss in r.losses]}"))
    checks.append(Check(
        "loss_decreases", finite and r.losses[-1] < r.losses[0],
        f"loss {r.losses[0]:.4f} → {r.losses[-1]:.4f} over {len(r.losses)} steps on a repeated batch",
    ))
    error = r.grad_rel_error
    checks.append(Check(
        "gradient_equivalence", error is not None and error < tolerance,
        f"accumulated gradient vs the same examples cut as {r.reference_split} (device 0): relative error "
        f"{error:.2e} (must be < {tolerance:g} in {spec.precision})",
    ))
    checks.append(Check(
        "examples_per_step", r.examples_per_step == target,
        f"{r.examples_per_step} examples per optimizer step across {plan.split.num_devices} device(s); "
        f"effective batch {target}",
    ))
    if spec.effective_batch_tokens is not None:
        checks.append(Check(
            "tokens_per_step", r.input_tokens_per_step == spec.effective_batch_tokens,
            f"{r.input_tokens_per_step} tokens fed per optimizer step across {plan.split.num_devices} device(s) "
            f"(counted from the trained batches); effective_batch_tokens {spec.effective_batch_tokens}",
        ))
    return checks


def _noise_scale(r: RankResult, effective_batch: int) -> tuple[float | None, str]:
    if r.oom is not None:
        return None, "not estimated: the run ran out of memory"
    return noise_scale(r.noise_g2, r.noise_s, effective_batch)


def _report(spec: ProbeSpec, plan: Plan, steps: int, r: RankResult, batches: str, wall_s: float) -> Verification:
    checks = _checks(spec, plan, r)
    noise, note = _noise_scale(r, plan.split.effective_batch)
    steady_s = statistics.median(r.step_s[1:]) if len(r.step_s) > 1 else None
    return Verification(
        passed=all(c.passed for c in checks),
        checks=checks,
        grad_rel_error=r.grad_rel_error,
        gradient_noise_scale=noise,
        gradient_noise_note=note,
        peak_reserved_bytes=max(r.peak_reserved_bytes, default=None),
        capacity_bytes=r.capacity_bytes,
        # the first step also creates the optimizer state: the median of the others is the steady step
        step_s=steady_s,
        tokens_per_s=r.tokens_per_step / steady_s if steady_s else None,
        losses=r.losses,
        steps=steps,
        micro_batch=plan.split.micro_batch,
        accumulation_steps=plan.split.accumulation_steps,
        num_devices=plan.split.num_devices,
        examples_per_step=r.examples_per_step,
        input_tokens_per_step=r.input_tokens_per_step,
        reference_split=r.reference_split,
        batches=batches,
        wall_s=wall_s,
    )


def format_verification(verification: Verification) -> str:
    """The verification as a few lines a person reads at a terminal."""
    verdict = "PASSED" if verification.passed else "FAILED"
    lines = [f"verification: {verdict} ({verification.steps} optimizer steps, {verification.num_devices} device(s))"]
    for check in verification.checks:
        lines.append(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    if verification.step_s:
        lines.append(f"  step {verification.step_s:.3f}s, {verification.tokens_per_s:.0f} tokens/s")
    lines.append(f"  gradient noise scale: {verification.gradient_noise_note}")
    return "\n".join(lines)
