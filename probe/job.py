"""spec → report: the unit of work an executor runs (CLI in-process, service in a subprocess).

It builds the trial (probe/make_trial.py), searches, asks the estimate beside it (probe/estimate/estimator.py)
and, when nothing fits, what would (probe/needs.py); then plans and verifies.

Every step on the way is announced through `emit(event)` so a caller can stream progress; the
report carries the device, versions, allocator config and capacity behind every number in it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Collection
from datetime import datetime, timezone
from typing import Any

import torch

from fitprobe.probe import optimizers, trainers

from fitprobe.probe.models import quantization
from fitprobe.probe.heap import frozen_heap
from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.data import data_facts, micro_batch_tokens, padded_width_ratio
from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.estimate.estimator import Estimator
from fitprobe.probe import events
from fitprobe.probe.events import Emit, Phase, ignore
from fitprobe.probe.breakdown import CUDA_NOT_BROKEN_DOWN
from fitprobe.probe.meter import Meter
from fitprobe.probe.needs import does_not_fit, headroom_shortfall
from fitprobe.probe.report import DeviceFacts, Report, Search, TrialReport
from fitprobe.probe.search import find_micro_batch
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.report import TrialResult
from fitprobe.probe.versions import distribution_version
from fitprobe.probe.verify.checks import run_verification
from fitprobe.probe.plan import plan_for_probe
from fitprobe.probe.data import plan_facts, read_rows


def versions() -> dict[str, str | None]:
    return {"fitprobe": distribution_version("fitprobe"), "torch": torch.__version__,
            "transformers": distribution_version("transformers"), "peft": distribution_version("peft"),
            "python": platform.python_version()}


def device_facts(meter: Meter) -> DeviceFacts:
    if isinstance(meter, EstimateMeter):
        return DeviceFacts(device=str(meter.device), name=f"estimate ({meter.device.type} fake tensors)",
                           total_bytes=None, capacity_bytes=meter.capacity_bytes, meter=meter.kind,
                           accuracy_note=meter.accuracy_note, kernels=meter.kernel_facts())
    if meter.device.type == "cuda":
        props = torch.cuda.get_device_properties(meter.device)
        name, total = props.name, props.total_memory
    else:
        name, total = f"cpu ({platform.processor() or platform.machine()}, virtual capacity)", None
    return DeviceFacts(device=str(meter.device), name=name, total_bytes=total, capacity_bytes=meter.capacity_bytes,
                       meter=meter.kind, allocator_config=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                       breakdown_note=CUDA_NOT_BROKEN_DOWN if meter.device.type == "cuda" else None)


def _facts(spec: ProbeSpec, meter: Meter, model: dict[str, Any]) -> dict[str, Any]:
    """What every report starts with (report.Facts): the spec and what ran it."""
    return {"spec": spec, "device": device_facts(meter), "model": model,
            "optimizer": optimizers.report_facts(spec), "quantization": quantization.report_facts(spec),
            "trainer": trainers.report_facts(spec), "versions": versions()}


def run_trial(spec: ProbeSpec, micro_batch: int, allowed_factories: Collection[str] = ()) -> TrialReport:
    """One trial at a given micro-batch, as a report."""
    with frozen_heap():
        meter, facts, trial = make_trial(spec, allowed_factories)
        result = trial(micro_batch)  # first: the device facts name the kernels the trial ran
    return TrialReport(**_facts(spec, meter, facts), trial=result)


def run_probe(spec: ProbeSpec, emit: Emit = ignore, allowed_factories: Collection[str] = ()) -> Report:
    """Probe: the largest and the safe micro-batch for the spec, with every trial in the report."""
    with frozen_heap():  # each trial's collections walk only what trials made (probe/heap.py)
        return _probe(spec, emit, allowed_factories)


def _probe(spec: ProbeSpec, emit: Emit, allowed_factories: Collection[str]) -> Report:
    started_s = time.perf_counter()
    emit(events.phase(Phase.BUILDING_MODEL))
    meter, facts, run = make_trial(spec, allowed_factories, emit)
    estimate = None
    if spec.estimate_first and spec.mode == "measure":
        emit(events.phase(Phase.ESTIMATING))
        estimate = Estimator(spec, meter.capacity_bytes, allowed_factories)
    emit(events.phase(Phase.PROBING))

    def trial(micro_batch: int) -> TrialResult:
        emit(events.trial_started(micro_batch))
        result = run(micro_batch)
        emit(events.trial(result.to_dict()))
        return result

    hint = estimate.max_micro_batch(spec) if estimate else None
    search = find_micro_batch(trial, meter.capacity_bytes, spec.headroom, spec.micro_batch_limit, hint)
    trials = search.trials
    if estimate:
        for measured in trials:
            if measured.fits and measured.peak_allocated_bytes:
                measured.estimated_peak_bytes = estimate.peak_bytes(measured.micro_batch)
                measured.estimate_error = round(measured.estimated_peak_bytes / measured.peak_allocated_bytes - 1, 4)
    not_fitting = None
    if search.max_micro_batch == 0:
        emit(events.phase(Phase.SIZING_THE_STEP))
        not_fitting = does_not_fit(spec, meter.capacity_bytes, allowed_factories, emit)
    shortfall = None
    if search.max_micro_batch and not search.safe_micro_batch:
        # the plan runs at micro-batch 1 then (plan.plan_limit): say what it costs, and what would avoid it
        emit(events.phase(Phase.SIZING_THE_STEP))
        peak = min((t for t in trials if t.fits), key=lambda t: t.micro_batch)
        shortfall = headroom_shortfall(spec, peak.micro_batch,
                                       peak.peak_reserved_bytes or peak.peak_allocated_bytes or 0,
                                       meter.capacity_bytes, allowed_factories, emit)
    report = Report(
        **_facts(spec, meter, facts),
        search=Search(
            max_micro_batch=search.max_micro_batch,
            safe_micro_batch=search.safe_micro_batch,
            safe_micro_batch_basis=search.safe_basis,
            limit=search.limit,
            limit_reached=search.limit is not None and search.max_micro_batch >= search.limit,
            predicted_max_micro_batch=search.predicted_max,
            trial_count=len(trials),
            trials=trials,
            estimated_max_micro_batch=hint,
            # packed and flattened batches hold no padding: what a micro-batch holds is a token count
            max_tokens_per_micro_batch=micro_batch_tokens(spec, search.max_micro_batch),
            safe_tokens_per_micro_batch=micro_batch_tokens(spec, search.safe_micro_batch or 0),
            # a shared CPU host times trials too noisily to rank plans by; fake tensors time nothing
            step_times_trusted=meter.kind == "cuda-allocator",
            wall_s=round(time.perf_counter() - started_s, 3),
        ),
        data=data_facts(spec, search.max_micro_batch, search.safe_micro_batch),
        does_not_fit=not_fitting,
        headroom_shortfall=shortfall,
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    emit(events.phase(Phase.PROBED, max_micro_batch=search.max_micro_batch,
                      safe_micro_batch=search.safe_micro_batch))
    if spec.eval:
        from fitprobe.probe.evaluate import search_evaluation

        emit(events.phase(Phase.EVALUATION))
        report.evaluation = search_evaluation(spec, allowed_factories, emit=emit)
    if spec.generate:
        from fitprobe.probe.generate import search_generation

        emit(events.phase(Phase.GENERATION))
        report.generation = search_generation(spec, allowed_factories, emit)
    return report


def run_job(spec: ProbeSpec, emit: Emit = ignore, allowed_factories: Collection[str] = (),
            verify_steps: int = 2, verify: bool = True, search_from: tuple[str, Report] | None = None,
            data_path: str | None = None) -> Report:
    """Probe, then (with an effective batch) plan the split and verify it by training: the service's unit.

    The plan uses the safe micro-batch and the trials' measured step times; the verification's
    reference gradient may use up to the max micro-batch at once, which the probe showed fits.

    `search_from` (the probe's id and its report) makes this a verification-only job: the probe with the
    same fingerprint already searched, so its report stands in for `run_probe` and only the plan for
    this effective batch is trained.

    `data_path` (the command line's `--data`; never a request's) makes the verification train on the
    file's first rows, so the gradient noise scale is measured on the user's tokens.
    """

    if verify and spec.mode == "measure" and spec.effective_rows is not None and spec.collation == "flattened":
        raise SpecError("verification with collation=flattened is not implemented yet: use --no-verify (the probe "
                        "and plan stand), or verify the same plan with collation packed")
    if verify and spec.mode == "measure" and spec.effective_rows is not None and spec.sharding == "fsdp":
        raise SpecError("verification with sharding=fsdp is not implemented yet; use --no-verify, or leave out "
                        "effective_batch (the probe's answer is per device either way)")
    if search_from is None:
        report = run_probe(spec, emit, allowed_factories)
    else:
        probe_id, cached = search_from
        emit(events.phase(Phase.SEARCH_CACHED, probe_id=probe_id))
        report = cached.model_copy(update={"spec": spec, "search_cached_from": probe_id,
                                           "verification_note": None})
    report.plan = report.verification = None
    rows = spec.effective_rows
    if rows is None or report.does_not_fit:
        return report
    emit(events.phase(Phase.PLANNING))
    search = report.search
    plan = plan_for_probe(search, rows, spec.num_devices, spec.micro_steps_per_trial, padded_width_ratio(spec))
    report.plan = plan_facts(plan, spec)
    emit(events.phase(Phase.PLANNED, micro_batch=plan.split.micro_batch,
                      accumulation_steps=plan.split.accumulation_steps))
    if verify and spec.mode == "measure":  # an estimate has no device to train on
        emit(events.phase(Phase.VERIFYING))
        data_rows = read_rows(data_path, plan.split.effective_batch) if data_path else None
        report.verification = run_verification(spec, plan, verify_steps, allowed_factories, search.max_micro_batch,
                                               emit, data_rows)
        emit(events.phase(Phase.VERIFIED, passed=report.verification.passed))
    return report
