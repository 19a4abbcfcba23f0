"""The generation batch (probe/generate.py) against real `model.generate(max_new_tokens=…)` runs counted by the
CPU allocator's own account over the generate call (tests/reference_loop.py), alone and after a training step
as a user writes it; its KV cache and resident state against the arithmetic; its estimate against the
measured trial. Held-out families: Qwen2 (grouped-query attention, tied embeddings), Mistral (sliding window) and
DeepSeek-V3 (multi-head latent attention, a dense layer then routed and shared experts).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch.profiler import record_function

from fitprobe.probe.build import prepare
from fitprobe.probe.generate import GenerateRunner, search_generation
from fitprobe.probe.spec import ProbeSpec
from tests.reference_loop import allocator_peak_bytes
from tests.test_evaluate import MISTRAL, QWEN2

TOLERANCE = 0.005  # the bar
# multi-head latent attention (the cache holds a 16-wide latent and an 8-wide rotary key per token, not 4 heads'
# keys and values) and a mixture of experts: the first layer dense, the second 4 routed experts (2 a token) and
# a shared one
DEEPSEEK_V3 = dict(model_type="deepseek_v3", vocab_size=1000, hidden_size=64, intermediate_size=128,
                   moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4,
                   num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=4,
                   num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
PROMPT = 16
WINDOW = "test_generate.generate"


def _model(fields: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                            attn_implementation="sdpa")


def generate_peak_bytes(fields: dict[str, Any], batch: int, new_tokens: int, cache: str = "dynamic",
                        train_first: bool = False) -> int:
    """Peak bytes while a user's `model.generate` runs (greedy, every token generated), the weights resident and,
    with `train_first`, the optimizer state of a training step as users write it (HF's default fused AdamW,
    then `zero_grad(set_to_none=True)`): generation inside a training run."""

    def run() -> None:
        model = _model(fields)
        vocab = model.config.vocab_size
        if train_first:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, vocab, (1, PROMPT))
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del ids
        model.eval()
        ids = torch.randint(0, vocab, (batch, PROMPT))
        with torch.no_grad(), record_function(WINDOW):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, cache_implementation=cache)

    return allocator_peak_bytes(run, window=WINDOW)


def _spec(fields: dict, new_tokens: int, capacity_bytes: int = 1 << 30, cache: str = "dynamic",
          mode: str = "measure", alone: bool = True) -> ProbeSpec:
    return ProbeSpec(model=fields, seq_len=PROMPT, precision="fp32", capacity_bytes=capacity_bytes, generate=True,
                     max_new_tokens=new_tokens, cache_implementation=cache, mode=mode, generate_alone=alone)


def _trial_peaks(spec: ProbeSpec, batch: int) -> tuple[int, int]:
    """The generation trial's peak measured on the CPU and estimated under fake tensors."""
    peaks = []
    for mode in ("measure", "estimate"):
        moded = spec.model_copy(update={"mode": mode})
        meter, model = prepare(moded)
        result = GenerateRunner(moded, meter, model)(batch)
        assert result.fits and result.peak_allocated_bytes
        peaks.append(result.peak_allocated_bytes)
    return peaks[0], peaks[1]


# Each decode step costs every generate (the user's, the trial, the estimate's fake one) the same: each case
# decodes only as far as its claim needs.
# - Qwen2, dynamic cache: long enough that the last decode step, with the whole cache, holds the peak, not the
#   prefill (the user's generate at batch 4 peaks at the prefill up to 48 new tokens, at the last step by 96).
# - Mistral, dynamic cache: the prompt already fills its 16-token window, so every step from the first holds
#   a cache cut to the window (DynamicSlidingWindowLayer): 24 tokens decode well past it.
# - Qwen2, static cache: allocated whole up front, for prompt + max_new_tokens, at any length.
@pytest.mark.slow  # 4-9 s each on the shared 2-core host: a real generate under the profiler, a trial, an estimate
@pytest.mark.parametrize("fields,cache,alone,new_tokens", [(QWEN2, "dynamic", True, 96),
                                                           (MISTRAL, "dynamic", False, 24),
                                                           (QWEN2, "static", False, 24),
                                                           (DEEPSEEK_V3, "dynamic", False, 24)],
                         ids=["qwen2-dynamic-inference-only", "mistral-dynamic-beside-training",
                              "qwen2-static-beside-training", "deepseek_v3-dynamic-beside-training"])
def test_generation_peak_is_what_model_generate_holds_and_the_estimate_equals_it(fields, cache, alone, new_tokens):
    """Beside training, the optimizer state a training step leaves stays resident through the generation."""
    measured, estimated = _trial_peaks(_spec(fields, new_tokens, cache=cache, alone=alone), 4)
    assert measured == pytest.approx(generate_peak_bytes(fields, 4, new_tokens, cache, train_first=not alone),
                                     rel=TOLERANCE)
    assert estimated == measured


