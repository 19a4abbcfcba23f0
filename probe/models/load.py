"""Turn a model reference into an `nn.Module` ready to train, with the user's memory settings applied.

References: `builtin:<name>` (plain torch), `preset:<name>` (shipped architecture configs, random
weights), `hf:` with a config.json, its directory or a Hub id (`org/name[@revision]`, config.json
only: see probe/models/hub.py) or an inline config dict, and `factory:pkg.mod:fn`, which is
imported only when the operator allow-listed it: a request must never make us run code it names.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fitprobe.probe.models.builtin_gpt import BUILTIN_CONFIGS, GPT, GPTConfig
from fitprobe.probe.models.hub import read_config
from fitprobe.probe.models.bounds import ModelLimits, check_model
from fitprobe.probe.model_call import hf_logits
from fitprobe.probe.models import quantization
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.models.quantization import QUANTIZED_BYTES_PER_PARAMETER
from fitprobe.probe.spec import ALL_LINEAR, ProbeSpec, SpecError, format_bytes
from fitprobe.probe.estimate.recompute import CHECKPOINT_KWARGS
from fitprobe.probe.trainers import adapt

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

# (module, input_ids, attention_mask, position_ids) -> logits
LogitsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass
class LoadedModel:
    """A module plus what the training step needs to know to feed it."""

    module: nn.Module
    vocab_size: int
    max_seq_len: int | None
    logits: LogitsFn


def _plain_logits(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    if position_ids is not None:  # ProbeSpec refuses flattened collation for these models before any trial
        raise SpecError("this model takes no position ids: use collation padded or packed")
    out = module(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


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


def _one_line(exc: Exception) -> str:
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
        raise SpecError(f"model: the Hugging Face config is not usable ({_one_line(exc)}); "
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


def _read_hf_reference(ref: str | dict[str, Any]) -> Any:
    return hf_config(*_hf_fields(ref))


def _allowed_factory(ref: str, allowed_factories: Collection[str]) -> str:
    target = ref.removeprefix("factory:")
    if target not in allowed_factories:
        raise SpecError(
            f"model: factory {target!r} is not allow-listed; the operator must add it to "
            "FITPROBE_ALLOWED_FACTORIES (comma-separated pkg.module:function)"
        )
    return target


def _resolve_factory(ref: str, allowed_factories: Collection[str]) -> Callable[[], nn.Module]:
    target = _allowed_factory(ref, allowed_factories)
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _construct(spec: ProbeSpec, allowed_factories: Collection[str]) -> tuple[Callable[[], nn.Module], LogitsFn]:
    """Return a zero-argument constructor, so the same model can be built on meta first to size it."""
    ref = spec.model
    if isinstance(ref, dict) or ref.startswith("hf:"):
        config = _read_hf_reference(ref)
        return _hf_constructor(config), hf_logits
    kind, _, name = ref.partition(":")
    if kind == "builtin":
        if name not in BUILTIN_CONFIGS:
            raise _unknown("builtin model", name, BUILTIN_CONFIGS)
        config = BUILTIN_CONFIGS[name]
        return (lambda: GPT(config)), _plain_logits
    if kind == "preset":
        if name not in PRESETS:
            raise _unknown("preset", name, PRESETS)
        model_type, fields = PRESETS[name]
        return _hf_constructor(hf_config(model_type, dict(fields))), hf_logits
    if kind == "factory":
        return _resolve_factory(ref, allowed_factories), _plain_logits
    raise _not_understood(ref)


def _not_understood(ref: str) -> SpecError:
    return SpecError(f"model: reference {ref!r} not understood; use builtin:<name>, preset:<name>, "
                     "hf:<config.json, its directory or org/name> or factory:pkg.module:function")


def _hf_constructor(config: Any) -> Callable[[], nn.Module]:
    from transformers import AutoModelForCausalLM

    def construct() -> nn.Module:
        # SDPA is the kernel people train with; eager holds B*H*T*T scores. Some architectures
        # (Gemma 2's logit soft-capping) only have eager, which is then what training uses too.
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError:
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager")

    return construct


def _vocab_and_context(module: nn.Module) -> tuple[int, int | None]:
    config = getattr(module, "config", None)
    if isinstance(config, GPTConfig):
        return config.vocab_size, config.block_size
    vocab = getattr(config, "vocab_size", None) or getattr(module, "vocab_size", None)
    if vocab is None:
        raise SpecError("the model must expose vocab_size (or config.vocab_size) so fitprobe can build batches")
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(vocab), context


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, counting tied tensors once."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _apply_lora(module: nn.Module, spec: ProbeSpec) -> nn.Module:
    try:
        from peft import get_peft_model
    except ImportError as exc:
        raise SpecError("finetuning=lora needs peft: pip install 'fitprobe[hf]'") from exc
    targets = spec.lora.targets
    if targets == [ALL_LINEAR]:  # PEFT finds the linear layers itself (transformers models only)
        from transformers import PreTrainedModel  # peft needs it, so it is there

        if not isinstance(module, PreTrainedModel):
            raise SpecError(f"lora.targets: {ALL_LINEAR} is PEFT's value for transformers models; name this "
                            "model's modules instead")
        return get_peft_model(module, _lora_config(spec, module, ALL_LINEAR))
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    if targets is None:
        targets = next((t for t in DEFAULT_LORA_TARGETS if set(t) <= leaf_names), None)
        if targets is None:
            raise SpecError("no default LoRA targets in this model; name them in lora.targets (--lora-targets)")
    missing = sorted(set(targets) - leaf_names)
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise SpecError(
            f"LoRA targets {missing} are not modules of this model; pick from {linear_names}"
        )
    return get_peft_model(module, _lora_config(spec, module, list(targets)))


def _lora_config(spec: ProbeSpec, module: nn.Module, targets: list[str] | str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, target_modules=targets, lora_dropout=0.0,
                      fan_in_fan_out=type(module).__name__.startswith("GPT2"))


def _enable_checkpointing(module: nn.Module) -> None:
    enable = getattr(module, "gradient_checkpointing_enable", None)  # transformers' models have it
    if isinstance(module, GPT):
        module.gradient_checkpointing = True
    elif enable is not None:
        enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        raise SpecError("this model has no gradient checkpointing support; drop gradient_checkpointing")


def weight_dtype(spec: ProbeSpec) -> torch.dtype:
    """The dtype the weights are stored in.

    Mixed precision keeps fp32 master weights for what is trained; a LoRA base is frozen, so it is
    stored in the 16-bit compute dtype as LoRA recipes load it (peft keeps the adapters in fp32).
    """
    if spec.quantization != "none":
        return torch.float32  # prepare_model_for_kbit_training upcasts every parameter it does not quantize
    if spec.precision == "bf16" or (spec.finetuning == "lora" and spec.precision == "bf16-mixed"):
        return torch.bfloat16
    if spec.finetuning == "lora" and spec.precision == "fp16-mixed":
        return torch.float16
    return torch.float32


def is_hugging_face(model: str | dict[str, Any]) -> bool:
    """A transformers model (preset:, hf:, an inline config), not fitprobe's builtin: or an operator's factory:
    model: only these take bitsandbytes' quantization, TRL's trainer and Liger's kernels."""
    return not (isinstance(model, str) and model.startswith(("builtin:", "factory:")))


