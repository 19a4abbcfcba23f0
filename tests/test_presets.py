"""Presets of the models people fine-tune: published sizes, and each one estimated at micro-batch 1."""

from __future__ import annotations

import pytest
import torch

from fitprobe.probe.build import prepare
from fitprobe.probe.job import run_trial
from fitprobe.probe.models.load import build_model
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.trial import TrialRunner

# parameter counts from the model cards (billions)
PUBLISHED_BILLIONS = {
    "llama-3.2-3b": 3.21, "qwen2.5-1.5b": 1.54, "qwen2.5-14b": 14.7, "mistral-nemo-12b": 12.2, "gemma-2-9b": 9.24,
    "phi-3.5-mini": 3.82, "mixtral-8x7b": 46.7, "qwen1.5-moe-a2.7b": 14.3,
    "qwen3-0.6b": 0.6, "qwen3-8b": 8.2, "qwen3-30b-a3b": 30.5, "gemma-3-1b": 1.0, "llama-3.3-70b": 70.6,
    "phi-4": 14.7, "mistral-small-3": 23.6,
}
# non-embedding counts, where the model card gives one (billions)
PUBLISHED_NON_EMBEDDING_BILLIONS = {"qwen3-0.6b": 0.44, "qwen3-8b": 6.95, "qwen3-30b-a3b": 29.9}
# Larger members of a family estimated below (llama, phi3, mistral, qwen3): estimating them too would add
# minutes of fake ops on the 2-core machine and exercise no other code.
ONLY_LARGER = {"llama-3.3-70b", "phi-4", "mistral-small-3", "qwen3-8b"}
# One layer: the experts' grouped matmuls and the dense twin's MLP each run once, as in every layer after it
TINY = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}  # Qwen3's default head_dim is 128
TINY_MOE = {
    "mixtral": {**TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**TINY, "model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**TINY, "model_type": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16},
}


@pytest.mark.parametrize("name", PUBLISHED_BILLIONS)
def test_preset_has_the_published_parameter_count(name):
    model = build_model(ProbeSpec(precision="fp32", model=f"preset:{name}", seq_len=64), "meta")
    count = sum(p.numel() for p in model.module.parameters())
    assert count / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.02)
    if name in PUBLISHED_NON_EMBEDDING_BILLIONS:
        tables = {model.module.get_input_embeddings().weight, model.module.get_output_embeddings().weight}
        embeddings = sum(t.numel() for t in tables)  # a tied head is the same tensor, counted once
        assert (count - embeddings) / 1e9 == pytest.approx(PUBLISHED_NON_EMBEDDING_BILLIONS[name], rel=0.02)


# Each preset's own config, all of its fields, with fewer layers: a fake op costs the same whatever its
# shape, so the step's time goes with the layer count (gemma-2-9b: 57 s at 42 layers, 3 s at 2). The layers
# kept hold every kind of layer the full model has: one where every layer is alike, two for Gemma-2 (it
# alternates sliding and global attention), six for Gemma-3 (five sliding ones per global one). The full size
# is test_preset_has_the_published_parameter_count's, and test_estimate.py's 7B estimate carries the weights
# of a full-size model.
LAYERS_OF_EVERY_KIND = {"gemma2": 2, "gemma3_text": 6}


def with_fewer_layers(name: str) -> dict:
    model_type, fields = PRESETS[name]
    return {**fields, "model_type": model_type, "num_hidden_layers": LAYERS_OF_EVERY_KIND.get(model_type, 1)}


def transformers_parameter_count(config: dict) -> int:
    """The parameters transformers itself builds for this config, on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied table once


@pytest.mark.slow  # 1-3 s each on the shared 2-core machine
@pytest.mark.parametrize("name", [name for name in PUBLISHED_BILLIONS if name not in ONLY_LARGER])
def test_preset_estimates_a_lora_step_at_micro_batch_one(name):
    config = with_fewer_layers(name)
    spec = ProbeSpec(model=config, seq_len=64, finetuning="lora", precision="bf16-mixed", mode="estimate",
                     capacity_bytes="200GiB")
    report = run_trial(spec, 1).as_json()
    weight_bytes = report["model"]["weight_bytes"]
    assert report["trial"]["fits"]
    assert weight_bytes > 2 * transformers_parameter_count(config) * 0.98  # bf16 base weights, all of them
    assert report["trial"]["peak_allocated_bytes"] > weight_bytes


def peak_bytes(spec: ProbeSpec, micro_batch: int) -> int:
    meter, model = prepare(spec)
    with meter.tracking():
        result = TrialRunner(spec, meter, model)(micro_batch)
    assert result.fits
    return result.peak_allocated_bytes


@pytest.mark.slow  # 4-7 s each on the shared 2-core machine: four trials, two of them real
@pytest.mark.parametrize("model_type,dense_twin", [("mixtral", "llama"), ("qwen2_moe", "qwen2"),
                                                   ("qwen3_moe", "qwen3")])
@pytest.mark.parametrize("finetuning,precision", [("full", "fp32"), ("lora", "bf16-mixed")])
def test_moe_estimate_counts_the_experts_as_the_cpu_run_allocates_them(model_type, dense_twin, finetuning,
                                                                       precision):
    """Measure mode routes real tokens on CPU; estimate runs the same grouped matmuls on fake tensors.

    Whatever the estimate misses in the attention and the rest, it misses in the dense model with the
    same layers too; the experts themselves must add (next to) nothing to that gap.
    """
    def gap_and_peak(config: dict) -> tuple[int, int]:
        fields = dict(model=config, seq_len=16, capacity_bytes="64MiB", finetuning=finetuning, precision=precision)
        measured = peak_bytes(ProbeSpec(**fields), 3)
        return peak_bytes(ProbeSpec(mode="estimate", **fields), 3) - measured, measured

    moe_gap, moe_peak = gap_and_peak(TINY_MOE[model_type])
    dense_gap, _ = gap_and_peak({**TINY, "model_type": dense_twin})
    assert abs(moe_gap - dense_gap) <= 0.005 * moe_peak, (moe_gap, dense_gap, moe_peak)


def test_moe_whose_experts_loop_over_the_routing_is_measured_not_estimated():
    looped = {**TINY_MOE["mixtral"], "experts_implementation": "eager"}  # torch.where over the router's picks
    spec = ProbeSpec(precision="fp32", model=looped, seq_len=16, capacity_bytes="64MiB")
    assert run_trial(spec, 2).as_json()["trial"]["fits"]
    with pytest.raises(SpecError, match=r"estimate mode cannot run this mixture-of-experts model.*measure mode"):
        run_trial(spec.model_copy(update={"mode": "estimate"}), 2).as_json()
