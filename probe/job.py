"""spec → report: the unit of work an executor runs (CLI in-process, service in a subprocess).

Every step on the way is announced through `emit(event)` so a caller can stream progress; the
report carries the device, versions, allocator config and capacity behind every number in it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import torch

from probe import optimizers, quantization
from probe.estimate import EstimateMeter
from probe.meter import Meter, make_meter
from probe.models import LoadedModel, build_model, parameter_bytes
from probe.search import find_micro_batch
from probe.devices import cpu_capacity_limit_bytes
from probe.spec import ProbeSpec, SpecError, format_bytes
from probe.trial import TrialResult, TrialRunner

Event = dict[str, Any]
Emit = Callable[[Event], None]
Trial = Callable[[int], TrialResult]


def _ignore(_: Event) -> None:
    return None


def versions() -> dict[str, str | None]:
    def version_of(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"fitprobe": version_of("fitprobe"), "torch": torch.__version__,
            "transformers": version_of("transformers"), "peft": version_of("peft"),
            "python": platform.python_version()}


def device_facts(meter: Meter) -> dict[str, Any]:
    if isinstance(meter, EstimateMeter):
        return {"device": str(meter.device), "name": f"estimate ({meter.device.type} fake tensors)",
                "total_bytes": None, "capacity_bytes": meter.capacity_bytes, "meter": meter.kind,
                "accuracy_note": meter.accuracy_note, "allocator_config": None, "kernels": meter.kernel_facts()}
    if meter.device.type == "cuda":
        props = torch.cuda.get_device_properties(meter.device)
        name, total = props.name, props.total_memory
    else:
        name, total = f"cpu ({platform.processor() or platform.machine()}, virtual capacity)", None
    return {"device": str(meter.device), "name": name, "total_bytes": total,
            "capacity_bytes": meter.capacity_bytes, "meter": meter.kind,
            "allocator_config": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def model_facts(model: LoadedModel) -> dict[str, Any]:
    params = list(model.module.parameters())
    facts = {"parameters": sum(p.numel() for p in {id(p): p for p in params}.values()),
             "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
             "weight_bytes": parameter_bytes(model.module), "vocab_size": model.vocab_size}
    peft_config = getattr(model.module, "peft_config", None)
    if peft_config:  # the modules LoRA adapted, the model's defaults resolved: exports name them
        facts["lora_targets"] = sorted(next(iter(peft_config.values())).target_modules)
    return facts


def attention_facts(model: LoadedModel, spec: ProbeSpec) -> dict[str, Any]:
    """Which attention path the trials took: the kernel family and whether a mask was passed.

    With padded collation transformers builds an explicit mask (and repeats key/value heads under
    grouped-query attention); on a GPU that also rules out SDPA's flash kernel. The kernel SDPA
    then picks on CUDA is not recorded here: it needs a profiler run on the device.
    """
    config = getattr(model.module, "config", None)
    return {"implementation": getattr(config, "_attn_implementation", None) or "model's own",
            "mask": "explicit (padded batches)" if spec.collation == "padded" else "none (packed, causal)"}


def prepare(spec: ProbeSpec, allowed_factories: Collection[str] = (), meter: Meter | None = None
            ) -> tuple[Meter, LoadedModel]:
    """The meter for the spec's device and the model built under it (so its weights are counted)."""
    if spec.mode == "estimate":
        meter = meter or EstimateMeter(spec.capacity_bytes, gpu=spec.gpu)
    elif spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device {spec.device} requested but this torch build sees no GPU; use --device cpu "
                        "or --estimate")
    if meter is None and spec.device == "cpu" and spec.capacity_bytes:
        limit = cpu_capacity_limit_bytes()
        if spec.capacity_bytes > limit:
            raise SpecError(
                f"capacity {format_bytes(spec.capacity_bytes)} is more than this host can give a CPU probe "
                f"({format_bytes(limit)} available): the CPU device's capacity is real memory. Lower --capacity, "
                "or add --estimate to plan for a larger device without using its memory"
            )
    meter = meter or make_meter(spec.device, spec.capacity_bytes)
    if isinstance(meter, EstimateMeter):
        model = build_model(spec, "meta", allowed_factories, meter.capacity_bytes)
        with meter.tracking():
            meter.materialize(model.module)
        return meter, model
    with meter.tracking():
        model = build_model(spec, meter.device, allowed_factories, meter.capacity_bytes)
    return meter, model


