"""On the CPU meter, the probe's answer is the true maximum, found in few trials."""

from __future__ import annotations

import statistics

import pytest

from fitprobe.probe.build import prepare
from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.trial import TrialRunner

# Each case keeps a search over micro-batches up to 14-31 but on short sequences, so a trial is cheap. The paths:
# fp32 AdamW on a 1-layer and on a 2-layer model, bf16-mixed autocast with SGD, LoRA, gradient checkpointing.
# (gpt-small in fp32 took the 2-layer case's path at four times its cost.)
CASES = [
    dict(model="builtin:gpt-nano", seq_len=64, capacity_bytes="24MiB", precision="fp32"),
    dict(model="builtin:gpt-tiny", seq_len=32, capacity_bytes="25MiB", precision="fp32"),
    # at seq_len 32: bf16 matmuls are ~35x slower than fp32 on an AVX2-only CPU, so this case keeps fewer tokens a trial
    # (micro-batch 16 peaks at 17.96 MiB and 17 at 18.65 MiB)
    dict(model="builtin:gpt-tiny", seq_len=32, capacity_bytes=19_200_000, precision="bf16-mixed", optimizer="sgd"),
    dict(model="builtin:gpt-tiny", seq_len=64, capacity_bytes="27MiB", finetuning="lora", precision="fp32"),
    dict(model="builtin:gpt-tiny", seq_len=64, capacity_bytes="28MiB", gradient_checkpointing=True, precision="fp32"),
]


def fits_on_a_fresh_model(spec: ProbeSpec, micro_batch: int) -> bool:
    meter, model = prepare(spec)
    with meter.tracking():
        return TrialRunner(spec, meter, model)(micro_batch).fits


@pytest.mark.slow
def test_probe_max_is_the_true_maximum_with_a_median_of_at_most_five_trials():
    trial_counts = []
    for case in CASES:
        spec = ProbeSpec(**case)
        search = run_probe(spec).as_json()["search"]
        best = search["max_micro_batch"]
        assert fits_on_a_fresh_model(spec, best), case
        assert not fits_on_a_fresh_model(spec, best + 1), case
        assert 1 <= search["safe_micro_batch"] <= best
        safe_trial = ProbeSpec(**case)
        meter, model = prepare(safe_trial)
        with meter.tracking():
            peak = TrialRunner(safe_trial, meter, model)(search["safe_micro_batch"]).peak_reserved_bytes
        assert peak <= meter.capacity_bytes * (1 - spec.headroom), case
        trial_counts.append(search["trial_count"])
    assert statistics.median(trial_counts) <= 5, trial_counts


def test_the_search_stops_at_what_the_effective_batch_needs():
    spec = ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=32, capacity_bytes="256MiB", effective_batch=6)
    search = run_probe(spec).as_json()["search"]
    assert search["max_micro_batch"] == 6 and search["limit_reached"]
    assert max(t["micro_batch"] for t in search["trials"]) == 6


def test_every_trial_is_announced_as_an_event():
    events = []
    spec = ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=32, capacity_bytes="24MiB")
    report = run_probe(spec, events.append).as_json()
    trial_events = [e for e in events if e["type"] == "trial"]
    assert [e["micro_batch"] for e in trial_events] == [t["micro_batch"] for t in report["search"]["trials"]]
    assert [e["phase"] for e in events if e["type"] == "phase"] == ["building_model", "probing", "probed"]
