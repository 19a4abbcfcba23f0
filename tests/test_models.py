"""Model references resolve to trainable modules, and nothing a request names is imported unasked."""

from __future__ import annotations

import pytest
import torch

from fitprobe.probe.models.load import build_model, parameter_bytes
from fitprobe.probe.models.reference import check_reference
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.spec import ProbeSpec, SpecError, format_bytes


@pytest.mark.parametrize("name,parameters_millions", [("gpt2", 124), ("gpt2-medium", 355),
                                                      ("llama-3.2-1b", 1236), ("qwen2.5-0.5b", 494)])
def test_presets_have_the_published_parameter_counts(name, parameters_millions):
    model = build_model(ProbeSpec(precision="fp32", model=f"preset:{name}", seq_len=128), "meta")
    count = sum(p.numel() for p in model.module.parameters())
    assert count / 1e6 == pytest.approx(parameters_millions, rel=0.01)


def test_every_preset_builds():
    for name in PRESETS:
        assert build_model(ProbeSpec(precision="fp32", model=f"preset:{name}", seq_len=128), "meta").vocab_size > 0


def test_inline_hf_config_builds_and_trains_a_step():
    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    model = build_model(ProbeSpec(precision="fp32", model=config, seq_len=16), "cpu")
    logits = model.logits(model.module, torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    assert logits.shape == (2, 16, 256)


def test_lora_trains_only_the_adapters():
    model = build_model(ProbeSpec(precision="fp32", model="builtin:gpt-tiny", finetuning="lora"), "cpu")
    trainable = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_pure_bf16_halves_the_weights():
    fp32 = build_model(ProbeSpec(precision="fp32", model="builtin:gpt-tiny"), "cpu")
    bf16 = build_model(ProbeSpec(model="builtin:gpt-tiny", precision="bf16"), "cpu")
    assert parameter_bytes(bf16.module) * 2 == parameter_bytes(fp32.module)


def test_factory_runs_only_when_allow_listed():
    spec = ProbeSpec(precision="fp32", model="factory:tests.factories:tiny_mlp_lm")
    with pytest.raises(SpecError, match="not allow-listed"):
        build_model(spec, "cpu")
    model = build_model(spec, "cpu", allowed_factories={"tests.factories:tiny_mlp_lm"})
    assert model.vocab_size == 64


def test_seq_len_beyond_the_models_context_is_refused():
    with pytest.raises(SpecError, match="exceeds this model's context of 1024"):
        build_model(ProbeSpec(precision="fp32", model="preset:gpt2", seq_len=2048), "meta")


@pytest.mark.parametrize("model,message", [
    ("preset:lama-3.2-1b", "unknown preset 'lama-3.2-1b'; did you mean 'llama-3.2-1b'?"),
    ("builtin:gpt-nan", "unknown builtin model 'gpt-nan'; did you mean 'gpt-nano'?"),
    ("builtin:nope", "choose one of: gpt-nano"),
    ({"model_type": "lama", "hidden_size": 64}, "unknown model_type 'lama'; did you mean 'llama'?"),
    ({"model_type": "zzqqxx"}, "check the spelling"),
    ({"model_type": "llama", "num_attention_heads": 0}, "model.num_attention_heads must be at least 1 (got 0)"),
    ("factory:os:system", "not allow-listed"),
])
def test_check_reference_refuses_unknown_names_with_the_nearest_one(model, message):
    with pytest.raises(SpecError) as refused:
        check_reference(ProbeSpec(precision="fp32", model=model, seq_len=32))
    assert message in str(refused.value) and str(refused.value).startswith("model")
    assert len(str(refused.value)) < 400  # the nearest name, never the 800 model types transformers knows


def test_check_reference_counts_the_weights_from_the_config_against_the_capacity():
    with pytest.raises(SpecError, match=r"capacity_bytes: capacity 1.0GiB is smaller than the model's weights alone"):
        check_reference(ProbeSpec(precision="fp32", model="preset:llama-3.1-8b", seq_len=32), capacity_bytes=1 << 30)
    check_reference(ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=32), capacity_bytes=16 << 20)


def test_weights_past_the_capacity_are_refused_with_the_settings_that_would_make_room():
    from transformers import AutoConfig, AutoModelForCausalLM

    from fitprobe.probe.models.presets import PRESETS

    model_type, fields = PRESETS["llama-3.1-8b"]
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **fields)).parameters())
    capacity = 20 << 30  # fp32 master weights (4 bytes a parameter) do not fit; a 16-bit base (2 bytes) does
    assert parameters * 2 < capacity < parameters * 4
    with pytest.raises(SpecError) as refused:
        check_reference(ProbeSpec(model="preset:llama-3.1-8b", seq_len=32, precision="bf16-mixed"),
                        capacity_bytes=capacity)
    message = str(refused.value)
    assert f"--lora --precision bf16-mixed (the frozen base in 16 bits): at least {format_bytes(parameters * 2)}" in message
    assert "--lora --quantization nf4 (QLoRA)" in message
    # fp32 weights, fp32 gradients and two fp32 AdamW moments: 16 bytes a parameter, over the devices, one spare
    devices = -(-parameters * 16 // capacity) + 1
    assert f"--sharding fsdp --devices {devices}:" in message