def make_trial(spec: ProbeSpec, allowed_factories: Collection[str] = (), emit: Emit = _ignore
               ) -> tuple[Meter, dict[str, Any], Trial]:
    """The meter whose device and capacity the report names, the model's facts, and `trial(b)`.

    Unsharded, one model is built here and every trial runs on it. With sharding=fsdp a trial is
    N spawned ranks (measure) or rank 0 of a fake group of N (estimate): see probe/sharded_trial.py.
    An estimate of a decoder runs on two shallow cuts of it and extrapolates each moment of the step
    to its depth (probe/extrapolate.py); the facts say from which depths, or why the full depth ran.
    """
    not_extrapolated: dict[str, Any] = {}
    if spec.mode == "estimate":
        from probe.extrapolate import extrapolated_trial

        made = extrapolated_trial(spec, allowed_factories, emit)
        if not isinstance(made, str):
            return made
        not_extrapolated = {"extrapolated_from_layers": None, "not_extrapolated_because": made}
    if spec.sharding == "fsdp":
        meter, facts, trial = _sharded_trial(spec, allowed_factories)
        return meter, {**facts, **not_extrapolated}, trial
    meter, model = prepare(spec, allowed_factories)
    runner = TrialRunner(spec, meter, model)

    def trial(micro_batch: int) -> TrialResult:
        with meter.tracking():
            return runner(micro_batch)

    return meter, {**model_facts(model), "attention": attention_facts(model, spec), **not_extrapolated}, trial


def _sharded_trial(spec: ProbeSpec, allowed_factories: Collection[str]) -> tuple[Meter, dict[str, Any], Trial]:
    from probe.sharded_trial import EstimatedShardedTrial, MeasuredShardedTrial

    meter: Meter
    trial: Trial
    if spec.mode == "estimate":
        estimated = EstimatedShardedTrial(spec, allowed_factories)
        meter, trial = estimated.meter, estimated
    else:
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(f"device {spec.device} requested but this torch build sees no GPU; use --device cpu "
                            "or --estimate")
        meter, trial = make_meter(spec.device, spec.capacity_bytes), MeasuredShardedTrial(spec, allowed_factories)
    # every trial builds its own model; this one is on meta, for the full model's sizes
    sized = build_model(spec, "meta", allowed_factories)
    facts = {**model_facts(sized), "attention": attention_facts(sized, spec), "sharded_over_devices": spec.num_devices}
    return meter, facts, trial


def run_trial(spec: ProbeSpec, micro_batch: int, allowed_factories: Collection[str] = ()) -> dict[str, Any]:
    """One trial at a given micro-batch, as a report."""
    meter, facts, trial = make_trial(spec, allowed_factories)
    result = trial(micro_batch)
    return {"spec": spec.model_dump(mode="json"), "device": device_facts(meter), "model": facts,
            "optimizer": optimizers.report_facts(spec), "quantization": quantization.report_facts(spec),
            "versions": versions(), "trial": result.to_dict()}


class _Estimator:
    """The same step under fake tensors, asked before the real probe (its hint) and after (its error)."""

    def __init__(self, spec: ProbeSpec, capacity_bytes: int, allowed_factories: Collection[str]) -> None:
        estimate_spec = spec.model_copy(update={"mode": "estimate", "capacity_bytes": capacity_bytes})
        self.meter, _, self.trial = make_trial(estimate_spec, allowed_factories)

    def max_micro_batch(self, spec: ProbeSpec) -> int | None:
        found = find_micro_batch(self.trial, self.meter.capacity_bytes, spec.headroom, spec.micro_batch_limit)
        return found.max_micro_batch or None

    def peak_bytes(self, micro_batch: int) -> int | None:
        return self.trial(micro_batch).peak_allocated_bytes