def stored_weight_bytes(spec: ProbeSpec, parameters: int) -> int:
    """Bytes the weights take at least, as the spec stores them: a quantized model's every weight at 4 bits
    (a lower bound: only linears are quantized), so a model that fits is never refused for its weights."""
    if spec.quantization != "none":
        return int(parameters * QUANTIZED_BYTES_PER_PARAMETER[spec.quantization])
    return parameters * weight_dtype(spec).itemsize


def _lighter_weights(spec: ProbeSpec, parameters: int, capacity_bytes: int) -> str:
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


def _built_on_meta(constructor: Callable[[], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            return constructor()
    except SpecError:
        raise
    except Exception as exc:  # a config's values (zero heads, a string size) fail anywhere
        raise SpecError(f"model: building it failed ({_one_line(exc)}); check the config's sizes") from exc


def _sized(spec: ProbeSpec, allowed_factories: Collection[str], capacity_bytes: int | None
           ) -> tuple[Callable[[], nn.Module], LogitsFn, int, int | None]:
    """The model's constructor, built once on the meta device (no memory) to check it can be run.

    Refuses a model whose weights alone exceed `capacity_bytes`, or a seq_len beyond its context,
    before anything is allocated. Returns the constructor, its logits function, vocab and context.
    """
    constructor, logits_fn = _construct(spec, allowed_factories)
    sized = _built_on_meta(constructor)
    vocab_size, context = _vocab_and_context(sized)
    parameters = parameter_bytes(sized) // 4  # meta modules are built in fp32
    weight_bytes = stored_weight_bytes(spec, parameters)
    del sized
    if capacity_bytes is not None and weight_bytes >= capacity_bytes:
        raise SpecError(
            f"capacity_bytes: capacity {format_bytes(capacity_bytes)} is smaller than the model's weights alone "
            f"({format_bytes(weight_bytes)}); {_lighter_weights(spec, parameters, capacity_bytes)}raise the capacity "
            "or pick a smaller model"
        )
    check_seq_len(spec.seq_len, context)
    return constructor, logits_fn, vocab_size, context


def counted_on_meta(spec: ProbeSpec) -> tuple[int, int | None]:
    """(parameters, context) of the model exactly as the job builds it, built on the meta device.

    Arithmetic on a config reads only the fields it knows (a bart `decoder_layers`, a mamba `expand` or a
    nested `text_config` escape it); the built module has every parameter, whatever its config calls them.
    Building costs time in the layer count, so the service runs this in a process it can kill
    (app/sizer.py). Factories are not built here: the operator vouched for them.
    """
    module = _built_on_meta(_construct(spec, ())[0])
    parameters = sum({id(p): p.numel() for p in module.parameters()}.values())  # tied tensors once
    config = getattr(module, "config", None)
    if isinstance(config, GPTConfig):
        return parameters, config.block_size
    # a multimodal model's context is its language model's
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return parameters, getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)


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
        _allowed_factory(spec.model, allowed_factories)  # imported and built only in the job
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
            f"{_lighter_weights(spec, shape.parameters, capacity_bytes)}raise the capacity or pick a smaller model"
        )
    check_seq_len(spec.seq_len, context)
    _check_lora_targets(spec, model_type)
    return context


