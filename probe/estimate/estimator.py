"""THE step under fake tensors, asked beside a real probe and when nothing fits.

An estimate uses no memory, so it can answer what a measurement cannot afford to ask: before the
real search, which micro-batch to try first (its hint); after it, how far off the estimate was at
each micro-batch that fit; and when micro-batch 1 does not fit at all (probe/needs.py), how many
bytes the step needs with no cap, as asked and under each setting that would shrink it.
"""

from __future__ import annotations

from collections.abc import Collection

from fitprobe.probe.build import prepare
from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.search import find_micro_batch
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.trial import TrialRunner

UNCAPPED_BYTES = 1 << 62


def as_estimate(spec: ProbeSpec, capacity_bytes: int) -> ProbeSpec:
    """The same request under fake tensors, against `capacity_bytes`."""
    return spec.model_copy(update={"mode": "estimate", "capacity_bytes": capacity_bytes})


class Estimator:
    """The spec's step under fake tensors, built once and asked at any micro-batch."""

    def __init__(self, spec: ProbeSpec, capacity_bytes: int, allowed_factories: Collection[str] = ()) -> None:
        self.meter, _, self.trial = make_trial(as_estimate(spec, capacity_bytes), allowed_factories)

    def max_micro_batch(self, spec: ProbeSpec) -> int | None:
        found = find_micro_batch(self.trial, self.meter.capacity_bytes, spec.headroom, spec.micro_batch_limit)
        return found.max_micro_batch or None

    def peak_bytes(self, micro_batch: int) -> int | None:
        return self.trial(micro_batch).peak_allocated_bytes


def estimated_step_bytes(spec: ProbeSpec, micro_batch: int, allowed_factories: Collection[str] = ()) -> int | None:
    """Peak bytes of THE step at `micro_batch` under fake tensors, uncapped; None if it cannot be estimated.

    The whole model's step on one device (fp16-mixed estimated as bf16-mixed, whose memory is the
    same: fake tensors cannot run fp16 loss scaling). A deep decoder's step is extrapolated from two
    cuts where a probe's estimate would be (probe/estimate/extrapolate.py): exact, and the "does not fit" answer
    asks this once per shrinking setting, so the full depth each time cost several estimates.
    """
    precision = "bf16-mixed" if spec.precision == "fp16-mixed" else spec.precision
    estimate = as_estimate(spec.model_copy(update={"precision": precision}), UNCAPPED_BYTES)
    try:
        if estimate.sharding == "none":
            result = make_trial(estimate, allowed_factories)[2](micro_batch)
        else:  # the whole model on one device, not the sharded step make_trial would run
            meter, model = prepare(estimate, allowed_factories)
            with meter.tracking():
                result = TrialRunner(estimate, meter, model)(micro_batch)
    except (SpecError, RuntimeError, NotImplementedError):
        # some models cannot run under fake tensors (data-dependent shapes); the answer stays "does not fit"
        return None
    return result.peak_allocated_bytes if result.fits else None
