"""The door's model bounds: arithmetic on the config, checked against hand counts and every preset."""

from __future__ import annotations

import pytest

from fitprobe.probe.models.bounds import ModelLimits, check_model, count_parameters
from fitprobe.probe.models.reference import MODULE_NAMES, check_reference, config_defaults
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.spec import ProbeSpec, SpecError

GPT2 = PRESETS["gpt2"][1]
LLAMA_1B = PRESETS["llama-3.2-1b"][1]


def test_gpt2_counts_its_published_124_439_808_parameters_exactly():
    # hand count: wte 50257×768 + wpe 1024×768 + 12 × (c_attn 768×2304+2304, c_proj 768×768+768,
    # c_fc 768×3072+3072, c_proj 3072×768+768, two LayerNorms 4×768) + ln_f 2×768, the head tied
    fields = {**config_defaults("gpt2"), **GPT2}
    assert count_parameters("gpt2", fields).parameters == 124_439_808


def test_llama_3_2_1b_count_is_an_upper_bound_within_a_few_percent_of_the_published_one():
    # 1,235,814,400 as built: the count adds q/k/v/o biases and four norm vectors per layer it lacks
    counted = count_parameters("llama", {**config_defaults("llama"), **LLAMA_1B}).parameters
    assert 1_235_814_400 <= counted <= 1_235_814_400 * 1.02


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_passes_the_default_bounds_at_the_longest_service_seq_len(name):
    check_reference(ProbeSpec(precision="fp32", model=f"preset:{name}", seq_len=min(32_768, _context(name)),
                              effective_batch=65_536))


def _context(name: str) -> int:
    fields = PRESETS[name][1]
    return fields.get("max_position_embeddings") or fields.get("n_positions")


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_hidden_layers": 1e30}, "model.num_hidden_layers must be a whole number (got 1e+30)"),
    ({"num_hidden_layers": 10**9}, "model.num_hidden_layers must be ≤ 1,024 on this service (got 1000000000)"),
    ({"num_hidden_layers": -5}, "model.num_hidden_layers must be at least 1 (got -5)"),
    ({"num_hidden_layers": True}, "must be a whole number"),
    ({"hidden_size": "4096"}, "model.hidden_size must be a whole number"),
    ({"vocab_size": 10**9}, "model.vocab_size must be ≤ 1,048,576"),
    ({"hidden_size": 1_048_576}, "model.hidden_size must be ≤ 65,536"),
    ({"num_local_experts": 20_000}, "model.num_local_experts must be ≤ 1,024"),
    ({"intermediate_size": 10**4000}, "got a 13288-bit number"),
    ({"text_config": {"num_hidden_layers": 0}}, "model.text_config.num_hidden_layers must be at least 1"),
])
def test_a_size_that_is_not_a_whole_number_in_range_is_refused_naming_field_limit_and_value(fields, message):
    with pytest.raises(SpecError, match=r"^model") as refused:
        check_model("llama", {**LLAMA_1B, **fields}, {}, ModelLimits(), seq_len=128, micro_batch_limit=8)
    assert message in str(refused.value)
    assert len(str(refused.value)) < 300


def test_parameters_and_parameters_times_tokens_have_limits_the_operator_can_set():
    small = ModelLimits(max_params=10**9)
    with pytest.raises(SpecError, match=r"about 1,235,963,904 parameters .* limit of 1,000,000,000 "
                                        r"\(FITPROBE_MAX_MODEL_PARAMS\)"):
        check_model("llama", LLAMA_1B, {}, small, seq_len=128, micro_batch_limit=8)
    with pytest.raises(SpecError, match=r"FITPROBE_MAX_PARAM_TOKENS.*set max_micro_batch or effective_batch"):
        check_model("llama", LLAMA_1B, {}, ModelLimits(max_param_tokens=10**15), seq_len=4096,
                    micro_batch_limit=None)
    check_model("llama", LLAMA_1B, {}, ModelLimits(max_param_tokens=10**15), seq_len=4096, micro_batch_limit=8)


def test_lora_targets_naming_no_module_are_refused_without_building_the_model():
    spec = ProbeSpec(precision="fp32", model="preset:llama-3.2-1b", seq_len=64, finetuning="lora", lora={"targets": ["c_attn"]})
    with pytest.raises(SpecError, match=r"lora.targets: \['c_attn'\] are not modules of this model \(llama\)"):
        check_reference(spec)
    check_reference(spec.model_copy(update={"lora": spec.lora.model_copy(update={"targets": ["q_proj", "v_proj"]})}))


@pytest.mark.parametrize("model_type", MODULE_NAMES)
def test_the_module_names_the_door_checks_lora_targets_against_are_those_of_the_built_model(model_type):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fitprobe.probe.models.builtin_config import BUILTIN_CONFIGS
    from fitprobe.probe.models.builtin_gpt import GPT

    with torch.device("meta"):
        if model_type == "builtin":
            module = GPT(BUILTIN_CONFIGS["gpt-nano"])
        else:
            fields = next(dict(f) for t, f in PRESETS.values() if t == model_type)
            fields["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = 1
            module = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules() if n and not n.rsplit(".", 1)[-1].isdigit()}
    assert names == MODULE_NAMES[model_type]


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 10**4000, 1.5, True])
def test_seed_is_a_whole_number_from_0_below_2_to_the_63(seed):
    with pytest.raises(ValueError, match="seed"):
        ProbeSpec(precision="fp32", seed=seed)
    assert ProbeSpec(precision="fp32", seed=2**63 - 1).seed == 2**63 - 1