def _blocks(n_bytes: int) -> int:
    return -(-n_bytes // 512) * 512


@pytest.mark.slow  # ~10 s on the shared 2-core host: a probe with its generation and evaluation, estimated
def test_beside_training_generation_and_evaluation_fit_where_training_fits_and_the_capacity_left_says_why():
    """Training fits at micro-batch ≥ 1, so the no-grad steps beside its resident state fit too: that state is
    less than a training step holds. The resident bytes are the weights and fused AdamW's state by hand: each
    tensor in the CUDA allocator's 512-byte blocks, two fp32 moments per parameter and a step scalar each.
    Each of their trials is announced as it ends (a `batch_trial` event), as the report lists it."""
    from fitprobe.probe.job import run_probe

    capacity = 6 << 20
    # a short context bounds the longest-generation search: what is checked here is the resident state, which
    # no generation length changes
    fields = dict(QWEN2, max_position_embeddings=32)
    spec = ProbeSpec(model=fields, seq_len=PROMPT, precision="fp32", capacity_bytes=capacity, mode="estimate",
                     generate=True, max_new_tokens=8, eval=True)
    seen: list[dict] = []
    report = run_probe(spec, seen.append)
    assert report.search.max_micro_batch >= 1
    announced = [e for e in seen if e["type"] == "batch_trial"]
    for search, section in (("evaluation", report.evaluation), ("generation", report.generation)):
        assert section is not None
        assert [(e["size"], e["fits"], e["peak_allocated_bytes"]) for e in announced if e["search"] == search] == [
            (t.micro_batch, t.fits, t.peak_allocated_bytes) for t in section.batch.trials], search
    assert any(e["search"] == "generation_length" for e in announced), "the longest-generation search is silent"
    phases = [e.get("phase") for e in seen]
    # each search's trials come after its phase is announced, and the generation's after the evaluation's
    assert phases.index("evaluation") < seen.index(announced[0]) and phases.index("generation") > max(
        i for i, e in enumerate(seen) if e.get("search") == "evaluation")
    model = _model(fields)
    weights = sum(_blocks(t.nbytes) for t in (*model.parameters(), *model.buffers()))
    state = sum(2 * _blocks(p.nbytes) + 512 for p in model.parameters())
    for section in (report.generation, report.evaluation):
        assert section is not None
        assert section.batch.max >= 1
        assert section.resident_bytes == weights + state
        assert section.capacity_left_bytes == capacity - weights - state


@pytest.mark.slow  # ~12 s on the shared 2-core host: two searches, their estimates and two real generates
def test_the_generation_batch_is_the_true_max_and_its_cache_is_the_arithmetic():
    capacity = 3 << 20
    # a short context bounds the longest-generation search; both it and the 12 new tokens pass the window (16)
    fields = dict(MISTRAL, max_position_embeddings=40)
    generation = search_generation(_spec(fields, 12, capacity))
    assert search_generation(_spec(fields, 12, capacity, mode="estimate")) == generation
    top = generation.batch.max
    assert top > 1
    assert generate_peak_bytes(fields, top, 12) <= capacity < generate_peak_bytes(fields, top + 1, 12)
    # 2 × layers × kv_heads × head_dim × tokens × 4 bytes, by hand: Mistral's 2 layers, 1 kv head of 16; its
    # sliding window (16) keeps the last 15 of the 27 tokens, so the cache stops growing at the window
    assert generation.cache_tokens == PROMPT + 12 - 1
    assert generation.cache_bytes_per_sequence == 2 * 2 * 1 * 16 * (16 - 1) * 4
    assert generation.cache_bytes_per_sequence_arithmetic == generation.cache_bytes_per_sequence
    assert generation.longest_new_tokens_at_batch_1 == 40 - PROMPT  # to the context's end (the window caps the cache)
    assert generation.longest_limit_reached


def test_the_cache_arithmetic_of_a_full_attention_model_counts_every_token():
    """Qwen2 (grouped-query: 2 kv heads of 16, 2 layers), fp32, no window: the issue's formula as written."""
    from fitprobe.probe.generate import kv_cache_bytes_per_sequence

    assert kv_cache_bytes_per_sequence(_model(QWEN2), 100) == 2 * 2 * 2 * 16 * 100 * 4


def test_a_latent_attention_cache_is_its_latent_and_rotary_key_per_token_as_the_trial_reads_it():
    """DeepSeek-V3's layers cache kv_lora_rank + qk_rope_head_dim = 16 + 8 values a token, not 2 × 4 heads × 16:
    the arithmetic by hand, and the cache a generate trial returns, read tensor by tensor."""
    from fitprobe.probe.generate import kv_cache_bytes_per_sequence

    by_hand = 2 * (16 + 8) * (PROMPT + 4 - 1) * 4  # 2 layers, fp32; the last token generated is never cached
    assert kv_cache_bytes_per_sequence(_model(DEEPSEEK_V3), PROMPT + 4 - 1) == by_hand
    spec = _spec(DEEPSEEK_V3, 4, mode="estimate")
    meter, model = prepare(spec)
    runner = GenerateRunner(spec, meter, model)
    assert runner(2).fits and runner.last_cache_bytes == by_hand


def test_generation_settings_are_bounded_at_the_door_with_the_fix():
    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        ProbeSpec(model=QWEN2, generate=True, max_new_tokens=1 << 20)
    with pytest.raises(ValidationError, match=r"add generate \(--generate\)"):
        ProbeSpec(model=QWEN2, generate_alone=True)
    with pytest.raises(ValidationError, match="use a preset:, hf: or inline config"):
        ProbeSpec(model="builtin:gpt-nano", generate=True)


@pytest.mark.slow  # ~6 s on the shared 2-core host: an estimated probe with its generation search
def test_every_export_names_the_generation_batch_and_kwargs_that_model_generate_takes():
    from fitprobe.probe.export import export_report
    from fitprobe.probe.job import run_job

    fields = dict(QWEN2, max_position_embeddings=32)
    report = run_job(ProbeSpec(model=fields, seq_len=PROMPT, precision="fp32", mode="estimate",
                               capacity_bytes=6 << 20, generate=True, max_new_tokens=8, effective_batch=8))
    assert report.generation is not None
    for fmt in ("hf", "trl", "axolotl", "torchtune"):
        generation = export_report(report, fmt)["provenance"]["generation"]
        assert generation["batch_size"] == report.generation.batch.safe >= 1
        assert generation["max_batch"] == report.generation.batch.max
        assert generation["generation_kwargs"] == {"max_new_tokens": 8, "do_sample": False,
                                                   "cache_implementation": "dynamic"}
    # what a user does with it: model.generate on batches of batch_size prompts, the kwargs as exported
    ids = torch.randint(0, fields["vocab_size"], (generation["batch_size"], PROMPT))
    out = _model(fields).eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                                         **generation["generation_kwargs"])
    assert out.shape[0] == generation["batch_size"] and out.shape[1] <= PROMPT + 8


