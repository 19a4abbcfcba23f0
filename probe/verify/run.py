"""The verification's training run: a few optimizer steps of the plan on every device, measured.

The steps are THE training loop of probe/step.py (`run_steps`); a `StepHooks` recorder reads what
the checks need around each one, off the clock and off the meter: a micro-batch's gradient before
the step and the accumulated gradient before the update (the noise scale's two norms), the reference
gradient on the first step, and each step's peak, time and loss. Data is synthetic with
variable-length (padded) sequences, so a wrong loss normalisation shows, and it is the same batch
every step, so a model that learns must lower its loss. With num_devices > 1 every device is a
process in a real `torch.distributed` group (gloo on CPU, nccl on CUDA, started by probe/verify/ranks.py)
and the model is wrapped in DistributedDataParallel; each rank returns its `RankResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fitprobe.probe.verify.gradient_check import dropout_off, joined, reference_gradient, reference_sizes, relative_error
from fitprobe.probe.meter import Meter, is_oom, make_meter
from fitprobe.probe.models.load import LoadedModel, build_model
from fitprobe.probe.verify.noise import micro_batch_squared_norm, noise_terms, squared_norm
from fitprobe.probe.plan import Plan
from fitprobe.probe.verify.ranks import RankFailed, RankOutOfMemory, spawn_ranks
from fitprobe.probe.spec import Collation, ProbeSpec, SpecError
from fitprobe.probe.step import (
    MicroBatch, StepHooks, make_optimizer, make_scaler, run_steps, split, synthetic_batch, trainable_parameters,
)

# Learning rates high enough that a few steps visibly lower the loss on a repeated batch.
VERIFY_LR = {"sgd": 1e-2}  # every other optimizer: VERIFY_LR_DEFAULT
VERIFY_LR_DEFAULT = 1e-3


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
    tokens_per_step: int = 0  # target tokens (labels not ignored)
    input_tokens_per_step: int = 0  # every token fed, padding included: what a token budget counts
    reference_split: list[int] = field(default_factory=list)
    oom: str | None = None


def variable_length_batch(vocab_size: int, size: int, seq_len: int, device: torch.device,
                          generator: torch.Generator, collation: Collation = "padded") -> MicroBatch:
    """Sequences from a quarter of seq_len to full length: the padding makes token counts differ."""
    shortest = max(2, seq_len // 4) if seq_len >= 2 else 1
    lengths = torch.randint(shortest, seq_len + 1, (size,), generator=generator).tolist()
    return synthetic_batch(vocab_size, size, seq_len, device, generator, lengths, collation)


def data_batch(rows: list[list[int]], vocab_size: int, seq_len: int, device: torch.device,
               collation: Collation = "padded") -> MicroBatch:
    """The user's own rows, as their collation batches them: padded to the longest (cut at seq_len), or their
    tokens packed end to end into rows of seq_len. An id outside the model's vocabulary is refused by row."""
    for number, row in enumerate(rows, start=1):
        bad = next((token for token in row if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise SpecError(f"data row {number} holds token id {bad}, outside the model's vocabulary (0..{vocab_size - 1}): "
                            "was the data tokenized for this model?")
    if collation == "packed":
        stream = [token for row in rows for token in row]
        needed = len(rows) * seq_len
        stream = (stream * (needed // max(len(stream), 1) + 1))[:needed]  # short data repeats, as epochs do
        ids = torch.tensor(stream, dtype=torch.long).view(len(rows), seq_len)
        return synthetic_batch(vocab_size, len(rows), seq_len, device, lengths=None, collation="packed", ids=ids)
    cut = [row[:seq_len] for row in rows]
    width = max(max(len(row) for row in cut), 1)
    ids = torch.zeros(len(cut), width, dtype=torch.long)
    for i, row in enumerate(cut):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return synthetic_batch(vocab_size, len(cut), width, device, lengths=[len(row) for row in cut],
                           collation=collation, ids=ids)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, device: torch.device | None = None
                ) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


class _Recorder(StepHooks):
    """The verification's measurements around each step of `run_steps`, written into a `RankResult`."""

    def __init__(self, spec: ProbeSpec, model: LoadedModel, bare: torch.nn.Module, micro_batches: list[MicroBatch],
                 effective_batch: int, scaler: torch.amp.GradScaler | None, meter: Meter, result: RankResult,
                 on_step: Callable[[int], None] | None) -> None:
        self.spec, self.model, self.bare, self.micro_batches = spec, model, bare, micro_batches
        self.effective_batch, self.scaler, self.meter, self.result = effective_batch, scaler, meter, result
        self.on_step = on_step
        self.params = trainable_parameters(bare)
        self.small_sq = self.big_sq = 0.0
        self.reference: list[torch.Tensor] | None = None

    def scope(self, step: int) -> AbstractContextManager[None]:
        return dropout_off(self.bare) if step == 0 else nullcontext()

    def before_step(self, step: int) -> None:
        if self.on_step:
            self.on_step(step + 1)
        self.small_sq = micro_batch_squared_norm(self.model, self.bare, self.micro_batches[0], self.spec)
        if step == 0:
            cut = split(joined(self.micro_batches), self.result.reference_split)
            self.reference = reference_gradient(self.model, self.bare, cut, self.spec)
        # the step's peak starts here: what the measurements above left cached is not the step's
        self.meter.release()
        self.meter.start_trial()

    def before_update(self, step: int) -> None:
        scale = self.scaler.get_scale() if self.scaler else 1.0
        self.big_sq = squared_norm(self.params, scale)
        if self.reference is not None:
            self.result.grad_rel_error = relative_error(self.params, self.reference, scale)

    def after_step(self, step: int, loss: torch.Tensor, elapsed_s: float) -> None:
        self.reference = None
        result, device = self.result, self.meter.device
        reading = self.meter.reading()
        peak = _all_reduce([float(reading.peak_reserved_bytes), elapsed_s], dist.ReduceOp.MAX, device)
        result.peak_reserved_bytes.append(int(peak[0]))
        result.step_s.append(peak[1])
        result.losses.append(float(loss))
        small_batch = self.micro_batches[0].size
        if self.effective_batch > small_batch:
            world = dist.get_world_size() if _distributed() else 1
            g2, s = noise_terms(self.small_sq, self.big_sq, small_batch, self.effective_batch)
            g2, s = (v / world for v in _all_reduce([g2, s], device=device))
            result.noise_g2.append(g2)
            result.noise_s.append(s)


def run_rank(spec: ProbeSpec, plan: Plan, steps: int, rank: int, world_size: int,
             allowed_factories: Collection[str], fits_at_once: int,
             on_step: Callable[[int], None] | None = None, rows: list[list[int]] | None = None) -> RankResult:
    """The verification on one device; with world_size > 1 the process group is already up.

    Running out of memory is a verdict, in `RankResult.oom`; any other error is raised.
    """
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
    if rows:  # the user's rows: this device's share of the step, in order
        start = sum(sum(plan.device_micro_batches(r)) for r in range(rank))
        mine = [rows[(start + i) % len(rows)] for i in range(sum(sizes))]
        examples = data_batch(mine, model.vocab_size, spec.seq_len, meter.device, spec.collation)
    else:
        examples = variable_length_batch(model.vocab_size, sum(sizes), spec.seq_len, meter.device, generator,
                                         spec.collation)
    micro_batches = split(examples, sizes)
    result.reference_split = reference_sizes(sizes, fits_at_once)
    result.examples_per_step = int(_all_reduce([float(sum(sizes))], device=meter.device)[0])
    result.tokens_per_step = int(_all_reduce([float(examples.target_tokens())], device=meter.device)[0])
    fed = sum(mb.input_ids.numel() for mb in micro_batches)  # counted from the tensors the steps train on
    result.input_tokens_per_step = int(_all_reduce([float(fed)], device=meter.device)[0])
    optimizer = make_optimizer(spec, bare, lr=VERIFY_LR.get(spec.optimizer, VERIFY_LR_DEFAULT))
    scaler = make_scaler(spec, meter.device.type)
    recorder = _Recorder(spec, model, bare, micro_batches, plan.split.effective_batch, scaler, meter, result, on_step)
    try:
        with meter.tracking():
            run_steps(model, optimizer, micro_batches, spec, scaler, meter, steps, recorder)
    except Exception as exc:
        if not is_oom(exc):
            raise
        result.oom = str(exc).splitlines()[0][:300]
    return result


def _rank_main(rank: int, world_size: int, spec_json: dict[str, Any], plan: Plan, steps: int,
               allowed_factories: list[str], fits_at_once: int, rows: list[list[int]] | None = None) -> dict[str, Any]:
    """One spawned device process, already in the group: its `RankResult`, as the rank protocol returns it."""
    spec = ProbeSpec.model_validate(spec_json)
    result = run_rank(spec, plan, steps, rank, world_size, allowed_factories, fits_at_once, rows=rows)
    if result.oom is not None:
        # its peers may be blocked in a collective waiting for this rank: stop them all
        raise RankOutOfMemory(asdict(result))
    return asdict(result)


def run_spawned(spec: ProbeSpec, plan: Plan, steps: int, allowed_factories: Collection[str],
                fits_at_once: int, rows: list[list[int]] | None = None) -> RankResult:
    """The verification on `num_devices` spawned ranks: device 0's result, or the one that ran out of memory."""
    world_size = plan.split.num_devices
    if spec.device.startswith("cuda") and torch.cuda.device_count() < world_size:
        raise SpecError(
            f"num_devices {world_size} needs {world_size} GPUs for the verification run; this machine sees "
            f"{torch.cuda.device_count()}: verify with --devices {torch.cuda.device_count()} or on a bigger machine"
        )
    try:
        ranks = spawn_ranks(_rank_main, world_size, spec.device,
                            (spec.model_dump(mode="json"), plan, steps, sorted(allowed_factories), fits_at_once, rows))
    except RankFailed as exc:
        # an OOM on one device stops all of them (a verdict, returned above); anything else is an error
        raise RuntimeError(f"verification process failed: {str(exc).strip().splitlines()[-1]}") from exc
    return RankResult(**ranks.results[ranks.stopped_by if ranks.stopped_by is not None else 0])
