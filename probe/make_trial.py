"""spec → (meter, model facts, `trial(b)`): what every search, estimate and report runs on.

The meter is the spec's device (or fake tensors, estimating) with its capacity; the model is built
under it (probe/build.py), so its weights are counted like any other tensor; `trial(b)` runs THE
training step at micro-batch b and says whether it fit and at what peak. An estimate of a decoder runs
on two cuts of it (probe/estimate/extrapolate.py) and falls back to the full depth built here; a sharded spec
runs ranks (probe/sharded_trial.py). The probe (probe/job.py), the estimate beside it
(probe/estimate/estimator.py) and the what-if table (probe/whatif.py) all start here.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from typing import Any

import torch

from fitprobe.probe.build import Trial, attention_facts, model_facts, prepare
from fitprobe.probe.heap import settle
from fitprobe.probe.events import Emit, ignore
from fitprobe.probe.meter import Meter, make_meter
from fitprobe.probe.models.load import build_model
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.report import TrialResult
from fitprobe.probe.trial import TrialRunner
from fitprobe.probe.sharded_trial import EstimatedShardedTrial, MeasuredShardedTrial
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.estimate.extrapolate import extrapolated_trial


def full_depth_trial(spec: ProbeSpec, _because: str, allowed_factories: Collection[str]) -> Trial:
    """The full depth's trial, freshly built: where the cuts of an estimate did not pair up."""
    return make_trial(spec.model_copy(update={"extrapolate": False}), allowed_factories)[2]


def make_trial(spec: ProbeSpec, allowed_factories: Collection[str] = (), emit: Emit = ignore
               ) -> tuple[Meter, dict[str, Any], Trial]:
    """The meter whose device and capacity the report names, the model's facts, and `trial(b)`.

    The model built, what is alive settles (probe/heap.py): the trials' collections walk only what they make.
    """
    made = _make_trial(spec, allowed_factories, emit)
    settle()
    return made


def _make_trial(spec: ProbeSpec, allowed_factories: Collection[str], emit: Emit) -> tuple[Meter, dict[str, Any], Trial]:
    """make_trial's build.

    Unsharded, one model is built here and every trial runs on it. With sharding=fsdp a trial is
    N spawned ranks (measure) or rank 0 of a fake group of N (estimate): see probe/sharded_trial.py.
    An estimate of a decoder runs on two shallow cuts of it and extrapolates each moment of the step
    to its depth (probe/estimate/extrapolate.py); the facts say from which depths, or why the full depth ran.
    """
    not_extrapolated: dict[str, Any] = {}
    if spec.mode == "estimate":
        try:
            return extrapolated_trial(spec, allowed_factories, emit,
                                      partial(full_depth_trial, allowed_factories=allowed_factories))
        except Fallback as refused:  # the plain path below: the full depth, with the reason in the facts
            not_extrapolated = {"extrapolated_from_layers": None, "not_extrapolated_because": refused.reason}
    if spec.sharding == "fsdp":
        meter, facts, sharded = _sharded_trial(spec, allowed_factories)
        return meter, {**facts, **not_extrapolated}, sharded
    meter, model = prepare(spec, allowed_factories)
    runner = TrialRunner(spec, meter, model)

    def trial(micro_batch: int) -> TrialResult:
        with meter.tracking():
            return runner(micro_batch)

    return meter, {**model_facts(model), "attention": attention_facts(model, spec), **not_extrapolated}, trial


def _sharded_trial(spec: ProbeSpec, allowed_factories: Collection[str]) -> tuple[Meter, dict[str, Any], Trial]:
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
