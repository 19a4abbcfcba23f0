"""A model reference read and checked without building it: names, configs, sizes, LoRA targets, weights.

The door of every entry point (HTTP submit, the CLI) asks this module, and so does the job before it builds
(probe/models/load.py). Nothing here imports torch: the service's process checks references with it, and
transformers is imported only where a Hugging Face config is read.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Collection
from dataclasses import asdict
from typing import Any, Literal

from fitprobe.probe.models.builtin_config import BUILTIN_CONFIGS, GPTConfig
from fitprobe.probe.models.hub import read_config
from fitprobe.probe.models.bounds import ModelLimits, check_model
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.spec import ALL_LINEAR, ProbeSpec, SpecError, format_bytes

MAX_INLINE_CONFIG_BYTES = 64 * 1024
MAX_LISTED_NAMES = 12  # an unknown name lists the valid ones only when they are this few

# Attention projections LoRA adapts by default, by the names each architecture family uses.
DEFAULT_LORA_TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj"], ["qkv_proj", "o_proj"], ["c_attn"],
                        ["query", "value"])
# Module names (the last part of each dotted name) of the families fitprobe ships, so the door can
# check LoRA targets without building the model; tests/test_model_bounds.py compares them with a
# built model. Other families' targets are checked by the job, first thing, before any trial.
_LLAMA_NAMES = ("act_fn", "down_proj", "embed_tokens", "gate_proj", "input_layernorm", "k_proj", "layers",
                "lm_head", "mlp", "model", "norm", "o_proj", "post_attention_layernorm", "q_proj", "rotary_emb",
                "self_attn", "up_proj", "v_proj")
MODULE_NAMES: dict[str, frozenset[str]] = {
    "llama": frozenset(_LLAMA_NAMES),
    "mistral": frozenset(_LLAMA_NAMES),
    "qwen2": frozenset(_LLAMA_NAMES),
    "qwen3": frozenset(_LLAMA_NAMES + ("k_norm", "q_norm")),
    "gemma2": frozenset(_LLAMA_NAMES + ("post_feedforward_layernorm", "pre_feedforward_layernorm")),
    "gemma3_text": frozenset(_LLAMA_NAMES + ("k_norm", "post_feedforward_layernorm", "pre_feedforward_layernorm",
                                             "q_norm")),
    "qwen2_moe": frozenset(_LLAMA_NAMES + ("experts", "gate", "shared_expert", "shared_expert_gate")),
    # the experts are one fused module (no per-expert gate_proj/up_proj/down_proj) and no layer is dense
    "qwen3_moe": frozenset(set(_LLAMA_NAMES) - {"down_proj", "gate_proj", "up_proj"}
                           | {"experts", "gate", "k_norm", "q_norm"}),
    "mixtral": frozenset({"act_fn", "embed_tokens", "experts", "gate", "input_layernorm", "k_proj", "layers",
                          "lm_head", "mlp", "model", "norm", "o_proj", "post_attention_layernorm", "q_proj",
                          "rotary_emb", "self_attn", "v_proj"}),
    "phi3": frozenset({"activation_fn", "down_proj", "embed_tokens", "gate_up_proj", "input_layernorm", "layers",
                       "lm_head", "mlp", "model", "norm", "o_proj", "post_attention_layernorm", "qkv_proj",
                       "resid_attn_dropout", "resid_mlp_dropout", "rotary_emb", "self_attn"}),
    "gpt2": frozenset({"act", "attn", "attn_dropout", "c_attn", "c_fc", "c_proj", "drop", "dropout", "h",
                       "lm_head", "ln_1", "ln_2", "ln_f", "mlp", "resid_dropout", "transformer", "wpe", "wte"}),
    "builtin": frozenset({"attn", "blocks", "c_attn", "c_fc", "c_proj", "lm_head", "ln_1", "ln_2", "ln_f", "mlp",
                          "wpe", "wte"}),
}


# bytes per parameter a quantized weight takes at least: 4 bits (scales come on top)
QUANTIZED_BYTES_PER_PARAMETER = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}
# bytes per weight of each dtype `weight_dtype` names
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _unknown(what: str, name: str, names: Collection[str]) -> SpecError:
    """'unknown preset 'lama-3.2-1b'; did you mean 'llama-3.2-1b'?': the nearest name, never 800 of them."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    message = f"model: unknown {what} {name!r}"
    if close:
        message += f"; did you mean {close[0]!r}?"
    if len(names) <= MAX_LISTED_NAMES:
        return SpecError(f"{message} (choose one of: {', '.join(names)})" if close else
                         f"{message}; choose one of: {', '.join(names)}")
    return SpecError(message if close else f"{message} ({len(names)} are known; check the spelling)")


