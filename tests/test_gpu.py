"""The CPU tests' checks against real CUDA OOMs. Run on a lent GPU: `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from fitprobe.probe.build import prepare
from fitprobe.probe.job import run_probe
from fitprobe.probe.meter import is_oom
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.trial import TrialRunner

pytestmark = pytest.mark.gpu


def test_a_real_cuda_oom_is_classified_as_oom():
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(Exception) as caught:
        torch.empty(2 * total, dtype=torch.uint8, device="cuda:0")
    assert is_oom(caught.value)


def test_after_a_real_oom_allocated_memory_is_back_to_baseline():
    spec = ProbeSpec(precision="fp32", model="builtin:gpt-small", seq_len=512, device="cuda:0", capacity_bytes="1GiB")
    meter, model = prepare(spec)
    runner = TrialRunner(spec, meter, model)
    baseline = meter.allocated_bytes()
    result = runner(1024)
    assert not result.fits
    assert meter.allocated_bytes() == baseline


def test_a_measured_cuda_report_has_no_breakdown_and_says_why():
    """The caching allocator's statistics do not say what each allocation is for: null, not a guess."""
    report = run_probe(ProbeSpec(model="builtin:gpt-nano", seq_len=64, device="cuda:0", capacity_bytes="64MiB",
                                 max_micro_batch=4))
    assert all(trial.breakdown is None for trial in report.search.trials)
    assert report.device.breakdown_note and "--estimate" in report.device.breakdown_note


@pytest.mark.parametrize("case", [
    dict(model="builtin:gpt-small", seq_len=512, capacity_bytes="2GiB", precision="fp32"),
    dict(model="builtin:gpt-base", seq_len=1024, capacity_bytes="4GiB", precision="bf16-mixed"),
    dict(model="preset:gpt2", seq_len=512, capacity_bytes="8GiB", finetuning="lora", precision="fp32"),
])
def test_probe_max_is_the_true_maximum_on_cuda(case):
    spec = ProbeSpec(device="cuda:0", **case)
    search = run_probe(spec).as_json()["search"]
    best = search["max_micro_batch"]

    def fits(b: int) -> bool:
        meter, model = prepare(spec)
        result = TrialRunner(spec, meter, model)(b)
        del model
        meter.release()
        return result.fits

    assert fits(best) and not fits(best + 1)
    assert search["trial_count"] <= 7


def _cuda_peak_of(run) -> int:
    """The CUDA caching allocator's own peak while `run()` runs, from a clean slate."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_cuda_trial_of_each_optimizer_equals_the_hf_loop_on_cuda(optim, tmp_path):
    """The CPU twin is tests/test_optimizers.py; here torch picks foreach itself and bitsandbytes runs its
    CUDA kernels (paged states in unified memory, which the trial adds to the allocator's peak)."""
    from tests.reference_loop import LoopSettings, hf_trainer_optimizer
    from tests.test_optimizers import FAMILIES

    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(FAMILIES["qwen3"])
    settings = LoopSettings(micro_batch=1, optim=optim)

    def loop() -> None:
        config = AutoConfig.for_model(fields.pop("model_type", "qwen3"), **fields)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().train()
        optimizer = hf_trainer_optimizer(optim, model)
        ids = torch.randint(0, config.vocab_size, (1, settings.seq_len), device="cuda")
        for _ in range(2):
            for _ in range(2):
                (model(input_ids=ids, labels=ids).loss / 2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    expected = _cuda_peak_of(loop)
    spec = ProbeSpec(precision="fp32", model=FAMILIES["qwen3"], seq_len=settings.seq_len, device="cuda:0", capacity_bytes="8GiB",
                     optimizer=optim, collation="packed")
    meter, model = prepare(spec)
    result = TrialRunner(spec, meter, model)(1)
    assert result.fits
    # paged state sits outside the allocator in the loop's count; the trial adds it as device memory
    assert result.peak_allocated_bytes >= expected * 0.995
    if not optim.startswith("paged"):
        assert result.peak_allocated_bytes == pytest.approx(expected, rel=0.01)


SDPA_CASES = [  # dtype, heads, kv_heads, head size, mask, causal, enable_gqa
    (torch.bfloat16, 8, 8, 128, False, True, False),
    (torch.bfloat16, 8, 8, 128, True, False, False),
    (torch.float32, 8, 8, 64, False, True, False),
    (torch.float16, 8, 2, 64, False, True, True),
    (torch.bfloat16, 8, 8, 256, False, True, False),
    (torch.float32, 8, 8, 66, False, True, False),
]


@pytest.mark.parametrize("dtype, heads, kv_heads, head, masked, causal, gqa", SDPA_CASES)
def test_sdpa_backend_rules_match_torch_on_this_card(dtype, heads, kv_heads, head, masked, causal, gqa):
    """probe/estimate/cuda_attention.py's rules against torch's own choice on this card (cuDNN attention off:
    the estimate assumes torch's default order flash, memory-efficient, math)."""
    from fitprobe.probe.estimate.cuda_attention import select_backend

    names = {int(torch.nn.attention.SDPBackend.FLASH_ATTENTION): "flash",
             int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION): "efficient",
             int(torch.nn.attention.SDPBackend.MATH): "math"}
    q = torch.randn(2, heads, 256, head, dtype=dtype, device="cuda", requires_grad=True)
    k = torch.randn(2, kv_heads, 256, head, dtype=dtype, device="cuda", requires_grad=True)
    v = torch.randn(2, kv_heads, 256, head, dtype=dtype, device="cuda", requires_grad=True)
    mask = torch.ones(2, 1, 256, 256, dtype=torch.bool, device="cuda").tril() if masked else None
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        chosen = torch._fused_sdp_choice(q, k, v, mask, 0.0, causal and not masked, None, gqa)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    ours = select_backend(torch.cuda.get_device_capability(), q, k, v, mask, 0.0, causal and not masked, gqa)
    assert ours.backend == names[int(chosen)], ours.why


@pytest.mark.parametrize("masked", [False, True], ids=["flash", "efficient"])
def test_one_attention_step_peak_equals_the_count_as_on_this_card(masked):
    """The allocator's peak over one SDPA forward + backward (inputs and output gradient already there)
    against the same step counted under fake tensors as this card runs it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fitprobe.probe.estimate.cuda_attention import CudaAttention, CudaKernelBuffers
    from fitprobe.probe.meter import LiveBytesMode

    arch = torch.cuda.get_device_capability()

    def step(device, count=None):
        q, k, v = (torch.randn(2, 8, 1000, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(2, 1, 1000, 1000, dtype=torch.bool, device=device).tril() if masked else None
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            if count is None:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=not masked)
                out.backward(torch.ones_like(out))
                torch.cuda.synchronize()
                return torch.cuda.max_memory_allocated() - before
            with count, CudaAttention(arch), CudaKernelBuffers():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=not masked)
                out.backward(torch.ones_like(out))
            return count.peak_bytes
        finally:
            torch.backends.cuda.enable_cudnn_sdp(True)

    real = step("cuda")
    with FakeTensorMode():
        counted = step("cuda", LiveBytesMode())
    assert counted == real