def run_probe(spec: ProbeSpec, emit: Emit = _ignore, allowed_factories: Collection[str] = ()) -> dict[str, Any]:
    """Probe: the largest and the safe micro-batch for the spec, with every trial in the report."""
    started_s = time.perf_counter()
    emit({"type": "phase", "phase": "building_model"})
    meter, facts, run = make_trial(spec, allowed_factories, emit)
    estimate = None
    if spec.estimate_first and spec.mode == "measure":
        emit({"type": "phase", "phase": "estimating"})
        estimate = _Estimator(spec, meter.capacity_bytes, allowed_factories)
    emit({"type": "phase", "phase": "probing"})

    def trial(micro_batch: int) -> TrialResult:
        emit({"type": "trial_started", "micro_batch": micro_batch})
        result = run(micro_batch)
        emit({"type": "trial", **result.to_dict()})
        return result

    hint = estimate.max_micro_batch(spec) if estimate else None
    search = find_micro_batch(trial, meter.capacity_bytes, spec.headroom, spec.micro_batch_limit, hint)
    trials = [t.to_dict() for t in search.trials]
    if estimate:
        for measured in trials:
            if measured["fits"]:
                estimated = estimate.peak_bytes(measured["micro_batch"])
                measured["estimated_peak_bytes"] = estimated
                measured["estimate_error"] = round(estimated / measured["peak_allocated_bytes"] - 1, 4)
    not_fitting = None
    if search.max_micro_batch == 0:
        from probe.needs import does_not_fit

        emit({"type": "phase", "phase": "sizing_the_step"})
        not_fitting = does_not_fit(spec, meter.capacity_bytes, allowed_factories, emit)
    shortfall = None
    if search.max_micro_batch and not search.safe_micro_batch:
        from probe.needs import headroom_shortfall

        # the plan runs at the max micro-batch then: say what it costs, and what would avoid it
        emit({"type": "phase", "phase": "sizing_the_step"})
        peak = next(t for t in trials if t["micro_batch"] == search.max_micro_batch)
        shortfall = headroom_shortfall(spec, search.max_micro_batch,
                                       peak["peak_reserved_bytes"] or peak["peak_allocated_bytes"],
                                       meter.capacity_bytes, allowed_factories, emit)
    report = {
        "spec": spec.model_dump(mode="json"),
        "device": device_facts(meter),
        "model": facts,
        "optimizer": optimizers.report_facts(spec),
        "quantization": quantization.report_facts(spec),
        "versions": versions(),
        "search": {
            "max_micro_batch": search.max_micro_batch,
            "safe_micro_batch": search.safe_micro_batch,
            "safe_micro_batch_basis": search.safe_basis,
            "limit": search.limit,
            "limit_reached": search.limit is not None and search.max_micro_batch >= search.limit,
            "predicted_max_micro_batch": search.predicted_max,
            "trial_count": len(search.trials),
            "trials": trials,
            "estimated_max_micro_batch": hint,
            # a shared CPU host times trials too noisily to rank plans by; fake tensors time nothing
            "step_times_trusted": meter.kind == "cuda-allocator",
            "wall_s": round(time.perf_counter() - started_s, 3),
        },
        "does_not_fit": not_fitting,
        "headroom_shortfall": shortfall,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    emit({"type": "phase", "phase": "probed", "max_micro_batch": search.max_micro_batch,
          "safe_micro_batch": search.safe_micro_batch})
    return report


def run_job(spec: ProbeSpec, emit: Emit = _ignore, allowed_factories: Collection[str] = (),
            verify_steps: int = 2, verify: bool = True, search_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """Probe, then (with an effective batch) plan the split and verify it by training: the service's unit.

    The plan uses the safe micro-batch and the trials' measured step times; the verification's
    reference gradient may use up to the max micro-batch at once, which the probe showed fits.

    `search_from` (`{"probe_id", "report"}`) makes this a verification-only job: the probe with the
    same fingerprint already searched, so its report stands in for `run_probe` and only the plan for
    this effective batch is trained.
    """
    from probe.plan import plan_for_probe
    from probe.verify import run_verification

    if verify and spec.mode == "measure" and spec.effective_batch is not None and spec.sharding == "fsdp":
        raise SpecError("verification with sharding=fsdp is not implemented yet; use --no-verify, or leave out "
                        "effective_batch (the probe's answer is per device either way)")
    if search_from is None:
        report = run_probe(spec, emit, allowed_factories)
    else:
        emit({"type": "phase", "phase": "search_cached", "probe_id": search_from["probe_id"]})
        report = {**search_from["report"], "spec": spec.model_dump(mode="json"),
                  "search_cached_from": search_from["probe_id"]}
    report["plan"] = report["verification"] = None
    if spec.effective_batch is None or report["does_not_fit"]:
        return report
    emit({"type": "phase", "phase": "planning"})
    search = report["search"]
    plan = plan_for_probe(search, spec.effective_batch, spec.num_devices, spec.micro_steps_per_trial)
    report["plan"] = plan.to_dict()
    emit({"type": "phase", "phase": "planned", "micro_batch": plan.split.micro_batch,
          "accumulation_steps": plan.split.accumulation_steps})
    if verify and spec.mode == "measure":  # an estimate has no device to train on
        emit({"type": "phase", "phase": "verifying"})
        report["verification"] = run_verification(spec, plan, verify_steps, allowed_factories,
                                                   search["max_micro_batch"], emit)
        emit({"type": "phase", "phase": "verified", "passed": report["verification"]["passed"]})
    return report
