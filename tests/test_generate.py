"""The generation batch (probe/generate.py) against real `model.generate(max_new_tokens=…)` runs counted by the
CPU allocator's own account over the generate call (tests/reference_loop.py), and its KV cache against the
arithmetic. Held-out families: Qwen2 (grouped-query attention, tied embeddings) and Mistral (sliding window).
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
PROMPT = 16
WINDOW = "test_generate.generate"


def generate_peak_bytes(fields: dict[str, Any], batch: int, new_tokens: int, cache: str = "dynamic") -> int:
    """Peak bytes while a user's `model.generate` runs (greedy, every token generated), the weights resident."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)

    def run() -> None:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        ids = torch.randint(0, config.vocab_size, (batch, PROMPT))
        with torch.no_grad(), record_function(WINDOW):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, cache_implementation=cache)

    return allocator_peak_bytes(run, window=WINDOW)


def _spec(fields: dict, new_tokens: int, capacity_bytes: int = 1 << 30, cache: str = "dynamic") -> ProbeSpec:
    return ProbeSpec(model=fields, seq_len=PROMPT, precision="fp32", capacity_bytes=capacity_bytes, generate=True,
                     max_new_tokens=new_tokens, cache_implementation=cache)


@pytest.mark.slow  # ~10 s each on the shared 2-core host: a real generate under the profiler and a trial
@pytest.mark.parametrize("fields,cache", [(QWEN2, "dynamic"), (MISTRAL, "dynamic"), (QWEN2, "static")],
                         ids=["qwen2-dynamic", "mistral-dynamic", "qwen2-static"])
def test_generation_peak_is_what_model_generate_holds(fields, cache):
    """Long enough that the last decode step, with the whole cache, holds the peak, not the prefill."""
    spec = _spec(fields, 96, cache=cache)
    meter, model = prepare(spec)
    result = GenerateRunner(spec, meter, model)(4)
    assert result.fits
    assert result.peak_allocated_bytes == pytest.approx(generate_peak_bytes(fields, 4, 96, cache), rel=TOLERANCE)


@pytest.mark.slow  # ~30 s on the shared 2-core host: two searches and two real generates
def test_the_generation_batch_is_the_true_max_and_its_cache_is_the_arithmetic():
    capacity = 3 << 20
    generation = search_generation(_spec(MISTRAL, 64, capacity))
    top = generation.batch.max
    assert top > 1
    assert generate_peak_bytes(MISTRAL, top, 64) <= capacity < generate_peak_bytes(MISTRAL, top + 1, 64)
    # 2 × layers × kv_heads × head_dim × tokens × 4 bytes, by hand: Mistral's 2 layers, 1 kv head of 16; its
    # sliding window (16) keeps the last 15 of the 79 tokens, so the cache stops growing at the window
    assert generation.cache_tokens == PROMPT + 64 - 1
    assert generation.cache_bytes_per_sequence == 2 * 2 * 1 * 16 * (16 - 1) * 4
    assert generation.cache_bytes_per_sequence_arithmetic == generation.cache_bytes_per_sequence
    assert generation.longest_new_tokens_at_batch_1 > 64


def test_the_cache_arithmetic_of_a_full_attention_model_counts_every_token():
    """Qwen2 (grouped-query: 2 kv heads of 16, 2 layers), fp32, no window: the issue's formula as written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fitprobe.probe.generate import kv_cache_bytes_per_sequence

    fields = dict(QWEN2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert kv_cache_bytes_per_sequence(model, 100) == 2 * 2 * 2 * 16 * 100 * 4


def test_generation_settings_are_bounded_at_the_door_with_the_fix():
    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        ProbeSpec(model=QWEN2, generate=True, max_new_tokens=1 << 20)
    with pytest.raises(ValidationError, match="leave out --estimate"):
        ProbeSpec(model=QWEN2, generate=True, mode="estimate", capacity_bytes=1 << 30)
    with pytest.raises(ValidationError, match="use a preset:, hf: or inline config"):
        ProbeSpec(model="builtin:gpt-nano", generate=True)
