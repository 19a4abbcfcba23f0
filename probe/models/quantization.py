"""QLoRA as users load it: bitsandbytes 4-bit base weights, `prepare_model_for_kbit_training`, then LoRA.

The standard recipe is `from_pretrained(name, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))`,
then `peft.prepare_model_for_kbit_training(model)`, then `get_peft_model`. What that leaves in memory:
- every `nn.Linear` but the output embedding (transformers' `get_keys_to_not_convert`) as a `Linear4bit`
  holding packed 4-bit weights plus their block scales (double quantization quantizes those again);
- every other parameter in fp32: `prepare_model_for_kbit_training` upcasts all 16-bit parameters, so
  embeddings, norms and an untied `lm_head` cost 4 bytes per parameter, not 2;
- LoRA adapters in fp32; the 4-bit weights are dequantized to the compute dtype inside each matmul.

fitprobe makes the same modules with transformers' own `replace_with_bnb_linear` on the meta device and
quantizes random weights one layer at a time (nothing is downloaded, and no full-precision copy of the
model ever exists). Measured, the weights are real `Params4bit` quantized by bitsandbytes' kernels (its
CPU backend on a CPU host). Estimated, the same quantization runs under fake tensors: bitsandbytes
registers fake kernels for its ops, so packed weights and scales have their real shapes and dtypes.

`prepare_model_for_kbit_training` turns gradient checkpointing on unless told otherwise; fitprobe
follows the user's `gradient_checkpointing` setting and says so in the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fitprobe.probe.bnb import import_bitsandbytes
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.estimate.recompute import CHECKPOINT_KWARGS

if TYPE_CHECKING:
    import torch
    from torch import nn

BLOCKSIZE = 64  # bitsandbytes' 4-bit block on CUDA and CPU alike (Params4bit's default)


def compute_dtype(spec: ProbeSpec) -> torch.dtype:
    """bnb_4bit_compute_dtype as a recipe sets it for the user's precision (bitsandbytes' default is fp32)."""
    import torch

    return {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "fp16-mixed": torch.float16}.get(
        spec.precision, torch.float32)


def bnb_config_kwargs(spec: ProbeSpec) -> dict[str, Any]:
    """The BitsAndBytesConfig arguments the user loads with, as plain values (exports print them)."""
    if spec.quantization == "int8":
        return {"load_in_8bit": True}
    dtype = str(compute_dtype(spec)).removeprefix("torch.")
    return {"load_in_4bit": True, "bnb_4bit_quant_type": spec.quantization, "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype}


def replace_linears(module: nn.Module, spec: ProbeSpec) -> nn.Module:
    """Swap the linears for bitsandbytes' 4-bit ones, on the meta device, exactly as from_pretrained does."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    from transformers import PreTrainedModel

    import_bitsandbytes("quantization")
    if not isinstance(module, PreTrainedModel):
        raise SpecError("quantization works on Hugging Face models (preset:, hf: or an inline config), which "
                        "bitsandbytes' loaders quantize; drop quantization for builtin: and factory: models")
    if spec.quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantization,
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype(spec),
                                    bnb_4bit_quant_storage=torch.uint8)
    replace_with_bnb_linear(module, modules_to_not_convert=get_keys_to_not_convert(module),
                            quantization_config=config)
    # what from_pretrained marks (attributes the class does not declare); prepare_model_for_kbit_training reads it
    marks = {"is_loaded_in_8bit": spec.quantization == "int8", "is_loaded_in_4bit": spec.quantization != "int8",
             "hf_quantizer": None}
    for name, value in marks.items():
        setattr(module, name, value)
    return module


def is_quantized_layer(module: nn.Module) -> bool:
    bnb = import_bitsandbytes("quantization")
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_weight(layer: nn.Module, device: torch.device | str, fake: bool) -> torch.nn.Parameter:
    """A random weight for `layer`, quantized as from_pretrained quantizes a checkpoint's weight.

    The full-precision weight exists for one layer at a time, in the compute dtype, and dies here.
    Under fake tensors a `Params4bit` cannot wrap a fake tensor, so the packed data becomes a plain
    frozen parameter carrying the `quant_state` that `Linear4bit.forward` reads.
    """
    import torch

    bnb = import_bitsandbytes("quantization")
    # bitsandbytes ships no types: its layers' attributes (out_features, compute_dtype, the weight's quant
    # settings) are not the Tensor | Module that nn.Module's __getattr__ promises
    layer_: Any = layer
    old: Any = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        if fake:
            raise SpecError("estimate mode cannot run int8 (LLM.int8) layers: they split out outlier columns by "
                            "their values, which fake tensors do not have; estimate with nf4, or measure int8")
        value = torch.empty(layer_.out_features, layer_.in_features, device=device).normal_(std=0.02)
        kwargs = {key: item for key, item in old.__dict__.items() if key != "SCB"}
        return bnb.nn.Int8Params(value, requires_grad=False, **kwargs).to(device)
    value = torch.empty(layer_.out_features, layer_.in_features, dtype=layer_.compute_dtype or torch.float32,
                        device=device)
    if fake:
        packed, state = bnb.functional.quantize_4bit(value, blocksize=old.blocksize,
                                                     compress_statistics=old.compress_statistics,
                                                     quant_type=old.quant_type, quant_storage=old.quant_storage)
        weight: Any = torch.nn.Parameter(packed, requires_grad=False)
        weight.quant_state = state  # what Linear4bit.forward reads; Parameter does not declare it
        return weight
    value.normal_(std=0.02)
    return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(device)


def warm_up() -> None:
    """bitsandbytes builds its 8-bit code book (for double quantization) with data-dependent ops, which
    fake tensors cannot run: build it once for real, outside any mode (256 floats, then cached)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        import_bitsandbytes("quantization").functional.quantize_blockwise(torch.zeros(256))


def prepare_for_training(module: nn.Module, spec: ProbeSpec) -> nn.Module:
    """peft's `prepare_model_for_kbit_training`, with gradient checkpointing as the user set it."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(module, use_gradient_checkpointing=spec.gradient_checkpointing,
                                           gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)


def report_facts(spec: ProbeSpec) -> dict[str, Any] | None:
    """What the report says about quantization: the loading arguments and what fitprobe followed."""
    if spec.quantization == "none":
        return None
    method = "bitsandbytes LLM.int8" if spec.quantization == "int8" else "bitsandbytes 4-bit (QLoRA)"
    return {"method": method, "bits_and_bytes_config": bnb_config_kwargs(spec),
            "prepare_model_for_kbit_training": {"use_gradient_checkpointing": spec.gradient_checkpointing},
            "note": "non-quantized parameters (embeddings, norms, an untied lm_head) are fp32, as "
                    "prepare_model_for_kbit_training upcasts them; it turns gradient checkpointing on by default, "
                    f"fitprobe followed gradient_checkpointing={spec.gradient_checkpointing} (pass "
                    f"use_gradient_checkpointing={spec.gradient_checkpointing} to it to train what was measured)"}
