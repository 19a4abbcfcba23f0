"""The generation batch: the largest batch `model.generate` runs, greedy, with its KV cache grown to the end.

Prompts are seq_len tokens, or with the user's data (`--data`) as long as its longest row, cut at seq_len.

It runs beside what training keeps resident (probe/resident.py: weights and optimizer state, as during an
evaluation with generation or an RL rollout), or beside the weights alone (`generate_alone`, an
inference-only job). `generate` prefills the prompt (seq_len tokens) into the cache, then decodes one token at a
time, the cache
growing to prompt + max_new_tokens - 1 tokens (the last token is never fed back). Its peak is the larger
of the prefill (activations over the whole prompt) and the last decode step (the whole cache, the
DynamicCache's concatenation copying one layer's keys or values at a time). The trial runs
transformers' own `generate` for all max_new_tokens steps, in the model's precision, under no_grad, with
the cache implementation the user picks (dynamic, the default, or static, allocated whole up front):
exact by construction, and bounded at the door (MAX_NEW_TOKENS) because each trial decodes every token.

Estimated the same way: under fake tensors `generate` runs as is, its few reads of values answered from
what fitprobe knows of its own prompts (probe/estimate/generate_reads.py), so the estimate equals the
measured trial to the byte. The trial marks two phases, the prefill and the decode steps, each a line in the
batch and in the tokens, so the search predicts where each reaches the capacity and confirms.

Known limitations: an estimate decodes every token too, one fake forward per token (no depth
extrapolation yet), so layers × new tokens is bounded (ESTIMATE_LAYER_TOKENS) and so is the longest
generation an estimate tries; greedy decoding only (`do_sample` adds a [batch, vocab] fp32 probabilities
buffer per step; beams are not modelled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from fitprobe.probe.build import prepare
from fitprobe.probe.events import Emit, ignore
from fitprobe.probe.heap import frozen_heap, settle
from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.estimate.generate_reads import GenerateReads
from fitprobe.probe.meter import Meter
from fitprobe.probe.models.bounds import ESTIMATE_LAYER_TOKENS, check_decode_bound
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.report import EvalSearch, Generation, TrialResult
from fitprobe.probe.resident import ResidentRunner, announced, resident_facts, resident_words
from fitprobe.probe.search import find_micro_batch
from fitprobe.probe.spec import MAX_NEW_TOKENS, ProbeSpec, format_bytes


def _layers(module: nn.Module) -> int:
    config: Any = module.config
    text: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def estimated_token_limit(spec: ProbeSpec, module: nn.Module) -> int | None:
    """The most new tokens an estimated trial decodes (None: measured, where a token costs the device's time)."""
    if spec.mode != "estimate":
        return None
    return max(ESTIMATE_LAYER_TOKENS // _layers(module), 1)


def prompt_tokens(spec: ProbeSpec) -> int:
    """The prompts' length: seq_len, or with the user's data its longest row cut at seq_len (a batch of prompts
    is padded to its longest, so the worst batch is that many tokens wide)."""
    if spec.data is None:
        return spec.seq_len
    return max(min(spec.seq_len, max(spec.data.rows_by_length)), 1)


def kv_cache_bytes_per_sequence(module: nn.Module, tokens: int) -> int:
    """2 (keys, values) × layers × kv_heads × head_dim × tokens × dtype bytes: the cache's arithmetic.

    A sliding-window layer's cache (transformers' DynamicSlidingWindowLayer) keeps only its last
    sliding_window - 1 tokens, so its layers count min(tokens, sliding_window - 1): Mistral's whole cache.
    Multi-head latent attention (DeepSeek-V2/V3, GLM-4-MoE-Lite, LongCat: a config with `kv_lora_rank`)
    caches no per-head keys and values: transformers stores the compressed latent (kv_lora_rank) and the
    one rotary key shared by all heads (qk_rope_head_dim) per token, and expands them at each step, so a
    layer holds kv_lora_rank + qk_rope_head_dim elements per token: DeepSeek-V3 caches 512 + 64 = 576
    where its 128 heads' keys (192) and values (128) in full would be 40,960.
    """
    config: Any = module.config
    text: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    latent_rank = getattr(text, "kv_lora_rank", None)
    per_token = latent_rank + text.qk_rope_head_dim if latent_rank else 2 * kv_heads * head_dim
    dtype_bytes = next(module.parameters()).element_size()
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None) or \
        ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers
    kept = sum(min(tokens, window - 1) if kind == "sliding_attention" and window else tokens for kind in kinds)
    return per_token * kept * dtype_bytes


class GenerateRunner(ResidentRunner):
    """`runner(b, new_tokens) -> TrialResult`: one greedy `generate` of b prompts of seq_len tokens."""

    what = "generation"

    def __init__(self, spec: ProbeSpec, meter: Meter, model: LoadedModel) -> None:
        super().__init__(spec, meter, model, alone=spec.generate_alone)
        self.last_cache_bytes: int | None = None

    def _run(self, batch: int, new_tokens: int | None) -> TrialResult:
        spec, meter, module = self.spec, self.meter, self.model.module
        new_tokens = new_tokens or spec.max_new_tokens
        prompt = torch.randint(0, self.model.vocab_size, (batch, prompt_tokens(spec)), generator=self._generator)
        meter.start_trial()
        input_ids = prompt.to(meter.device)
        # under fake tensors generate's few reads of values are answered (probe/estimate/generate_reads.py)
        reads = GenerateReads(prompt_tokens(spec) + new_tokens) if isinstance(meter, EstimateMeter) else nullcontext()
        # two phases, each a line in the batch (or the tokens) the search fits: the prefill, then the decode steps
        meter.phase("generate_prefill")
        forwards = 0

        def count_forward(*_: Any) -> None:
            nonlocal forwards
            forwards += 1
            if forwards == 2:
                meter.phase("generate_decode")

        base: Any = getattr(module, "get_base_model", lambda: module)()
        hook = base.register_forward_pre_hook(count_forward)
        try:
            with torch.no_grad(), reads:
                # every token generated (no EOS stop), greedy, returning the cache so its bytes can be read
                generate: Any = module.generate
                out = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0, cache_implementation=spec.cache_implementation,
                               return_dict_in_generate=True)
        finally:
            hook.remove()
        cache: Any = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self.last_cache_bytes = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
                                    if t is not None) // batch
        del out, cache, input_ids
        return self._result(batch)