def one_line(exc: Exception) -> str:
    """An exception from a config's own validation, as one short line of the message that names it."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _check_model_type(model_type: str) -> None:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise _unknown("model_type", model_type, CONFIG_MAPPING.keys())


def hf_config(model_type: str, fields: dict[str, Any]) -> Any:
    """The transformers config of `model_type` with `fields`, as `from_config` builds from it; refusals are SpecErrors
    that name the fix (a missing transformers, an unknown model_type, fields the config rejects).

    Public because the estimate's cuts (probe/estimate/extrapolate.py) read the layer count and layer types
    off the very config the full model is built from.
    """
    try:
        from transformers import AutoConfig
    except ImportError as exc:  # the hf extra is optional
        raise SpecError("preset: and hf: models need transformers: pip install 'fitprobe[hf]'") from exc
    _check_model_type(model_type)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # configs validate (or divide by a zero) in their own ways
        raise SpecError(f"model: the Hugging Face config is not usable ({one_line(exc)}); "
                        "check model_type and fields") from exc


def _hf_fields(ref: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An inline config dict, or hf:<config.json, its directory or a Hub id> -> (model_type, fields)."""
    if isinstance(ref, dict):
        if len(json.dumps(ref)) > MAX_INLINE_CONFIG_BYTES:
            raise SpecError(f"inline model config must be under {MAX_INLINE_CONFIG_BYTES} bytes")
        fields = dict(ref)
    else:
        fields = read_config(ref.removeprefix("hf:"))
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise SpecError("model: a Hugging Face config needs a model_type field (e.g. 'llama', 'gpt2')")
    fields.pop("architectures", None)
    return model_type, fields


def allowed_factory(ref: str, allowed_factories: Collection[str]) -> str:
    target = ref.removeprefix("factory:")
    if target not in allowed_factories:
        raise SpecError(
            f"model: factory {target!r} is not allow-listed; the operator must add it to "
            "FITPROBE_ALLOWED_FACTORIES (comma-separated pkg.module:function)"
        )
    return target


def _not_understood(ref: str) -> SpecError:
    return SpecError(f"model: reference {ref!r} not understood; use builtin:<name>, preset:<name>, "
                     "hf:<config.json, its directory or org/name> or factory:pkg.module:function")


def model_config(ref: str | dict[str, Any]) -> GPTConfig | Any:
    """The config a builtin, preset or hf reference builds from: a builtin's `GPTConfig`, or the transformers
    config `from_config` builds from; unknown names refused with the nearest one."""
    if isinstance(ref, dict) or ref.startswith("hf:"):
        return hf_config(*_hf_fields(ref))
    kind, _, name = ref.partition(":")
    if kind == "builtin":
        if name not in BUILTIN_CONFIGS:
            raise _unknown("builtin model", name, BUILTIN_CONFIGS)
        return BUILTIN_CONFIGS[name]
    if kind == "preset":
        if name not in PRESETS:
            raise _unknown("preset", name, PRESETS)
        model_type, fields = PRESETS[name]
        return hf_config(model_type, dict(fields))
    raise _not_understood(ref)


