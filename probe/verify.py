"""The verification run: train a few optimizer steps with the plan, for real, and check it holds up.

The steps are THE training step of probe/step.py (`accumulate_gradients` then `optimizer_step`, the
two calls `train_step` makes), paused between the two to read the accumulated gradient. Data is
synthetic with variable-length (padded) sequences, so a wrong loss normalisation shows, and it is
the same batch every step, so a model that learns must lower its loss. With num_devices > 1 every
device is a process in a real `torch.distributed` group (gloo on CPU, nccl on CUDA) and the model is
wrapped in DistributedDataParallel; step.py skips the all-reduce on all but the last micro-step.

Checks: no OOM, peak memory within capacity minus headroom, finite loss, loss goes down,
accumulated gradient == gradient of the same examples cut differently (relative error), and the
examples per optimizer step across devices == the effective batch. The gradient noise scale
B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A) comes
from the gradient norms of one micro-batch and of the accumulated batch at the same weights.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from probe.meter import Meter, is_oom, make_meter
from probe.models import LoadedModel, build_model
from probe.plan import Plan
from probe.ranks import RankFailed, RankOutOfMemory, spawn_ranks
from probe.spec import Collation, ProbeSpec, SpecError, format_bytes
from probe.step import (
    MicroBatch, accumulate_gradients, global_target_tokens, make_optimizer, make_scaler, optimizer_step, split,
    synthetic_batch, token_loss_sum,
)

# Learning rates high enough that a few steps visibly lower the loss on a repeated batch.
VERIFY_LR = {"sgd": 1e-2}  # every other optimizer: VERIFY_LR_DEFAULT
VERIFY_LR_DEFAULT = 1e-3
# Relative error allowed between the accumulated and the reference gradient. fp32 must agree to
# rounding; 16-bit matmuls round differently for different batch shapes.
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16-mixed": 2e-2, "fp16-mixed": 2e-2, "bf16": 5e-2}
# Each verify step trains the whole effective batch, and the gradient check adds one more pass over
# it: two steps (the fewest the loss check can compare) keep verification near the probe's own time.
DEFAULT_VERIFY_STEPS = 2


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class RankResult:
    """What one device measured; collective values (losses, peaks, norms) are already global."""

    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_reserved_bytes: list[int] = field(default_factory=list)
    capacity_bytes: int = 0
    grad_rel_error: float | None = None
    noise_g2: list[float] = field(default_factory=list)
    noise_s: list[float] = field(default_factory=list)
    examples_per_step: int = 0
    tokens_per_step: int = 0
    reference_split: list[int] = field(default_factory=list)
    oom: str | None = None


def _chunks(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


def reference_sizes(plan_sizes: list[int], fits_at_once: int) -> list[int]:
    """Another cut of the same examples: whole when it fits, else halves of the plan's micro-batch."""
    total = sum(plan_sizes)
    sizes = _chunks(total, max(1, min(total, fits_at_once)))
    return sizes if sizes != plan_sizes else _chunks(total, max(1, plan_sizes[0] // 2))


def variable_length_batch(vocab_size: int, size: int, seq_len: int, device: torch.device,
                          generator: torch.Generator, collation: Collation = "padded") -> MicroBatch:
    """Sequences from a quarter of seq_len to full length: the padding makes token counts differ."""
    shortest = max(2, seq_len // 4) if seq_len >= 2 else 1
    lengths = torch.randint(shortest, seq_len + 1, (size,), generator=generator).tolist()
    return synthetic_batch(vocab_size, size, seq_len, device, generator, lengths, collation)


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                device: torch.device | None = None) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _squared_norm(params: list[torch.nn.Parameter], scale: float = 1.0) -> float:
    """|grad|² without a parameter-sized temporary (vector_norm reduces in place)."""
    total = sum(float(torch.linalg.vector_norm(p.grad.float())) ** 2 for p in params if p.grad is not None)
    return total / scale**2


def micro_batch_squared_norm(model: LoadedModel, module: torch.nn.Module, mb: MicroBatch, spec: ProbeSpec) -> float:
    """|G_small|²: the gradient of one micro-batch alone, mean over its own target tokens."""
    module.zero_grad(set_to_none=True)
    (token_loss_sum(model, module, mb, spec) / max(mb.target_tokens(), 1)).backward()
    value = _squared_norm(_trainable(module))
    module.zero_grad(set_to_none=True)
    return value


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
    for p in _trainable(module):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if _distributed():
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


def noise_terms(small_sq: float, big_sq: float, small_batch: int, big_batch: int) -> tuple[float, float]:
    """Unbiased |G|² and tr(Σ) estimates from two batch sizes (McCandlish et al. 2018, eq. A.2-A.3)."""
    g2 = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    s = (small_sq - big_sq) / (1 / small_batch - 1 / big_batch)
    return g2, s


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


def run_rank(spec: ProbeSpec, plan: Plan, steps: int, rank: int, world_size: int,
             allowed_factories: Collection[str], fits_at_once: int,
             on_step: Callable[[int], None] | None = None) -> RankResult:
    """The verification on one device; with world_size > 1 the process group is already up."""
    device = f"cuda:{rank}" if spec.device.startswith("cuda") and world_size > 1 else spec.device
    meter = make_meter(device, spec.capacity_bytes)
    with meter.tracking():
        model = build_model(spec, meter.device, allowed_factories, meter.capacity_bytes)
        bare = model.module
        if world_size > 1:
            # DDP's gradient buckets are real memory: build them where the meter counts them
            ids = [meter.device.index] if meter.device.type == "cuda" else None
            model = replace(model, module=DistributedDataParallel(bare, device_ids=ids))
    result = RankResult(capacity_bytes=meter.capacity_bytes)
    sizes = plan.device_micro_batches(rank)
    generator = torch.Generator().manual_seed(spec.seed + 7919 * rank)
    examples = variable_length_batch(model.vocab_size, sum(sizes), spec.seq_len, meter.device, generator,
                                     spec.collation)
    micro_batches = split(examples, sizes)
    result.reference_split = reference_sizes(sizes, fits_at_once)
    result.examples_per_step = int(_all_reduce([float(sum(sizes))], device=meter.device)[0])
    result.tokens_per_step = int(_all_reduce([float(examples.target_tokens())], device=meter.device)[0])
    optimizer = make_optimizer(spec, bare, lr=VERIFY_LR.get(spec.optimizer, VERIFY_LR_DEFAULT))
    scaler = make_scaler(spec, meter.device.type)
    params = _trainable(bare)
    try:
        for step in range(steps):
            if on_step:
                on_step(step + 1)
            with dropout_off(bare) if step == 0 else nullcontext():
                _one_step(spec, plan, model, bare, params, micro_batches, optimizer, scaler, meter, result, step)
    except Exception as exc:  # only OOM is a verdict; anything else is a failure
        if not is_oom(exc):
            raise
        result.oom = str(exc).splitlines()[0][:300]
        if world_size > 1:
            raise RankOutOfMemory(json.dumps(asdict(result))) from None
    return result


def _one_step(spec: ProbeSpec, plan: Plan, model: LoadedModel, bare: torch.nn.Module,
              params: list[torch.nn.Parameter], micro_batches: list[MicroBatch], optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None, meter: Meter, result: RankResult, step: int) -> None:
    """One optimizer step of the plan, plus the untimed, unmetered measurements around it."""
    small_batch, big_batch = micro_batches[0].size, plan.split.effective_batch
    small_sq = micro_batch_squared_norm(model, bare, micro_batches[0], spec)
    reference = None
    if step == 0:
        reference = reference_gradient(model, bare, split(_joined(micro_batches), result.reference_split), spec)
    meter.release()
    meter.start_trial()
    started = time.perf_counter()
    with meter.tracking():
        meter.phase("forward_backward")
        loss = accumulate_gradients(model, micro_batches, spec, scaler)
        meter.synchronize()
    elapsed_s = time.perf_counter() - started
    scale = scaler.get_scale() if scaler else 1.0
    big_sq = _squared_norm(params, scale)
    if reference is not None:
        result.grad_rel_error = relative_error(params, reference, scale)
    started = time.perf_counter()
    with meter.tracking():
        meter.phase("optimizer")
        optimizer_step(optimizer, scaler)
        meter.phase("idle")
        meter.synchronize()
    elapsed_s += time.perf_counter() - started
    reading = meter.reading()
    device = meter.device
    peak = _all_reduce([float(reading.peak_reserved_bytes), elapsed_s], dist.ReduceOp.MAX, device)
    result.peak_reserved_bytes.append(int(peak[0]))
    result.step_s.append(peak[1])
    result.losses.append(float(loss))
    if big_batch > small_batch:
        world = dist.get_world_size() if _distributed() else 1
        g2, s = noise_terms(small_sq, big_sq, small_batch, big_batch)
        g2, s = (v / world for v in _all_reduce([g2, s], device=device))
        result.noise_g2.append(g2)
        result.noise_s.append(s)


def _joined(micro_batches: list[MicroBatch]) -> MicroBatch:
    # one collation for all of them: every micro-batch carries a mask, or none does
    masks = [mb.attention_mask for mb in micro_batches if mb.attention_mask is not None]
    return MicroBatch(torch.cat([mb.input_ids for mb in micro_batches]), torch.cat([mb.labels for mb in micro_batches]),
                      torch.cat(masks) if masks else None)


def _rank_main(rank: int, world_size: int, spec_json: dict[str, Any], plan: Plan, steps: int,
               allowed_factories: list[str], fits_at_once: int, out_dir: str) -> None:
    """One spawned device process, already in the group: verify, write rank 0's result."""
    spec = ProbeSpec.model_validate(spec_json)
    try:
        result = run_rank(spec, plan, steps, rank, world_size, allowed_factories, fits_at_once)
    except RankOutOfMemory as exc:
        Path(out_dir, f"rank{rank}.json").write_text(str(exc))
        raise
    if rank == 0:
        Path(out_dir, "rank0.json").write_text(json.dumps(asdict(result)))


def _run_spawned(spec: ProbeSpec, plan: Plan, steps: int, allowed_factories: Collection[str],
                 fits_at_once: int) -> RankResult:
    world_size = plan.split.num_devices
    if spec.device.startswith("cuda") and torch.cuda.device_count() < world_size:
        raise SpecError(
            f"num_devices {world_size} needs {world_size} GPUs for the verification run; this machine sees "
            f"{torch.cuda.device_count()}: verify with --devices {torch.cuda.device_count()} or on a bigger machine"
        )
    with tempfile.TemporaryDirectory(prefix="fitprobe-verify-") as out_dir:
        try:
            spawn_ranks(_rank_main, world_size, spec.device,
                        (spec.model_dump(mode="json"), plan, steps, sorted(allowed_factories), fits_at_once, out_dir))
        except RankFailed as exc:
            # an OOM on one device stops all of them: that is a verdict, anything else is an error
            oom = sorted(Path(out_dir).glob("rank*.json"))
            if not oom:
                raise RuntimeError(f"verification process failed: {str(exc).strip().splitlines()[-1]}") from exc
            return RankResult(**json.loads(oom[0].read_text()))
        return RankResult(**json.loads(Path(out_dir, "rank0.json").read_text()))


def run_verification(spec: ProbeSpec, plan: Plan, steps: int = DEFAULT_VERIFY_STEPS,
                     allowed_factories: Collection[str] = (), fits_at_once: int | None = None,
                     emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `steps` optimizer steps with the plan and report every check.

    `fits_at_once` is the largest micro-batch known to fit (the probe's max): the reference gradient
    uses one batch of that many examples per device at most. `emit` hears each step as it starts
    (on one device; spawned devices report when they are done).
    """
    if steps < 2:
        raise SpecError(f"verify_steps must be at least 2 (got {steps}): "
                        "the loss check compares the first and last step")
    fits_at_once = fits_at_once or plan.split.micro_batch
    started_s = time.perf_counter()
    if plan.split.num_devices > 1:
        result = _run_spawned(spec, plan, steps, allowed_factories, fits_at_once)
    else:
        def on_step(step: int) -> None:
            if emit:
                emit({"type": "verify_step", "step": step, "steps": steps})

        result = run_rank(spec, plan, steps, 0, 1, allowed_factories, fits_at_once, on_step)
    return {**_report(spec, plan, steps, result), "wall_s": round(time.perf_counter() - started_s, 3)}


def _checks(spec: ProbeSpec, plan: Plan, r: RankResult) -> list[Check]:
    limit_bytes = int(r.capacity_bytes * (1 - spec.headroom))
    peak = max(r.peak_reserved_bytes, default=0)
    tolerance = GRAD_TOLERANCE[spec.precision]
    target = plan.split.target_batch
    checks = [Check("no_oom", r.oom is None,
                    r.oom or f"{len(r.losses)} optimizer steps ran without running out of memory")]
    if r.oom is not None:
        return checks + [Check(name, False, "not run: the step ran out of memory") for name in
                         ("memory_within_headroom", "finite_loss", "loss_decreases", "gradient_equivalence",
                          "examples_per_step")]
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
    return checks


def _noise_scale(r: RankResult, effective_batch: int) -> tuple[float | None, str]:
    if r.oom is not None:
        return None, "not estimated: the run ran out of memory"
    if not r.noise_g2:
        return None, ("not estimated: the effective batch equals the micro-batch, "
                      "so there are no two batch sizes to compare")
    g2, s = statistics.fmean(r.noise_g2), statistics.fmean(r.noise_s)
    if g2 <= 0 or s <= 0:
        return None, (f"not estimated: after {len(r.noise_g2)} steps the estimate of |G|² or of the noise is not "
                      "positive, i.e. noise dominates; run more verify steps")
    value = s / g2
    relation = "below" if value < effective_batch else "above"
    return value, (f"B_simple ≈ {value:.3g} examples, {relation} your effective batch of {effective_batch}. Far above "
                   "B_simple, more examples per step buy little; far below, steps are dominated by noise. This is "
                   f"a noisy estimate from {len(r.noise_g2)} steps at random initialisation on synthetic data: treat "
                   "it as an order of magnitude, not a target")


def _report(spec: ProbeSpec, plan: Plan, steps: int, r: RankResult) -> dict[str, Any]:
    checks = _checks(spec, plan, r)
    noise, note = _noise_scale(r, plan.split.effective_batch)
    steady_s = statistics.median(r.step_s[1:]) if len(r.step_s) > 1 else None
    return {
        "passed": all(c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
        "grad_rel_error": r.grad_rel_error,
        "gradient_noise_scale": noise,
        "gradient_noise_note": note,
        "peak_reserved_bytes": max(r.peak_reserved_bytes, default=None),
        "capacity_bytes": r.capacity_bytes,
        # the first step also creates the optimizer state: the median of the others is the steady step
        "step_s": steady_s,
        "tokens_per_s": r.tokens_per_step / steady_s if steady_s else None,
        "losses": r.losses,
        "steps": steps,
        "micro_batch": plan.split.micro_batch,
        "accumulation_steps": plan.split.accumulation_steps,
        "num_devices": plan.split.num_devices,
        "examples_per_step": r.examples_per_step,
        "reference_split": r.reference_split,
    }


def format_verification(verification: dict[str, Any]) -> str:
    """The verification as a few lines a person reads at a terminal."""
    verdict = "PASSED" if verification["passed"] else "FAILED"
    lines = [f"verification: {verdict} ({verification['steps']} optimizer steps, "
             f"{verification['num_devices']} device(s))"]
    for check in verification["checks"]:
        lines.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    if verification["step_s"]:
        lines.append(f"  step {verification['step_s']:.3f}s, {verification['tokens_per_s']:.0f} tokens/s")
    lines.append(f"  gradient noise scale: {verification['gradient_noise_note']}")
    return "\n".join(lines)
