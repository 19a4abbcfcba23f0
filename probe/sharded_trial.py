"""Trials of the sharded (FSDP2) step: measured on N real ranks, or estimated as one rank of N.

Both are callables `trial(b) -> TrialResult` for `find_micro_batch`, and both run THE trial
(`TrialRunner`) on a model from `sharding.build_sharded_model`:

- `MeasuredShardedTrial` spawns `num_devices` processes (gloo on CPU, each with its own CPU meter at the
  spec's capacity; NCCL on cuda:0..N-1) for every trial. A fresh group per trial costs the start-up
  (imports, model build: seconds on CPU) but keeps trials independent: an OOM on one rank kills the
  group, and nothing of one trial survives into the next. The trial's peak is the largest rank's, and it
  fits only if every rank fits.
- `EstimatedShardedTrial` runs rank 0 of a fake process group of `num_devices` under the estimate
  meter, in this process: the per-device peak, for any cluster, without one. It too starts afresh
  every trial (the build is a few seconds for an 8B model; the trial itself takes longer).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.meter import make_meter
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.verify.ranks import RankFailed, RankOutOfMemory, spawn_ranks
from fitprobe.probe.sharding import build_sharded_model, process_group
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.report import TrialResult
from fitprobe.probe.trial import TrialError, TrialRunner


def combine(results: list[TrialResult]) -> TrialResult:
    """One trial's verdict from its ranks: the device with the largest peak is the one that must fit."""
    failed = [r for r in results if not r.fits]
    worst = max(failed or results, key=lambda r: r.peak_allocated_bytes or 0)
    phases: dict[str, int] = {}
    for result in results:
        for phase, n_bytes in result.phase_peak_bytes.items():
            phases[phase] = max(phases.get(phase, 0), n_bytes)
    step_times_s = [r.step_s for r in results if r.step_s is not None]
    return TrialResult(
        micro_batch=worst.micro_batch, fits=not failed,
        peak_allocated_bytes=max((r.peak_allocated_bytes or 0) for r in results),
        peak_reserved_bytes=max((r.peak_reserved_bytes or 0) for r in results),
        alloc_retries=max(r.alloc_retries for r in results),
        step_s=max(step_times_s) if step_times_s and not failed else None,  # the slowest rank sets the pace
        phase_peak_bytes=phases, error=worst.error,
        # the largest rank's peak is the trial's: its breakdown is the trial's
        breakdown=None if failed else max(results, key=lambda r: r.peak_allocated_bytes or 0).breakdown,
    )


def _trial_rank(rank: int, world_size: int, spec_json: dict[str, Any], micro_batch: int,
                allowed_factories: list[str]) -> dict[str, Any]:
    """One spawned rank: build and shard the model under its own meter, run the trial, return the result."""
    spec = ProbeSpec.model_validate(spec_json)
    meter = make_meter(f"cuda:{rank}" if spec.device.startswith("cuda") else "cpu", spec.capacity_bytes)
    model = build_sharded_model(spec, meter, allowed_factories)
    with meter.tracking():
        result = TrialRunner(spec, meter, model)(micro_batch)
    if not result.fits:
        raise RankOutOfMemory(result.to_dict())
    return result.to_dict()


class MeasuredShardedTrial:
    """`trial(b)`: `num_devices` fresh ranks run THE trial on their shards; the largest peak decides."""

    def __init__(self, spec: ProbeSpec, allowed_factories: Collection[str] = ()) -> None:
        if spec.device.startswith("cuda") and torch.cuda.device_count() < spec.num_devices:
            raise SpecError(
                f"measuring sharding=fsdp over {spec.num_devices} devices needs {spec.num_devices} GPUs; this "
                f"machine sees {torch.cuda.device_count()}: use --estimate, or --device cpu"
            )
        self.spec = spec
        self.allowed_factories = sorted(allowed_factories)

    def __call__(self, micro_batch: int) -> TrialResult:
        spec = self.spec
        try:
            # a rank that runs out of memory stops the others: a verdict, from the results written so far
            ranks = spawn_ranks(_trial_rank, spec.num_devices, spec.device,
                                (spec.model_dump(mode="json"), micro_batch, self.allowed_factories))
        except RankFailed as exc:
            last_line = str(exc).strip().splitlines()[-1]
            raise TrialError(f"sharded trial at micro-batch {micro_batch} failed: {last_line}") from exc
        return combine([TrialResult(**result) for result in ranks.results if result is not None])


class EstimatedShardedTrial:
    """`trial(b)`: rank 0 of a fake group of `num_devices`, the FSDP2 step under fake tensors.

    Like the measured ranks, every trial builds its group and model afresh: a trial that ran out of
    memory stopped FSDP midway (parameters gathered, hooks half-run), and the group must not outlive
    the trial (an unsharded step later in this process would take it for data parallelism). The cuts of
    an extrapolated estimate (probe/estimate/extrapolate.py) pass their meter and see each fresh model (to mark
    its layers) and optimizer before the step runs.
    """

    def __init__(self, spec: ProbeSpec, allowed_factories: Collection[str] = (), meter: EstimateMeter | None = None,
                 watch_model: Callable[[LoadedModel], None] = lambda _model: None,
                 watch_optimizer: Callable[[torch.optim.Optimizer], None] = lambda _optimizer: None) -> None:
        self.spec = spec
        self.allowed_factories = allowed_factories
        assert spec.capacity_bytes is not None, "ProbeSpec refuses estimate mode without a capacity"
        self.meter = meter or EstimateMeter(spec.capacity_bytes, gpu=spec.gpu)
        self.watch_model, self.watch_optimizer = watch_model, watch_optimizer

    def __call__(self, micro_batch: int) -> TrialResult:
        with process_group(self.spec.num_devices):
            model = build_sharded_model(self.spec, self.meter, self.allowed_factories)
            self.watch_model(model)
            try:
                with self.meter.tracking():
                    return TrialRunner(self.spec, self.meter, model, self.watch_optimizer)(micro_batch)
            finally:
                del model
                self.meter.release()
