"""THE training step: the probe, the verification run and the benchmarks all call these functions.

One optimizer step = several micro-steps (forward, loss, backward; gradients stay resident between
them) then the optimizer update. The loss of every micro-step is the *sum* of its token losses
divided by the number of target tokens in the whole accumulated batch (across ranks too), so the
accumulated gradient equals the full-batch mean gradient even when sequences differ in length
and the last micro-batch is smaller. "Mean per micro-batch / accumulation_steps" gets that wrong.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fitprobe.probe import optimizers
from fitprobe.probe.meter import Meter
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.spec import Collation, ProbeSpec
from fitprobe.probe.data import longest_rows
from fitprobe.probe import trainers

IGNORE_INDEX = -100
PhaseCallback = Callable[[str], None]


def _no_phase(_: str) -> None:
    return None


@dataclass
class MicroBatch:
    """Token ids with next-token labels; padded positions carry IGNORE_INDEX and mask 0.

    `attention_mask` is None for packed (unpadded) collation: the model then takes the causal
    attention path with no mask at all, as it does for users who pack sequences.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    # targets per row, known when the batch is made: counting them from `labels` would force a
    # device sync every micro-step, and is impossible under fake tensors (estimate mode)
    row_targets: tuple[int, ...] | None = None
    # flattened collation: positions restart at each row concatenated into the one sequence
    position_ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def target_tokens(self) -> int:
        if self.row_targets is not None:
            return sum(self.row_targets)
        return int((self.labels != IGNORE_INDEX).sum())


def synthetic_batch(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | None = None,
    collation: Collation = "padded",
    ids: torch.Tensor | None = None,
) -> MicroBatch:
    """Random tokens (or the given `ids`); full `seq_len` unless `lengths` shortens rows.

    Padded collation pads a short row and masks it out; packed collation has no padding, so a
    shorter "length" only ends the row's targets early (a document boundary) and no mask is made.
    """
    input_ids = ids if ids is not None else torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    attention_mask = torch.ones_like(input_ids)
    row_lengths = list(lengths) if lengths is not None else [seq_len] * batch_size
    # one slice per run of rows of one length, not one per row: under fake tensors each op costs ~0.1 ms, and a
    # worst-case batch of 65,536 rows is one row of width - 1 then one run of full rows (no-ops, skipped)
    start = 0
    for length, run in itertools.groupby(lengths or ()):
        end = start + len(list(run))
        if length < seq_len:
            labels[start:end, max(length - 1, 0):] = IGNORE_INDEX
            attention_mask[start:end, length:] = 0
        start = end
    row_targets = tuple(max(min(length, seq_len) - 1, 0) for length in row_lengths)
    mask = attention_mask.to(device) if collation == "padded" else None
    return MicroBatch(input_ids.to(device), labels.to(device), mask, row_targets)


