"""The CPU tests' checks against real CUDA OOMs. Run on a lent GPU: `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from probe.job import prepare, run_probe
from probe.meter import is_oom
from probe.spec import ProbeSpec
from probe.trial import TrialRunner

pytestmark = pytest.mark.gpu


def test_a_real_cuda_oom_is_classified_as_oom():
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(Exception) as caught:
        torch.empty(2 * total, dtype=torch.uint8, device="cuda:0")
    assert is_oom(caught.value)


def test_after_a_real_oom_allocated_memory_is_back_to_baseline():
    spec = ProbeSpec(model="builtin:gpt-small", seq_len=512, device="cuda:0", capacity_bytes="1GiB")
    meter, model = prepare(spec)
    runner = TrialRunner(spec, meter, model)
    baseline = meter.allocated_bytes()
    result = runner(1024)
    assert not result.fits
    assert meter.allocated_bytes() == baseline


@pytest.mark.parametrize("case", [
    dict(model="builtin:gpt-small", seq_len=512, capacity_bytes="2GiB"),
    dict(model="builtin:gpt-base", seq_len=1024, capacity_bytes="4GiB", precision="bf16-mixed"),
    dict(model="preset:gpt2", seq_len=512, capacity_bytes="8GiB", finetuning="lora"),
])
def test_probe_max_is_the_true_maximum_on_cuda(case):
    spec = ProbeSpec(device="cuda:0", **case)
    search = run_probe(spec)["search"]
    best = search["max_micro_batch"]

    def fits(b: int) -> bool:
        meter, model = prepare(spec)
        result = TrialRunner(spec, meter, model)(b)
        del model
        meter.release()
        return result.fits

    assert fits(best) and not fits(best + 1)
    assert search["trial_count"] <= 7