def weight_dtype(spec: ProbeSpec) -> Literal["float32", "bfloat16", "float16"]:
    """The dtype the weights are stored in, by torch's name for it (probe/models/load.py builds in it).

    Mixed precision keeps fp32 master weights for what is trained; a LoRA base is frozen, so it is
    stored in the 16-bit compute dtype as LoRA recipes load it (peft keeps the adapters in fp32).
    """
    if spec.quantization != "none":
        return "float32"  # prepare_model_for_kbit_training upcasts every parameter it does not quantize
    if spec.precision == "bf16" or (spec.finetuning == "lora" and spec.precision == "bf16-mixed"):
        return "bfloat16"
    if spec.finetuning == "lora" and spec.precision == "fp16-mixed":
        return "float16"
    return "float32"


def is_hugging_face(model: str | dict[str, Any]) -> bool:
    """A transformers model (preset:, hf:, an inline config), not fitprobe's builtin: or an operator's factory:
    model: only these take bitsandbytes' quantization, TRL's trainer and Liger's kernels."""
    return not (isinstance(model, str) and model.startswith(("builtin:", "factory:")))


def stored_weight_bytes(spec: ProbeSpec, parameters: int) -> int:
    """Bytes the weights take at least, as the spec stores them: a quantized model's every weight at 4 bits
    (a lower bound: only linears are quantized), so a model that fits is never refused for its weights."""
    if spec.quantization != "none":
        return int(parameters * QUANTIZED_BYTES_PER_PARAMETER[spec.quantization])
    return parameters * DTYPE_BYTES[weight_dtype(spec)]