def flattened_batch(vocab_size: int, sequence_lengths: Sequence[int], device: torch.device | str,
                    generator: torch.Generator | None = None) -> MicroBatch:
    """Rows concatenated into one, as HF's DataCollatorWithFlattening makes them: no padding, no mask,
    position ids restarting at each row, and no target across a row boundary.

    A single row needs no position ids (the model counts from 0 itself), and leaving them out keeps
    the model on its plain causal path, as it would be with the collator's output.
    """
    total = sum(sequence_lengths)
    input_ids = torch.randint(0, vocab_size, (1, total), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    start = 0
    for length in sequence_lengths:
        labels[0, start:start + length - 1] = input_ids[0, start + 1:start + length]
        start += length
    positions = torch.cat([torch.arange(length) for length in sequence_lengths])[None]
    targets = (sum(max(length - 1, 0) for length in sequence_lengths),)
    return MicroBatch(input_ids.to(device), labels.to(device), None, targets,
                      positions.to(device) if len(sequence_lengths) > 1 else None)


def worst_case_batch(vocab_size: int, batch_size: int, spec: ProbeSpec, device: torch.device | str,
                     generator: torch.Generator | None = None) -> MicroBatch:
    """The widest batch of `batch_size` rows the user's collation builds, taking the attention path theirs take.

    Without data every row is seq_len tokens; with the user's row lengths (`spec.data`) a padded or
    flattened batch holds the longest rows of the data, cut at seq_len, since no batch holds longer.
    With padded collation one row ends in a padding token: a mask that is all ones lets
    transformers drop it (causal SDPA, key/value heads not repeated), but a single padding token
    forces the explicit 4-D mask and, under grouped-query attention, key/value heads repeated to
    the query heads. That path costs more, and a padded batch of real data almost always takes it.
    """
    rows = None
    if spec.data is not None and spec.collation != "packed":
        rows = list(longest_rows(spec.data, batch_size, spec.seq_len))
    if spec.collation == "flattened":
        return flattened_batch(vocab_size, rows or [spec.seq_len] * batch_size, device, generator)
    width = rows[0] if rows else spec.seq_len
    lengths = rows
    if spec.collation == "padded" and width >= 2 and (rows is None or min(rows) == width):
        lengths = [width - 1] + [width] * (batch_size - 1)
    return synthetic_batch(vocab_size, batch_size, width, device, generator, lengths, spec.collation)


def split(batch: MicroBatch, sizes: Sequence[int]) -> list[MicroBatch]:
    """Cut one batch into consecutive micro-batches of the given sizes."""
    ids, labels = batch.input_ids.split(list(sizes)), batch.labels.split(list(sizes))
    masks = batch.attention_mask.split(list(sizes)) if batch.attention_mask is not None else [None] * len(sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = batch.row_targets
    return [MicroBatch(i, lab, m, rows[start:start + size] if rows is not None else None)
            for i, lab, m, start, size in zip(ids, labels, masks, starts, sizes, strict=True)]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(spec: ProbeSpec, module: torch.nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer the user will train with; its state is what makes step two bigger than step one."""
    return optimizers.make_optimizer(spec.optimizer, module, lr, optimizers.device_type_of(spec))


def autocast_for(spec: ProbeSpec, device_type: str):
    """Mixed precision keeps fp32 weights and runs matmuls in 16 bits; pure bf16 needs no autocast.

    Under FSDP the shards gather as 16-bit weights (its MixedPrecisionPolicy), so the forward is 16-bit
    already; autocast on top would only upcast the ops on its fp32 list, which FSDP training does not.
    """
    if spec.sharding == "fsdp":
        return nullcontext()
    if spec.precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if spec.precision == "fp16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


def make_scaler(spec: ProbeSpec, device_type: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device_type) if spec.precision == "fp16-mixed" else None


def global_target_tokens(micro_batches: Sequence[MicroBatch]) -> int:
    """Target tokens of the whole optimizer step, summed over data-parallel ranks."""
    count = sum(mb.target_tokens() for mb in micro_batches)
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "fake":
        # estimate mode's group moves nothing (and a fake count cannot be read): ranks run alike
        return count * dist.get_world_size()
    if dist.is_available() and dist.is_initialized():
        # NCCL reduces device tensors only; gloo takes either
        total = torch.tensor([count], dtype=torch.int64, device=micro_batches[0].input_ids.device)
        dist.all_reduce(total)
        count = int(total.item())
    return count


def token_loss_sum(model: LoadedModel, module: torch.nn.Module, mb: MicroBatch, spec: ProbeSpec) -> torch.Tensor:
    """Forward one micro-batch; the sum of its token losses, with the logits already freed.

    Only the loss leaves this function, so the logits die before backward runs, as they do in the
    standard loop (`loss = model(..., labels=...).loss; loss.backward()`, the outputs dropped):
    cross-entropy saved what backward needs (its fp32 log-probabilities), and holding the logits
    as well would overstate the peak by one logits-sized buffer (batch × seq × vocab).
    """
    if spec.trainer == "trl" or spec.liger:  # fused heads: no logits at all (probe/trainers.py)
        with autocast_for(spec, mb.input_ids.device.type):
            return trainers.token_loss_sum(module, spec, mb.input_ids, mb.labels, mb.attention_mask, mb.position_ids)
    with autocast_for(spec, mb.input_ids.device.type):
        logits = model.logits(module, mb.input_ids, mb.attention_mask, mb.position_ids)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), mb.labels.view(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def accumulate_gradients(
    model: LoadedModel,
    micro_batches: Sequence[MicroBatch],
    spec: ProbeSpec,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch; return the step's mean loss per target token.

    The loss stays a device tensor: reading it here would stall the GPU once per micro-step.
    """
    module = model.module
    total_tokens = max(global_target_tokens(micro_batches), 1)
    # DDP averages gradients over ranks; our losses are already global sums over total_tokens
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss_sum = torch.zeros((), dtype=torch.float32, device=micro_batches[0].input_ids.device)
    for index, mb in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # skip the gradient all-reduce on every micro-step but the last: one sync per optimizer step
        sync = nullcontext() if last or not isinstance(module, DistributedDataParallel) else module.no_sync()
        with sync:
            summed = token_loss_sum(model, module, mb, spec)
            loss = summed * (world_size / total_tokens)
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += summed.detach()
        del summed, loss
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum / total_tokens


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(
    model: LoadedModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    spec: ProbeSpec,
    scaler: torch.amp.GradScaler | None = None,
    on_phase: PhaseCallback = _no_phase,
    before_update: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One optimizer step over `micro_batches`; `on_phase` lets a meter attribute peaks to phases.

    `before_update` runs once the gradients are accumulated and before the optimizer consumes them:
    the one moment the step's gradient can be read.
    """
    on_phase("forward_backward")
    loss = accumulate_gradients(model, micro_batches, spec, scaler)
    if before_update is not None:
        before_update()
    on_phase("optimizer")
    optimizer_step(optimizer, scaler)
    on_phase("idle")
    return loss


class StepHooks:
    """What a caller of `run_steps` measures around each step; the trial measures nothing more.

    Each hook runs with the meter paused and the clock stopped, so what it computes (the verification
    runs extra forward and backward passes) counts in neither the step's memory nor its time.
    """

    def scope(self, step: int) -> AbstractContextManager[None]:
        """A context around the whole step, hooks included (the verification turns dropout off in one)."""
        return nullcontext()

    def before_step(self, step: int) -> None:
        """Before the step, at the weights it starts from."""

    def before_update(self, step: int) -> None:
        """With the step's gradients accumulated, before the optimizer consumes them."""

    def after_step(self, step: int, loss: torch.Tensor, elapsed_s: float) -> None:
        """After the step; `loss` is its mean loss per target token, `elapsed_s` its time on the device."""


class _Stopwatch:
    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.elapsed_s = 0.0
        self._started = time.perf_counter()

    def pause(self) -> None:
        self.elapsed_s += time.perf_counter() - self._started

    def resume(self) -> None:
        self._started = time.perf_counter()


def run_steps(
    model: LoadedModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    spec: ProbeSpec,
    scaler: torch.amp.GradScaler | None,
    meter: Meter,
    steps: int,
    hooks: StepHooks | None = None,
) -> list[float]:
    """`steps` optimizer steps of `train_step` with the meter told each phase: each step's seconds.

    A step's time runs until the device has finished it (the meter synchronizes); the caller holds
    the meter's tracking and reads its peaks. The trial and the verification both train through here.
    """
    measure = hooks or StepHooks()
    watch = _Stopwatch()

    def before_update(step: int) -> None:
        # the device must finish the backward before the clock stops, as at the end of the step
        meter.synchronize()
        watch.pause()
        with meter.paused():
            measure.before_update(step)
        watch.resume()

    step_times_s = []
    for step in range(steps):
        with measure.scope(step):
            with meter.paused():
                measure.before_step(step)
            watch.restart()
            # without hooks, nothing waits for the device mid-step (a sync would cost the trial time)
            loss = train_step(model, optimizer, micro_batches, spec, scaler, meter.phase,
                              partial(before_update, step) if hooks else None)
            meter.synchronize()
            watch.pause()
            with meter.paused():
                measure.after_step(step, loss, watch.elapsed_s)
            # a device tensor: held into the next step, it would count in that step's peak
            del loss
        step_times_s.append(watch.elapsed_s)
    return step_times_s
