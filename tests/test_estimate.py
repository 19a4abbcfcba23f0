"""Estimate mode counts the bytes the real step allocates, without allocating them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from probe.job import prepare, run_probe
from probe.spec import ProbeSpec
from probe.trial import TrialRunner

CASES = [
    dict(model="builtin:gpt-tiny", seq_len=128, capacity_bytes="120MiB"),
    dict(model="preset:gpt2", seq_len=32, capacity_bytes="2600MiB"),
    dict(model="builtin:gpt-small", seq_len=64, capacity_bytes="120MiB", finetuning="lora",
         precision="bf16-mixed"),
]


def peak_at(spec: ProbeSpec, micro_batch: int) -> int:
    meter, model = prepare(spec)
    with meter.tracking():
        result = TrialRunner(spec, meter, model)(micro_batch)
    assert result.fits
    return result.peak_allocated_bytes


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-{c.get('finetuning', 'full')}")
def test_estimated_peak_and_max_equal_the_cpu_meters(case):
    measured, estimated = ProbeSpec(**case), ProbeSpec(mode="estimate", **case)
    assert peak_at(estimated, 3) == pytest.approx(peak_at(measured, 3), rel=0.01)
    estimate_max = run_probe(estimated)["search"]["max_micro_batch"]
    assert estimate_max == run_probe(measured)["search"]["max_micro_batch"]


def test_estimate_report_says_what_it_counted_and_times_nothing():
    report = run_probe(ProbeSpec(model="builtin:gpt-nano", seq_len=32, capacity_bytes="16MiB", mode="estimate"))
    assert report["device"]["meter"] == "estimate-fake-tensors"
    assert "fake" in report["device"]["accuracy_note"]
    assert all(t["step_s"] is None for t in report["search"]["trials"])


def test_a_7b_estimate_uses_no_memory_for_its_weights():
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "probe.cli", "trial", "--model", "preset:mistral-7b", "--seq-len", "128",
             "--lora", "--precision", "bf16-mixed", "--estimate", "--gpu", "a100-40gb", "--micro-batch", "1",
             "--json"], stdout=out, stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        assert child.returncode == 0
        trial = json.load(out)["trial"]
    assert trial["fits"] and trial["peak_allocated_bytes"] > 14 * 2**30  # 7B bf16 weights alone
    assert usage.ru_maxrss * 1024 < 2 * 2**30, "fake weights must not be materialised"


def test_estimate_needs_a_capacity():
    with pytest.raises(ValueError, match="estimate mode needs a capacity"):
        ProbeSpec(mode="estimate")
