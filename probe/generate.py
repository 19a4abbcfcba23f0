"""The generation batch: the largest batch `model.generate` runs, greedy, with its KV cache grown to the end.

`generate` prefills the prompt (seq_len tokens) into the cache, then decodes one token at a time, the cache
growing to prompt + max_new_tokens - 1 tokens (the last token is never fed back). Its peak is the larger
of the prefill (activations over the whole prompt) and the last decode step (the whole cache, the
DynamicCache's concatenation copying one layer's keys or values at a time). The trial runs
transformers' own `generate` for all max_new_tokens steps, in the model's precision, under no_grad, with
the cache implementation the user picks (dynamic, the default, or static, allocated whole up front):
exact by construction, and bounded at the door (MAX_NEW_TOKENS) because each trial decodes every token.

Known limitations: measured only. Under fake tensors `generate` reads values (its stop check asks
whether every sequence finished), so `--estimate` refuses `generate` rather than answer a guess; and
the generation runs alone (weights only), not beside training state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from fitprobe.probe.build import prepare
from fitprobe.probe.heap import frozen_heap, settle
from fitprobe.probe.meter import Meter, is_oom
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.report import EvalSearch, Generation, TrialResult
from fitprobe.probe.search import find_micro_batch
from fitprobe.probe.spec import MAX_NEW_TOKENS, ProbeSpec, format_bytes
from fitprobe.probe.trial import TrialError, oom_result


def kv_cache_bytes_per_sequence(module: nn.Module, tokens: int) -> int:
    """2 (keys, values) × layers × kv_heads × head_dim × tokens × dtype bytes: the cache's arithmetic.

    A sliding-window layer's cache (transformers' DynamicSlidingWindowLayer) keeps only its last
    sliding_window - 1 tokens, so its layers count min(tokens, sliding_window - 1): Mistral's whole cache.
    """
    config: Any = module.config
    text: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype_bytes = next(module.parameters()).element_size()
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None) or \
        ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers
    kept = sum(min(tokens, window - 1) if kind == "sliding_attention" and window else tokens for kind in kinds)
    return 2 * kv_heads * head_dim * kept * dtype_bytes


class GenerateRunner:
    """`runner(b, new_tokens) -> TrialResult`: one greedy `generate` of b prompts of seq_len tokens."""

    def __init__(self, spec: ProbeSpec, meter: Meter, model: LoadedModel) -> None:
        self.spec, self.meter, self.model = spec, meter, model
        self._generator = torch.Generator().manual_seed(spec.seed)
        self.last_cache_bytes: int | None = None

    def __call__(self, batch: int, new_tokens: int | None = None) -> TrialResult:
        self.meter.release()
        try:
            with self.meter.tracking():
                return self._run(batch, new_tokens or self.spec.max_new_tokens)
        except Exception as exc:  # an OOM is an answer; anything else is re-raised
            if not is_oom(exc):
                raise TrialError(f"generation trial at batch {batch} failed: {exc}") from exc
            return oom_result(self.meter, exc, batch)
        finally:
            self.model.module.train()
            self.meter.release()

    def _run(self, batch: int, new_tokens: int) -> TrialResult:
        spec, meter, module = self.spec, self.meter, self.model.module
        module.eval()
        prompt = torch.randint(0, self.model.vocab_size, (batch, spec.seq_len), generator=self._generator)
        meter.start_trial()
        input_ids = prompt.to(meter.device)
        with torch.no_grad():
            # every token generated (no EOS stop), greedy, returning the cache so its bytes can be read
            generate: Any = module.generate
            out = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, cache_implementation=spec.cache_implementation,
                                  return_dict_in_generate=True)
        cache: Any = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self.last_cache_bytes = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
                                    if t is not None) // batch
        del out, cache, input_ids
        reading = meter.reading()
        return TrialResult(batch, True, reading.peak_allocated_bytes, reading.peak_reserved_bytes,
                           reading.alloc_retries, None, reading.phase_peak_bytes, reading.breakdown)


def search_generation(spec: ProbeSpec, allowed_factories: Collection[str] = ()) -> Generation:
    """The largest generate batch at max_new_tokens, the cache per sequence, and the longest generation at batch 1."""
    with frozen_heap():
        meter, model = prepare(spec, allowed_factories)
        runner = GenerateRunner(spec, meter, model)
        settle()
        capacity = meter.capacity_bytes
        search = find_micro_batch(runner, capacity, spec.headroom)
        runner(1)
        cache_bytes = runner.last_cache_bytes or 0
        tokens = spec.seq_len + spec.max_new_tokens - 1
        # no longer than the door allows, nor past the model's position table
        context = model.max_seq_len - spec.seq_len if model.max_seq_len else MAX_NEW_TOKENS
        limit = max(min(MAX_NEW_TOKENS, context), 1)
        longest = find_micro_batch(lambda n: dataclasses.replace(runner(1, n), micro_batch=n), capacity,
                                   spec.headroom, limit)
    return Generation(
        batch=EvalSearch(max=search.max_micro_batch, safe=search.safe_micro_batch,
                         trial_count=len(search.trials), trials=search.trials),
        prompt_tokens=spec.seq_len, max_new_tokens=spec.max_new_tokens, cache_implementation=spec.cache_implementation,
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
            f"({generation.cache_implementation} cache)\n"
            f"  KV cache per sequence: {format_bytes(generation.cache_bytes_per_sequence)} at "
            f"{generation.cache_tokens} tokens (arithmetic: {format_bytes(generation.cache_bytes_per_sequence_arithmetic)});"
            f" longest generation at batch 1: {longest} new tokens")
