"""One trial: does THE training step at micro-batch b fit? Measured, then cleaned up without a trace.

A trial runs at least two optimizer steps (optimizer state only exists after the first) of at least
two micro-steps each (gradients stay resident between them) on worst-case full-length batches.
Unlike Lightning's tuner, the trial owns its optimizer and batches and frees them before returning,
OOM or not, so one trial's leftovers cannot make the next one look bigger.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch

from fitprobe.probe.breakdown import classified
from fitprobe.probe.meter import Meter, is_oom
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.optimizers import import_optimizer, paged_state_bytes
from fitprobe.probe.report import TrialResult
from fitprobe.probe.spec import ProbeSpec, format_bytes
from fitprobe.probe.step import make_optimizer, make_scaler, run_steps, worst_case_batch


class TrialError(RuntimeError):
    """A trial failed for a reason other than memory: shrinking the batch would not help."""


def oom_result(meter: Meter, exc: BaseException, micro_batch: int) -> TrialResult:
    """An OOM as a trial that did not fit, with where it stopped. The traceback's frames hold the step's
    tensors: cleared here, before the cleanup is measured."""
    facts = meter.oom_facts(exc)
    message = str(exc).splitlines()[0][:300]
    traceback.clear_frames(exc.__traceback__)
    return TrialResult(micro_batch, False, error=message, oom_live_bytes=facts.live_bytes,
                       oom_request_bytes=facts.request_bytes)


class TrialRunner:
    """Callable `runner(b) -> TrialResult` over one model that stays built between trials."""

    def __init__(self, spec: ProbeSpec, meter: Meter, model: LoadedModel,
                 watch_optimizer: Callable[[torch.optim.Optimizer], None] = lambda _optimizer: None) -> None:
        self.spec = spec
        self.meter = meter
        self.model = model
        # sees each trial's optimizer before its first step (probe/estimate/extrapolate.py marks its parameters there)
        self.watch_optimizer = watch_optimizer
        self._generator = torch.Generator().manual_seed(spec.seed)
        import_optimizer(spec.optimizer)  # here, not in a trial: an import can keep the frames running it alive

    def __call__(self, micro_batch: int) -> TrialResult:
        self.meter.release()
        try:
            return self._run(micro_batch)
        except Exception as exc:  # an OOM is an answer; anything else is re-raised
            if not is_oom(exc):
                raise TrialError(f"trial at micro-batch {micro_batch} failed: {exc}") from exc
            return oom_result(self.meter, exc, micro_batch)
        finally:
            self.model.module.zero_grad(set_to_none=True)
            self.meter.release()

    def _run(self, micro_batch: int) -> TrialResult:
        spec, meter = self.spec, self.meter
        batches = [
            worst_case_batch(self.model.vocab_size, micro_batch, spec, meter.device, self._generator)
            for _ in range(spec.micro_steps_per_trial)
        ]
        optimizer = make_optimizer(spec, self.model.module)
        self.watch_optimizer(optimizer)
        scaler = make_scaler(spec, meter.device.type)
        meter.start_trial()
        with classified(meter, self.model.module, optimizer, batches):
            step_times_s = run_steps(self.model, optimizer, batches, spec, scaler, meter,
                                     spec.optimizer_steps_per_trial)
        reading = meter.reading()
        # paged optimizer state lives in CUDA unified memory, which the allocator's statistics never see
        unseen_bytes = paged_state_bytes(optimizer)
        if unseen_bytes:
            reading = reading.plus(unseen_bytes, "optimizer_state")
            if reading.peak_allocated_bytes > meter.capacity_bytes:
                return TrialResult(micro_batch, False, error=f"paged optimizer state ({format_bytes(unseen_bytes)}) "
                                   "takes the step past the capacity", oom_live_bytes=reading.peak_allocated_bytes)
        # the first step also creates the optimizer state: time the steady ones
        steady_s = sorted(step_times_s[1:])[len(step_times_s[1:]) // 2]
        return TrialResult(micro_batch, True, reading.peak_allocated_bytes, reading.peak_reserved_bytes,
                           reading.alloc_retries, steady_s if meter.measures_time else None,
                           reading.phase_peak_bytes, reading.breakdown)
