"""How big a model a request may name, decided by arithmetic on its config before anything is built.

Building a model to size it, even on the meta device, costs time in the number of layers: 2,000
layers took 27 s, and `num_hidden_layers: 1e30` never returned (some configs also make a list per
layer in their constructor). So the door reads the config dict itself: every size field must be a
whole number ≥ 1 under a limit, and a parameter count made from those sizes must stay under the
service's limit. Nothing here imports torch or transformers; the caller passes the config class's
defaults for the fields a request leaves out.

The count is the decoder-only transformer every causal LM here is: embeddings (and a separate
head unless tied), per layer the attention projections (grouped-query aware), a gated MLP or, for
GPT-2-style models, a plain one, the experts of a mixture, norms and biases. Biases and norms are
counted whether or not a model has them, and unknown families get the larger (gated) MLP, so the
count is an upper bound within a few percent for the architectures fitprobe ships (GPT-2 124M:
exact; Llama 3.2 1B: +0.02 %).

Default limits, each far above any published model and far below what hangs the server:
- 2×10¹² parameters: the largest open checkpoints are ~1×10¹² (Kimi K2) and 671×10⁹ (DeepSeek-V3);
  their weights alone are 2-4 TB, which estimate mode can still plan over 1024 devices.
- 1,024 layers (Llama 3.1 405B has 126), hidden and head sizes ≤ 65,536 (405B: 16,384),
  intermediate sizes ≤ 262,144 (405B: 53,248), ≤ 1,024 attention heads (405B: 128), a vocabulary
  ≤ 1,048,576 (Gemma: 256,000), ≤ 1,024 experts (DeepSeek-V3: 256), a context ≤ 2²⁴ positions,
  ≤ 10,000 labels (`num_labels`: the config's constructor makes a name for each).
- parameters × tokens of the largest micro-batch the search may try ≤ 10²¹: one micro-step is
  ~6 × that many FLOPs, over an hour on a 1 PFLOP/s device, so the job timeout would end it anyway.
- layers × new tokens of an estimated generation ≤ ESTIMATE_LAYER_TOKENS (probe/generate.py decodes every
  token on fake tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fitprobe.probe.spec import MAX_JSON_ITEMS, MAX_MICRO_BATCH, ProbeSpec, SpecError

MAX_POSITIONS = 2**24

# Config field names per quantity, as transformers' configs spell them.
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model", "head_dim")
INTERMEDIATE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "moe_intermediate_size",
                       "shared_expert_intermediate_size")
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads")
VOCAB_FIELDS = ("vocab_size",)
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
POSITION_FIELDS = ("max_position_embeddings", "n_positions")
# transformers makes an id2label entry per label in the config's constructor, in the server process too:
# num_labels 10⁷ took 26 s and 3 GB there (a classifier head, which a causal LM never builds anyway)
LABEL_FIELDS = ("num_labels",)

# Families whose positions are a learned table and whose MLP is up → act → down (no gate).
GPT2_STYLE = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "builtin"}


@dataclass(frozen=True)
class ModelLimits:
    """The largest model a request may name; the first three are operator settings."""

    max_params: int = 2 * 10**12
    max_layers: int = 1024
    max_param_tokens: int = 10**21
    max_hidden: int = 65_536
    max_intermediate: int = 262_144
    max_heads: int = 1024
    max_vocab: int = 1_048_576
    max_experts: int = 1024
    max_positions: int = MAX_POSITIONS
    max_labels: int = MAX_JSON_ITEMS  # as many as an inline config may hold values (id2label's entries)


@dataclass(frozen=True)
class ModelShape:
    """What the count found: parameters (an upper-bound-ish estimate) and the layer count."""

    parameters: int
    layers: int


def _shown(value: Any) -> str:
    """The value as the request sent it, cut short: a 4,000-digit number is named by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _limits_by_field(limits: ModelLimits) -> Iterator[tuple[str, int, str]]:
    """(field, limit, setting that raises it or '') for every size field this module knows."""
    for fields, limit, setting in ((LAYER_FIELDS, limits.max_layers, "FITPROBE_MAX_MODEL_LAYERS"),
                                   (HIDDEN_FIELDS, limits.max_hidden, ""),
                                   (INTERMEDIATE_FIELDS, limits.max_intermediate, ""),
                                   (HEAD_FIELDS, limits.max_heads, ""), (VOCAB_FIELDS, limits.max_vocab, ""),
                                   (EXPERT_FIELDS, limits.max_experts, ""),
                                   (POSITION_FIELDS, limits.max_positions, ""),
                                   (LABEL_FIELDS, limits.max_labels, "")):
        for field in fields:
            yield field, limit, setting


def check_sizes(fields: Mapping[str, Any], limits: ModelLimits, where: str = "model") -> None:
    """Every size field present: a whole number (not a float, not a bool) between 1 and its limit.

    Nested configs (`text_config` and the like) are checked too: a size hidden one level down is
    built as surely as one at the top. None means "derive it" in transformers and is let through.
    """
    for field, limit, setting in _limits_by_field(limits):
        if field not in fields or fields[field] is None:
            continue
        value = fields[field]
        name = f"{where}.{field}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{name} must be a whole number (got {_shown(value)}); send it as an integer "
                            "such as 32, not 32.0, 1e30 or a string")
        if value < 1:
            raise SpecError(f"{name} must be at least 1 (got {_shown(value)}); sizes count layers, units or tokens")
        if value > limit:
            raised = f", or the operator raises {setting}" if setting else ""
            raise SpecError(f"{name} must be ≤ {limit:,} on this service (got {_shown(value)}); "
                            f"pick a smaller config{raised}")
    for key, child in fields.items():
        if isinstance(child, Mapping):
            check_sizes(child, limits, f"{where}.{key}")


