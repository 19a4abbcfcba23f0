"""What training keeps on the device between steps, and the no-grad trials that run beside it.

Evaluation (`Trainer.evaluate()`) and generation (evaluation with `predict_with_generate`, an RL rollout)
run between training steps on the same device, while the training state stays: the weights, the optimizer
state (the trainer keeps its optimizer for the next step) and no gradients (the step ended in
`zero_grad(set_to_none=True)`). An evaluation-only or inference-only job keeps the weights alone. A
`ResidentRunner` builds that state once, records its bytes (what the answer says is left of the capacity),
and runs one no-grad trial per call with the OOM path every search relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fitprobe.probe.events import BatchSearch, Emit, batch_trial
from fitprobe.probe.meter import Meter, is_oom
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.report import Resident, TrialResult
from fitprobe.probe.spec import ProbeSpec, format_bytes
from fitprobe.probe.step import make_optimizer
from fitprobe.probe.trial import TrialError, oom_result

WEIGHTS_ONLY = "weights only"
TRAINING_STATE = "weights and optimizer state, no gradients (as the trainer leaves them between steps)"


def make_resident_training_state(model: LoadedModel, spec: ProbeSpec) -> torch.optim.Optimizer:
    """The optimizer with its state, as training leaves it between steps: one update, then no gradients.

    Zero gradients make the same state tensors a real backward would (their sizes depend on the
    parameters only), without a forward: the state is what stays, not how it was made.
    """
    optimizer = make_optimizer(spec, model.module)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


class ResidentRunner:
    """`runner(b, n) -> TrialResult`: one no-grad trial at batch b beside the resident state (subclasses: `_run`).

    `alone` keeps the weights only; otherwise the optimizer state is built first, under the meter, so every
    trial's peak counts it.
    """

    what = "no-grad"  # the trial's name in errors

    def __init__(self, spec: ProbeSpec, meter: Meter, model: LoadedModel, alone: bool) -> None:
        self.spec, self.meter, self.model = spec, meter, model
        self._generator = torch.Generator().manual_seed(spec.seed)
        self.resident = WEIGHTS_ONLY if alone else TRAINING_STATE
        self.resident_oom: BaseException | None = None  # the state alone passed the capacity: nothing fits
        try:
            with meter.tracking():
                self.optimizer = None if alone else make_resident_training_state(model, spec)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self.resident_oom, self.optimizer = exc, None
            self.resident += ", which alone passes the capacity (training does not fit either)"
        self.resident_bytes = meter.allocated_bytes()

    def __call__(self, batch: int, n: Any = None) -> TrialResult:
        if self.resident_oom is not None:
            return oom_result(self.meter, self.resident_oom, batch)
        self.meter.release()
        try:
            with self.meter.tracking():
                self.model.module.eval()
                return self._run(batch, n)
        except Exception as exc:  # an OOM is an answer; anything else is re-raised
            if not is_oom(exc):
                raise TrialError(f"{self.what} trial at batch {batch} failed: {exc}") from exc
            return oom_result(self.meter, exc, batch)
        finally:
            self.model.module.train()
            self.meter.release()

    def _run(self, batch: int, n: Any) -> TrialResult:
        raise NotImplementedError

    def _result(self, batch: int) -> TrialResult:
        """The trial's record from the meter's reading (call before the trial's tensors are freed)."""
        reading = self.meter.reading()
        return TrialResult(batch, True, reading.peak_allocated_bytes, reading.peak_reserved_bytes,
                           reading.alloc_retries, None, reading.phase_peak_bytes, reading.breakdown)


def announced(trial: Callable[[int], TrialResult], search: BatchSearch, emit: Emit) -> Callable[[int], TrialResult]:
    """`trial` that emits a `batch_trial` event as each trial ends: the search's progress on the wire."""

    def run(size: int) -> TrialResult:
        result = trial(size)
        emit(batch_trial(search, size, result.fits, result.peak_allocated_bytes, result.error))
        return result

    return run


def resident_facts(runner: ResidentRunner, job: str | None = None) -> dict[str, Any]:
    """The report's account of what the trials ran beside: the state, its bytes, and the capacity they left."""
    capacity = runner.meter.capacity_bytes
    return {"resident": f"{runner.resident} ({job})" if job else runner.resident,
            "resident_bytes": runner.resident_bytes, "capacity_bytes": capacity,
            "capacity_left_bytes": None if capacity is None else capacity - runner.resident_bytes}


def resident_words(section: Resident) -> str:
    """`<state> (<bytes> resident, <bytes> of <capacity> left)`: why the batch is what it is."""
    if section.capacity_left_bytes is None:
        return f"{section.resident} ({format_bytes(section.resident_bytes)} resident)"
    return (f"{section.resident} ({format_bytes(section.resident_bytes)} resident, "
            f"{format_bytes(section.capacity_left_bytes)} of {format_bytes(section.capacity_bytes)} left)")