def search_generation(spec: ProbeSpec, allowed_factories: Collection[str] = (), emit: Emit = ignore) -> Generation:
    """The largest generate batch at max_new_tokens, the cache per sequence, and the longest generation at batch 1."""
    with frozen_heap():
        meter, model = prepare(spec, allowed_factories)
        check_decode_bound(spec, _layers(model.module))
        token_limit = estimated_token_limit(spec, model.module)
        runner = GenerateRunner(spec, meter, model)
        settle()
        capacity = meter.capacity_bytes
        search = find_micro_batch(announced(runner, "generation", emit), capacity, spec.headroom)
        runner(1)
        cache_bytes = runner.last_cache_bytes or 0
        prompt = prompt_tokens(spec)
        tokens = prompt + spec.max_new_tokens - 1
        # no longer than the door allows, nor past the model's position table, nor an estimate's decode bound
        context = model.max_seq_len - prompt if model.max_seq_len else MAX_NEW_TOKENS
        limit = max(min(MAX_NEW_TOKENS, context, token_limit or MAX_NEW_TOKENS), 1)
        at_batch_1 = announced(lambda n: dataclasses.replace(runner(1, n), micro_batch=n), "generation_length", emit)
        longest = find_micro_batch(at_batch_1, capacity, spec.headroom, limit)
    return Generation(
        **resident_facts(runner, "inference-only job" if spec.generate_alone else None),
        batch=EvalSearch(max=search.max_micro_batch, safe=search.safe_micro_batch,
                         trial_count=len(search.trials), trials=search.trials),
        prompt_tokens=prompt, max_new_tokens=spec.max_new_tokens, cache_implementation=spec.cache_implementation,
        cache_tokens=tokens, cache_bytes_per_sequence=cache_bytes,
        cache_bytes_per_sequence_arithmetic=kv_cache_bytes_per_sequence(model.module, tokens),
        longest_new_tokens_at_batch_1=longest.max_micro_batch,
        longest_limit_reached=longest.max_micro_batch >= limit)


def generation_words(generation: Generation) -> str:
    """The section for people: the batch, the cache per sequence (beside its arithmetic), the longest at batch 1."""
    search = generation.batch
    longest = f"{generation.longest_new_tokens_at_batch_1}{' (the limit)' if generation.longest_limit_reached else ''}"
    return (f"generate batch: max {search.max}, safe {search.safe} ({search.trial_count} trials) for "
            f"{generation.prompt_tokens}-token prompts + {generation.max_new_tokens} new tokens "
            f"({generation.cache_implementation} cache) beside {resident_words(generation)}\n"
            f"  KV cache per sequence: {format_bytes(generation.cache_bytes_per_sequence)} at "
            f"{generation.cache_tokens} tokens (arithmetic: {format_bytes(generation.cache_bytes_per_sequence_arithmetic)});"
            f" longest generation at batch 1: {longest} new tokens")