def _first(fields: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    return next((fields[n] for n in names if fields.get(n) is not None), None)


def count_parameters(model_type: str, fields: Mapping[str, Any]) -> ModelShape:
    """Parameters of a decoder-only LM from its (size-checked, defaults-merged) config fields."""
    layers = _first(fields, LAYER_FIELDS) or 0
    hidden = _first(fields, ("hidden_size", "n_embd", "d_model")) or 0
    vocab = fields.get("vocab_size") or 0
    heads = _first(fields, ("num_attention_heads", "n_head", "num_heads")) or 1
    kv_heads = fields.get("num_key_value_heads") or heads
    head_dim = fields.get("head_dim") or max(hidden // heads, 1)
    gpt2_style = model_type in GPT2_STYLE
    intermediate = _first(fields, ("intermediate_size", "n_inner", "ffn_dim", "d_ff")) or 4 * hidden

    embeddings = vocab * hidden * (1 if fields.get("tie_word_embeddings", False) else 2)
    if gpt2_style:
        embeddings += (_first(fields, POSITION_FIELDS) or 0) * hidden
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = hidden * (q_width + 2 * kv_width) + q_width * hidden + (q_width + 2 * kv_width + hidden)
    experts = _first(fields, EXPERT_FIELDS)
    if experts:
        expert_width = fields.get("moe_intermediate_size") or intermediate
        shared_width = (fields.get("shared_expert_intermediate_size") or 0) + \
            (fields.get("n_shared_experts") or 0) * expert_width
        mlp = experts * 3 * hidden * expert_width + hidden * experts + 3 * hidden * shared_width + hidden
    elif gpt2_style:
        mlp = 2 * hidden * intermediate + intermediate + hidden
    else:
        mlp = 3 * hidden * intermediate
    norms = 4 * hidden  # up to two norms with weight and bias, or four without (Gemma 2)
    return ModelShape(parameters=embeddings + layers * (attention + mlp + norms) + 2 * hidden, layers=layers)


def check_model(model_type: str, fields: Mapping[str, Any], defaults: Mapping[str, Any], limits: ModelLimits,
                seq_len: int, micro_batch_limit: int | None, lora_rank: int | None = None) -> ModelShape:
    """Refuse (SpecError) a config whose sizes, parameter count or parameters × tokens exceed `limits`.

    `fields` are the request's; `defaults` the config class's values for what it leaves out.
    Tokens are seq_len × the largest micro-batch the search may try (max_micro_batch or what the
    effective batch needs, else the spec's bound).
    """
    check_sizes(fields, limits)
    merged = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    check_sizes(merged, limits)
    shape = count_parameters(model_type, merged)
    parameters = shape.parameters
    if lora_rank is not None:  # an adapter pair per projection: small next to the base, but counted
        parameters += shape.layers * 8 * lora_rank * (_first(merged, ("hidden_size", "n_embd", "d_model")) or 0)
    check_counted(parameters, limits, seq_len, micro_batch_limit)
    return ModelShape(parameters=parameters, layers=shape.layers)


def check_counted(parameters: int, limits: ModelLimits, seq_len: int, micro_batch_limit: int | None) -> None:
    """Refuse (SpecError) a parameter count, from the config or from the built module, beyond `limits`."""
    if parameters > limits.max_params:
        raise SpecError(f"model: about {parameters:,} parameters counted from the config, more than this "
                        f"service's limit of {limits.max_params:,} (FITPROBE_MAX_MODEL_PARAMS); pick a smaller "
                        "config (fewer layers, a smaller hidden size or fewer experts)")
    micro_batch = micro_batch_limit or MAX_MICRO_BATCH
    if parameters * seq_len * micro_batch > limits.max_param_tokens:
        raise SpecError(f"model: {parameters:,} parameters × {seq_len * micro_batch:,} tokens per micro-batch "
                        f"(seq_len {seq_len} × micro-batch up to {micro_batch:,}) is more than this service's "
                        f"limit of {limits.max_param_tokens:.0e} (FITPROBE_MAX_PARAM_TOKENS); set max_micro_batch "
                        "or effective_batch, lower seq_len, or pick a smaller model")


# An estimate decodes every token on fake tensors at ~35 ms per layer and token on a 2-core host (Llama-3.1-8B,
# 32 layers: ~1.1 s a token on a shared host), so its decode work per trial is bounded: layers × new tokens
# ≤ this (8B: 128 tokens, the default max_new_tokens).
ESTIMATE_LAYER_TOKENS = 4096


def check_decode_bound(spec: ProbeSpec, layers: int) -> None:
    """Refuse an estimated generation whose new tokens are past what `layers` layers let an estimate decode."""
    limit = max(ESTIMATE_LAYER_TOKENS // layers, 1)
    if spec.generate and spec.mode == "estimate" and spec.max_new_tokens > limit:
        raise SpecError(
            f"an estimated generation decodes every token on fake tensors, {layers} layers each: max_new_tokens "
            f"{spec.max_new_tokens} is past the {limit} this model's estimate runs (layers × tokens ≤ "
            f"{ESTIMATE_LAYER_TOKENS}); lower max_new_tokens, or measure the generation on the device")