def lighter_weights(spec: ProbeSpec, parameters: int, capacity_bytes: int) -> str:
    """What would make room, as options to write: the settings under which the weights take less than the
    capacity, and the devices over which sharded weights, gradients and AdamW state would (the step still has
    to fit: probe with them to know)."""
    options = []
    if spec.finetuning == "full" and spec.precision != "bf16":
        options.append(("--lora --precision bf16-mixed (the frozen base in 16 bits)", parameters * 2))
    if spec.quantization == "none":
        options.append(("--lora --quantization nf4 (QLoRA)", int(parameters * QUANTIZED_BYTES_PER_PARAMETER["nf4"])))
    words = [f"{flag}: at least {format_bytes(size)}" for flag, size in options if size < capacity_bytes]
    text = f"with {'; with '.join(words)}; " if words else ""
    if spec.sharding == "none" and spec.quantization == "none":
        state_bytes = stored_weight_bytes(spec, parameters) + parameters * (4 + 8)  # + fp32 gradients, AdamW state
        devices = -(-state_bytes // capacity_bytes) + 1  # and room for the activations
        text += (f"or --sharding fsdp --devices {devices}: weights, gradients and AdamW state "
                 f"{format_bytes(state_bytes // devices)} per device, before activations; ")
    return text


def check_seq_len(seq_len: int, context: int | None) -> None:
    """Refuse a seq_len beyond the model's context (its position table): such a step cannot run at all."""
    if context is not None and seq_len > context:
        raise SpecError(f"seq_len {seq_len} exceeds this model's context of {context} tokens; lower seq_len")


@functools.cache
def config_defaults(model_type: str) -> dict[str, Any]:
    """The config class's own values for the fields a request leaves out (its defaults: a bounded build)."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # noqa: BLE001 - a config class without usable defaults: the request's fields alone count
        return {}


def reference_fields(ref: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model_type, config fields) of a builtin, preset or hf reference; unknown names refused here.

    Public because the estimate asks it before building anything: whether the family was verified for
    extrapolation, and the fields the cut models are specified with (probe/estimate/extrapolate.py).
    """
    if isinstance(ref, dict) or ref.startswith("hf:"):
        model_type, fields = _hf_fields(ref)
        _check_model_type(model_type)
        return model_type, fields
    kind, _, name = ref.partition(":")
    if kind == "builtin":
        if name not in BUILTIN_CONFIGS:
            raise _unknown("builtin model", name, BUILTIN_CONFIGS)
        config = asdict(BUILTIN_CONFIGS[name])
        return "builtin", {**config, "n_positions": config.pop("block_size"), "tie_word_embeddings": True}
    if kind == "preset":
        if name not in PRESETS:
            raise _unknown("preset", name, PRESETS)
        model_type, fields = PRESETS[name]
        return model_type, dict(fields)
    raise _not_understood(ref)


def _check_lora_targets(spec: ProbeSpec, model_type: str) -> None:
    names = MODULE_NAMES.get(model_type)
    if spec.finetuning != "lora" or names is None:
        return
    targets = spec.lora.targets
    if targets is None:
        if not any(set(default) <= names for default in DEFAULT_LORA_TARGETS):
            raise SpecError("lora.targets: no default LoRA targets in this model; name them in lora.targets "
                            f"(--lora-targets), from {sorted(names)}")
        return
    if targets == [ALL_LINEAR]:
        if model_type == "builtin":
            raise SpecError(f"lora.targets: {ALL_LINEAR} is PEFT's value for transformers models; name the "
                            f"builtin model's modules instead, from {sorted(names)}")
        return
    missing = sorted(set(targets) - names)
    if missing:
        raise SpecError(f"lora.targets: {missing} are not modules of this model ({model_type}); "
                        f"pick from {sorted(names)}")


def check_reference(spec: ProbeSpec, allowed_factories: Collection[str] = (),
                    capacity_bytes: int | None = None, limits: ModelLimits = ModelLimits(),
                    read_config: bool = True) -> int | None:
    """Raise SpecError now for a request that would only fail later, inside its job. Builds nothing.
    Returns the model's context as its config states it (None: unknown, or a factory's).

    The door check of every entry point (HTTP submit, the CLI): names are checked against the
    builtins, presets and transformers' model types (with the nearest name as a suggestion), a
    factory against the allow-list, and the config's sizes against `limits` by arithmetic
    (probe/models/bounds.py) before transformers reads it. The weights, counted from the config, are
    checked against the capacity; the job counts them exactly on the meta device in its own process.

    `read_config=False` leaves the config's constructor to a process the caller can kill (the service's
    sizer, app/sizer.py): a constructor runs loops no size limit names (cohere2_moe's
    `first_k_dense_replace`, mellum's `num_mtp_layers`), seconds to minutes per request in the server.
    """
    if spec.quantization != "none" and not is_hugging_face(spec.model):
        raise SpecError("quantization works on Hugging Face models (preset:, hf: or an inline config), which "
                        "bitsandbytes' loaders quantize; drop quantization for builtin: and factory: models")
    if isinstance(spec.model, str) and spec.model.startswith("factory:"):
        allowed_factory(spec.model, allowed_factories)  # imported and built only in the job
        return None
    model_type, fields = reference_fields(spec.model)
    defaults = {} if model_type == "builtin" else config_defaults(model_type)
    lora_rank = spec.lora.rank if spec.finetuning == "lora" else None
    shape = check_model(model_type, fields, defaults, limits, spec.seq_len, spec.micro_batch_limit, lora_rank)
    context = fields.get("n_positions")
    if model_type != "builtin" and not read_config:
        _check_model_type(model_type)
    elif model_type != "builtin":
        config = hf_config(model_type, fields)  # bounded now: every size it reads is checked
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    weight_bytes = stored_weight_bytes(spec, shape.parameters)
    if capacity_bytes is not None and weight_bytes >= capacity_bytes:
        raise SpecError(
            f"capacity_bytes: capacity {format_bytes(capacity_bytes)} is smaller than the model's weights alone "
            f"(about {format_bytes(weight_bytes)}, counted from its config); "
            f"{lighter_weights(spec, shape.parameters, capacity_bytes)}raise the capacity or pick a smaller model"
        )
    check_seq_len(spec.seq_len, context)
    _check_lora_targets(spec, model_type)
    return context


def configured_layers(spec: ProbeSpec) -> int | None:
    """The layer count the model's config names (presets, builtins, inline and hf: configs), before anything is
    built: what the door bounds an estimated generation by. None where the config names none it knows (the
    job's own check, on the built model, still holds)."""
    try:
        _, fields = reference_fields(spec.model)
    except SpecError:
        return None
    nested = fields.get("text_config")
    text = nested if isinstance(nested, dict) else fields
    layers = text.get("num_hidden_layers", text.get("n_layer"))
    return layers if isinstance(layers, int) and layers > 0 else None
