"""The FLOPs of one training micro-step, counted on the traced step under fake tensors.

`torch.utils.flop_counter.FlopCounterMode` sees every operation the step dispatches, the backward's
included, so what gradient checkpointing recomputes is counted where it runs: the difference between
two steps is exact, not a rule of thumb. It counts the operations it has formulas for (matmuls,
convolutions, attention); elementwise work and optimizer updates are not FLOPs to it, and nothing here
says how fast a kernel runs them.

A decoder the estimate cuts (probe/estimate/extrapolate.py) is counted on its two cuts: every period
of layers between them runs the same operations on the same shapes, so the full depth's count is the
shallow cut's plus `repeats` times the difference, as every moment of the memory trace is.
"""

from __future__ import annotations

from collections.abc import Collection

from torch.utils.flop_counter import FlopCounterMode

from fitprobe.probe.spec import MAX_CAPACITY_BYTES, ProbeSpec, SpecError


def counted_flops(spec: ProbeSpec, allowed_factories: Collection[str] = ()) -> int:
    """FLOPs of one micro-step at micro-batch 1 of `spec`'s model at its own depth, under fake tensors."""
    from fitprobe.probe.build import prepare
    from fitprobe.probe.trial import TrialRunner

    spec = spec.model_copy(update={"mode": "estimate", "capacity_bytes": MAX_CAPACITY_BYTES, "extrapolate": False})
    meter, model = prepare(spec, allowed_factories)
    runner = TrialRunner(spec, meter, model)
    with meter.tracking(), FlopCounterMode(display=False) as counter:  # pushed last: it sees each op first
        result = runner(1)
    if not result.fits:
        raise SpecError(f"counting the step's FLOPs failed: {result.error}")
    return counter.get_total_flops() // (spec.micro_steps_per_trial * spec.optimizer_steps_per_trial)


def step_flops(spec: ProbeSpec, allowed_factories: Collection[str] = ()) -> int | str:
    """FLOPs of one micro-step at micro-batch 1 of the full model (extrapolated from the cuts where the
    estimate cuts it), or why they could not be counted."""
    from fitprobe.probe.estimate.extrapolate import plan_cuts
    from fitprobe.probe.estimate.fallback import Fallback
    from fitprobe.probe.models.load import build_model

    try:
        full = build_model(spec, "meta", allowed_factories)
        try:
            cuts, (shallow_spec, deep_spec) = plan_cuts(spec, full.module, allowed_factories)
        except Fallback:  # no cuts for this model: count the full depth
            return counted_flops(spec, allowed_factories)
        finally:
            del full
        shallow, deep = (counted_flops(s, allowed_factories) for s in (shallow_spec, deep_spec))
        return shallow + cuts.repeats * (deep - shallow)
    except SpecError as exc:
        return str(exc)
