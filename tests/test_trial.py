"""A trial runs the full training step, measures it, and leaves nothing behind."""

from __future__ import annotations

import pytest

from fitprobe.probe.build import prepare
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.trial import TrialError, TrialRunner


def runner_for(precision: str = "fp32", **fields) -> TrialRunner:
    spec = ProbeSpec(model="builtin:gpt-tiny", seq_len=128, precision=precision, **fields)
    meter, model = prepare(spec)
    return TrialRunner(spec, meter, model)


def test_a_fitting_trial_measures_peaks_per_phase_and_step_time():
    runner = runner_for(capacity_bytes="512MiB")
    with runner.meter.tracking():
        result = runner(4)
    assert result.fits and result.error is None
    assert result.step_s > 0
    weights = sum(p.numel() * 4 for p in runner.model.module.parameters())
    # the optimizer phase holds weights + gradients + AdamW's two moments at least
    assert result.phase_peak_bytes["optimizer"] >= 4 * weights
    assert result.peak_allocated_bytes == max(result.phase_peak_bytes.values())


def test_optimizer_state_is_part_of_the_measured_peak():
    adamw, sgd = runner_for(capacity_bytes="512MiB"), runner_for(capacity_bytes="512MiB", optimizer="sgd")
    with adamw.meter.tracking():
        adamw_peak = adamw(2).phase_peak_bytes["optimizer"]
    with sgd.meter.tracking():
        sgd_peak = sgd(2).phase_peak_bytes["optimizer"]
    weights = sum(p.numel() * 4 for p in adamw.model.module.parameters())
    # AdamW keeps two moments, SGD with momentum one (plus AdamW's foreach temporaries)
    assert adamw_peak - sgd_peak >= weights


def test_after_an_oom_memory_is_back_to_the_pre_trial_baseline():
    runner = runner_for(capacity_bytes="40MiB")
    with runner.meter.tracking():
        baseline = runner.meter.allocated_bytes()
        result = runner(64)
        assert not result.fits
        assert "out of memory" in result.error
        assert runner.meter.allocated_bytes() == baseline
        # and the next trial measures the same as on a fresh model
        again = runner(2)
    fresh = runner_for(capacity_bytes="40MiB")
    with fresh.meter.tracking():
        assert again.peak_allocated_bytes == fresh(2).peak_allocated_bytes


def test_a_failure_that_is_not_memory_is_raised_not_called_too_big(monkeypatch):
    runner = runner_for(capacity_bytes="512MiB")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.model, "logits", broken)
    with runner.meter.tracking(), pytest.raises(TrialError, match="illegal memory access"):
        runner(2)