@pytest.mark.slow  # ~4 s on the shared 2-core host: a QLoRA model built twice, a trial each
def test_a_qlora_models_generation_runs_on_its_4bit_base_and_the_estimate_equals_the_trial():
    """QLoRA's generation (e.g. a GRPO rollout): the frozen base in bitsandbytes nf4, beside the adapters' paged
    8-bit state; counted the same measured and on fake tensors. The cache is fp32: peft's
    prepare_model_for_kbit_training keeps the unquantized weights (the embedding) in fp32, so the hidden states
    and the keys and values computed from them are fp32 too."""
    spec = ProbeSpec(model=dict(QWEN2, hidden_size=128, intermediate_size=256), seq_len=PROMPT,
                     precision="bf16-mixed", capacity_bytes=1 << 30, generate=True, max_new_tokens=12,
                     finetuning="lora", quantization="nf4", optimizer="paged_adamw_8bit")
    runs = []
    for mode in ("measure", "estimate"):
        moded = spec.model_copy(update={"mode": mode})
        meter, model = prepare(moded)
        runner = GenerateRunner(moded, meter, model)
        runs.append((runner(3).peak_allocated_bytes, runner.resident_bytes, runner.last_cache_bytes))
    assert runs[0] == runs[1]
    # 2 (keys, values) × 2 layers × 2 kv heads × head_dim 32 × (16 + 12 - 1) tokens × 4 bytes (fp32)
    assert runs[0][2] == 2 * 2 * 2 * 32 * (PROMPT + 12 - 1) * 4


def test_an_estimated_generation_past_its_decode_bound_is_refused_before_any_trial():
    """One fake forward per token: 8 layers × 1024 new tokens is past the 4096 layer-tokens an estimate runs, so
    the search names the 512 this model's estimate decodes and the fix, without decoding anything."""
    from fitprobe.probe.errors import SpecError

    spec = _spec(dict(QWEN2, num_hidden_layers=8, max_position_embeddings=2048), 1024, mode="estimate")
    with pytest.raises(SpecError, match=r"max_new_tokens 1024 is past the 512 .* lower max_new_tokens"):
        search_generation(spec)


def test_with_the_users_data_the_prompts_are_its_longest_row():
    """Rows of 6 and 10 tokens under seq_len 16: a batch of prompts is padded to its longest, 10 tokens, so the
    cache ends at 10 + 8 - 1 tokens: 2 × 2 layers × 2 kv heads × 16 × 17 × 4 bytes, by hand."""
    from fitprobe.probe.spec import DataLengths

    spec = _spec(QWEN2, 8, mode="estimate").model_copy(
        update={"data": DataLengths(rows_by_length={6: 3, 10: 2})})
    meter, model = prepare(spec)
    runner = GenerateRunner(spec, meter, model)
    assert runner(2).fits
    assert runner.last_cache_bytes == 2 * 2 * 2 * 16 * (10 + 8 - 1) * 4
