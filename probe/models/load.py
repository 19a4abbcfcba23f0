"""Turn a model reference into an `nn.Module` ready to train, with the user's memory settings applied.

References: `builtin:<name>` (plain torch), `preset:<name>` (shipped architecture configs, random
weights), `hf:` with a config.json, its directory or a Hub id (`org/name[@revision]`, config.json
only: see probe/models/hub.py) or an inline config dict, and `factory:pkg.mod:fn`, which is
imported only when the operator allow-listed it: a request must never make us run code it names.
Reading and checking a reference without building it is probe/models/reference.py's job.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fitprobe.probe.models.builtin_config import GPTConfig
from fitprobe.probe.models.builtin_gpt import GPT
from fitprobe.probe.model_call import hf_logits
from fitprobe.probe.models import quantization
from fitprobe.probe.models.reference import (DEFAULT_LORA_TARGETS, allowed_factory, check_seq_len, lighter_weights,
                                             model_config, one_line, stored_weight_bytes, weight_dtype)
from fitprobe.probe.spec import ALL_LINEAR, ProbeSpec, SpecError, format_bytes
from fitprobe.probe.estimate.recompute import CHECKPOINT_KWARGS
from fitprobe.probe.trainers import adapt

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


def _resolve_factory(ref: str, allowed_factories: Collection[str]) -> Callable[[], nn.Module]:
    target = allowed_factory(ref, allowed_factories)
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _construct(spec: ProbeSpec, allowed_factories: Collection[str]) -> tuple[Callable[[], nn.Module], LogitsFn]:
    """Return a zero-argument constructor, so the same model can be built on meta first to size it."""
    ref = spec.model
    if isinstance(ref, str) and ref.partition(":")[0] == "factory":
        return _resolve_factory(ref, allowed_factories), _plain_logits
    config = model_config(ref)
    if isinstance(config, GPTConfig):
        return (lambda: GPT(config)), _plain_logits
    return _hf_constructor(config), hf_logits


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


def _built_on_meta(constructor: Callable[[], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            return constructor()
    except SpecError:
        raise
    except Exception as exc:  # a config's values (zero heads, a string size) fail anywhere
        raise SpecError(f"model: building it failed ({one_line(exc)}); check the config's sizes") from exc


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
            f"({format_bytes(weight_bytes)}); {lighter_weights(spec, parameters, capacity_bytes)}raise the capacity "
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
        module = _build_plain(constructor, getattr(torch, weight_dtype(spec)), device)
        if spec.gradient_checkpointing:
            _enable_checkpointing(module)
    if spec.finetuning == "lora":
        module = _apply_lora(module, spec)
    module.train()
    if spec.trainer != "hf" or spec.liger:  # the trainer's own patches (probe/trainers.py)
        adapt(module, spec)
    return LoadedModel(module=module, vocab_size=vocab_size, max_seq_len=context, logits=logits_fn)