def _build_plain(constructor: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy first, and fake weights can't be cast
    try:
        with torch.device(device):
            module = constructor()
    finally:
        torch.set_default_dtype(previous_dtype)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype=dtype)
    return module


def _build_quantized(constructor: Callable[[], nn.Module], spec: ProbeSpec, device: torch.device | str) -> nn.Module:
    """QLoRA's base (probe/models/quantization.py): 4-bit linears made on meta, then one layer at a time on `device`.

    On the meta device (estimate mode) the weights stay meta here; the estimate meter quantizes them under
    fake tensors when it materializes the model.
    """
    with torch.device("meta"):
        module = constructor()
    quantization.replace_linears(module, spec)
    if torch.device(device).type != "meta":
        _materialize(module, device)
    return quantization.prepare_for_training(module, spec)


def _materialize(module: nn.Module, device: torch.device | str) -> None:
    """Real weights for a meta-built quantized model: 4-bit linears quantized from random values, every other
    tensor allocated and initialized by the model's own `_init_weights` (which also computes rotary tables)."""
    for owner in module.modules():
        quantized = quantization.is_quantized_layer(owner)
        # parameters and buffers alike: a slot takes a Parameter or a Tensor
        stores: tuple[dict[str, Any], ...] = (owner._parameters, owner._buffers)
        for store in stores:
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if quantized and name == "weight":
                    store[name] = quantization.quantized_weight(owner, device, fake=False)
                    continue
                real = torch.zeros_like(tensor, device=device)
                is_parameter = store is owner._parameters
                store[name] = nn.Parameter(real, requires_grad=tensor.requires_grad) if is_parameter else real
        init_weights = getattr(module, "_init_weights", None)  # transformers' own initialization
        if not quantized and init_weights is not None:
            init_weights(owner)
    tie_weights = getattr(module, "tie_weights", None)
    if tie_weights is not None:
        tie_weights()


def build_model(
    spec: ProbeSpec,
    device: torch.device | str,
    allowed_factories: Collection[str] = (),
    capacity_bytes: int | None = None,
) -> LoadedModel:
    """Build the model on `device` with the spec's precision, LoRA and checkpointing applied.

    The model is first built on the meta device (no memory) so a model that cannot fit in
    `capacity_bytes` is refused with a message before anything is allocated.
    """
    constructor, logits_fn, vocab_size, context = _sized(spec, allowed_factories, capacity_bytes)
    if spec.quantization != "none":
        module = _build_quantized(constructor, spec, device)
    else:
        module = _build_plain(constructor, weight_dtype(spec), device)
        if spec.gradient_checkpointing:
            _enable_checkpointing(module)
    if spec.finetuning == "lora":
        module = _apply_lora(module, spec)
    module.train()
    if spec.trainer != "hf" or spec.liger:  # the trainer's own patches (probe/trainers.py)
        adapt(module, spec)
    return LoadedModel(module=module, vocab_size=vocab_size, max_seq_len=context, logits=logits_fn)
