"""An estimate for a named CUDA card counts attention as that card's SDPA kernels run it.

Expected values come from torch's CUDA sources, read by hand: the backend rules of
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, the outputs each kernel documents (flash: a
float32 logsumexp of batch × heads × seq; memory-efficient: the same, seq rounded up to 32; math: the
batch × heads × seq × seq attention matrix, in float32 for bf16 inputs), and the buffers flash_api.cpp's
`mha_bwd` allocates around its kernel. A lent GPU checks the same rules against torch itself
(tests/test_gpu.py::test_sdpa_backend_rules_match_torch_on_this_card).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fitprobe.probe.estimate.cuda_attention import CARD_ARCH, CudaAttention, CudaKernelBuffers, select_backend
from fitprobe.probe.gpus import GPU_TOTAL_MIB
from fitprobe.probe.meter import LiveBytesMode
from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import ProbeSpec

H100, A100, RTX4090, T4, V100 = (9, 0), (8, 0), (8, 9), (7, 5), (7, 0)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def qkv(batch=2, heads=4, seq=64, head=64, dtype=BF16, kv_heads=None, seq_k=None):
    kv_heads = kv_heads or heads
    make = lambda h, s: torch.empty(batch, h, s, head, dtype=dtype, device="meta")  # noqa: E731
    return make(heads, seq), make(kv_heads, seq_k or seq), make(kv_heads, seq_k or seq)


MASK = torch.empty(2, 1, 64, 64, dtype=torch.bool, device="meta")

# (card, inputs, mask, dropout, causal, gqa) -> backend, each read off sdp_utils.cpp's filters
RULES = [
    ("bf16, no mask, head 128 on H100: flash", H100, qkv(head=128), None, 0.0, True, False, "flash"),
    ("a mask rules out flash (check_for_attn_mask)", H100, qkv(), MASK, 0.0, False, False, "efficient"),
    ("flash runs fp16/bf16 only", H100, qkv(dtype=FP32), None, 0.0, True, False, "efficient"),
    ("fp32 head 100 is 4-aligned on sm80", A100, qkv(dtype=FP32, head=100), None, 0.0, True, False, "efficient"),
    ("fp32 head 66 is not 4-aligned: math", A100, qkv(dtype=FP32, head=66), None, 0.0, True, False, "math"),
    ("bf16 on sm75: neither fused kernel", T4, qkv(), MASK, 0.0, False, False, "math"),
    ("fp16 with a mask on sm75: memory-efficient", T4, qkv(dtype=FP16), MASK, 0.0, False, False, "efficient"),
    ("flash needs sm80", V100, qkv(dtype=FP16), None, 0.0, True, False, "efficient"),
    ("sm89 cannot train flash at head 208", RTX4090, qkv(head=208), None, 0.0, True, False, "efficient"),
    ("sm89 trains flash at head 256 without dropout", RTX4090, qkv(head=256), None, 0.0, True, False, "flash"),
    ("... but not with dropout", RTX4090, qkv(head=256), None, 0.1, True, False, "efficient"),
    ("head 256 is fine for flash on sm90", H100, qkv(head=256), None, 0.1, True, False, "flash"),
    ("causal flash needs equal lengths", H100, qkv(seq_k=96), None, 0.0, True, False, "efficient"),
    ("grouped heads run in flash with enable_gqa", H100, qkv(kv_heads=2), None, 0.0, True, True, "flash"),
    ("grouped heads without enable_gqa: no kernel, math", H100, qkv(kv_heads=2), None, 0.0, True, False, "math"),
]


@pytest.mark.parametrize("name, arch, tensors, mask, dropout, causal, gqa, backend", RULES, ids=[r[0] for r in RULES])
def test_backend_follows_torchs_cuda_rules(name, arch, tensors, mask, dropout, causal, gqa, backend):
    q, k, v = tensors
    assert select_backend(arch, q, k, v, mask, dropout, causal, gqa, needs_grad=True).backend == backend


def test_every_card_fitprobe_plans_for_has_a_compute_capability():
    assert set(CARD_ARCH) == set(GPU_TOTAL_MIB)


def _attention(arch, batch, heads, seq, head, dtype, mask=None, kv_heads=None, causal=False, gqa=False):
    """One SDPA forward under fake tensors, as on a card of `arch`: (output, the inputs)."""
    kv_heads = kv_heads or heads
    q = torch.empty(batch, heads, seq, head, dtype=dtype, requires_grad=True)
    k = torch.empty(batch, kv_heads, seq, head, dtype=dtype, requires_grad=True)
    v = torch.empty(batch, kv_heads, seq, head, dtype=dtype, requires_grad=True)
    with CudaAttention(arch):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return out, (q, k, v)


def test_flash_saves_a_float32_logsumexp_of_batch_heads_seq():
    with FakeTensorMode():
        out, _ = _attention(H100, 2, 4, 200, 64, BF16, causal=True)
        node = out.grad_fn
        assert type(node).__name__ == "ScaledDotProductFlashAttentionBackward0"
        assert node._saved_logsumexp.shape == (2, 4, 200) and node._saved_logsumexp.dtype == FP32
        assert node._saved_output.shape == (2, 4, 200, 64) and node._saved_output.dtype == BF16


def test_efficient_rounds_the_logsumexp_to_32_and_keeps_the_mask_additive_and_padded_to_8():
    with FakeTensorMode():
        mask = torch.empty(2, 1, 100, 100, dtype=torch.bool)
        out, _ = _attention(H100, 2, 4, 100, 64, BF16, mask=mask)
        node = out.grad_fn
        assert type(node).__name__ == "ScaledDotProductEfficientAttentionBackward0"
        assert node._saved_log_sumexp.shape == (2, 4, 128)  # ceil(100 / 32) * 32
        bias = node._saved_attn_bias
        assert bias.dtype == BF16  # the bool mask made additive in the query's dtype
        assert bias.shape == (2, 4, 100, 100)  # expanded over heads: a view
        assert bias.untyped_storage().nbytes() == 2 * 1 * 100 * 104 * 2  # 100 columns padded to 104


def test_math_on_a_t4_keeps_the_float32_attention_matrix():
    with FakeTensorMode():
        mask = torch.empty(2, 1, 64, 64, dtype=torch.bool)
        out, _ = _attention(T4, 2, 4, 64, 32, BF16, mask=mask)
        saved, seen, stack = [], set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            saved += [getattr(node, n) for n in dir(node) if n.startswith("_saved_")]
            stack += [next_fn for next_fn, _ in node.next_functions]
        matrices = [t for t in saved if isinstance(t, torch.Tensor) and t.shape == (2, 4, 64, 64)]
        assert any(t.dtype == FP32 for t in matrices)  # bf16 inputs are upcast for the math path


def _backward_peak(arch, batch, heads, seq, head, kv_heads=None, gqa=False, buffers=True) -> int:
    with FakeTensorMode():
        out, _ = _attention(arch, batch, heads, seq, head, BF16, kv_heads=kv_heads, causal=True, gqa=gqa)
        grad = torch.empty_like(out)
        counter = LiveBytesMode()
        with counter:
            if buffers:
                with CudaKernelBuffers():
                    out.backward(grad)
            else:
                out.backward(grad)
        return counter.peak_bytes


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_flash_backward_holds_softmax_d_and_a_float32_dq_accumulator(kv_heads):
    batch, heads, seq, head = 2, 4, 200, 64
    seq_rounded, head_rounded = 256, 64  # round up to 128; head rounded to 32 (<= 128)
    expected = batch * heads * seq_rounded * 4 + batch * seq_rounded * heads * head_rounded * 4
    if kv_heads != heads:  # dk and dv for every query head, bf16, before they are summed per group
        expected += 2 * batch * seq * heads * head * 2
    with_buffers = _backward_peak(H100, batch, heads, seq, head, kv_heads, gqa=kv_heads != heads)
    without = _backward_peak(H100, batch, heads, seq, head, kv_heads, gqa=kv_heads != heads, buffers=False)
    assert with_buffers - without == expected


def _estimate(gpu: str, collation: str) -> dict:
    spec = ProbeSpec(model="builtin:gpt-tiny", seq_len=256, precision="bf16-mixed", collation=collation,
                     mode="estimate", gpu=gpu)
    return run_trial(spec, 2).as_json()


def test_the_report_names_the_kernels_and_the_t4_pays_for_the_attention_matrix():
    h100, t4 = _estimate("h100-80gb", "packed"), _estimate("t4-16gb", "packed")
    assert {k["backend"] for k in h100["device"]["kernels"]["sdpa"]} == {"flash"}
    assert {k["backend"] for k in t4["device"]["kernels"]["sdpa"]} == {"math"}
    assert h100["device"]["kernels"]["compute_capability"] == "9.0"
    # gpt-tiny: 4 heads; at micro-batch 2 one layer's float32 attention matrix is 2 x 4 x 256 x 256 x 4 bytes,
    # which the math path keeps for the backward and flash never makes
    one_matrix = 2 * 4 * 256 * 256 * 4
    assert t4["trial"]["peak_allocated_bytes"] - h100["trial"]["peak_allocated_bytes"] >= one_matrix


def test_a_capacity_without_a_card_counts_this_hosts_kernels_and_says_so():
    spec = ProbeSpec(model="builtin:gpt-nano", seq_len=64, precision="fp32", mode="estimate",
                     capacity_bytes=1 << 30)
    report = run_trial(spec, 1).as_json()
    assert report["device"]["kernels"] is None
    assert "fake" in report["device"]["accuracy_note"]


def test_gradient_checkpointing_recomputes_attention_as_the_cards_kernels_too():
    """torch recomputes a checkpointed layer inside the backward, where the forward's function modes are not:
    the estimate failed ("a different number of tensors was saved") until the recomputation re-entered them."""
    from fitprobe.probe.job import run_trial

    config = dict(model_type="llama", vocab_size=4000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)

    def sdpa_calls(checkpointing: bool) -> int:
        spec = ProbeSpec(model=config, seq_len=128, mode="estimate", precision="bf16-mixed", gpu="a100-40gb",
                         gradient_checkpointing=checkpointing, extrapolate=False)
        report = run_trial(spec, 2).as_json()
        assert report["trial"]["fits"]
        return sum(kernel["calls"] for kernel in report["device"]["kernels"]["sdpa"])

    # 2 layers × 2 micro-steps × 2 optimizer steps forward; checkpointing runs every forward once more
    assert sdpa_calls(False) == 2 * 2 * 2
    assert sdpa_calls(True) == 2 * 2 * 2 * 2
