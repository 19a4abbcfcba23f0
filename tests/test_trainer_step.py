"""The step HF Trainer really runs: its optimizer construction and its model call, against real Trainer runs.

Expected peaks are `Trainer.train()` itself (tests/reference_trainer.py), counted by the CPU allocator's own
account. The families (Cohere2 with tied embeddings and sliding windows, Granite) were not used while
writing this code.
"""

from __future__ import annotations

import pytest
import torch

from fitprobe.probe import optimizers
from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import ProbeSpec
from tests.reference_loop import hf_trainer_optimizer
from tests.reference_trainer import trainer_peak_bytes

TOLERANCE = 0.005  # the bar
COHERE2 = dict(model_type="cohere2", vocab_size=4000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=64)
GRANITE = dict(model_type="granite", vocab_size=8000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
EIGHT_BIT = [name for name, kind in optimizers.KINDS.items() if kind.library == "bitsandbytes" and kind.bits == 8]


def _state_dtypes(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[torch.dtype | None]:
    """The dtype of each parameter's first moment, in the module's parameter order."""
    return [optimizer.state[p]["state1"].dtype if p in optimizer.state else None for p in module.parameters()]


def _one_step(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    module(torch.arange(8)[None]).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("optim", EIGHT_BIT)
def test_8bit_optimizers_keep_embedding_state_in_32_bits_as_hf_trainer_does(optim):
    """6 bytes per embedding parameter: the Trainer registers every nn.Embedding for 32-bit state."""
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(4096, 8), torch.nn.Linear(8, 4096))

    ours_model, theirs_model = model(), model()
    ours = optimizers.make_optimizer(optim, ours_model, 1e-4, "cpu")
    theirs = hf_trainer_optimizer(optim, theirs_model)
    _one_step(ours, ours_model)
    _one_step(theirs, theirs_model)
    assert _state_dtypes(ours, ours_model) == _state_dtypes(theirs, theirs_model)
    assert _state_dtypes(ours, ours_model)[0] == torch.float32  # the embedding
    assert _state_dtypes(ours, ours_model)[1] == torch.uint8  # the linear layer's weight stays 8-bit


def _trial_and_estimate(fields: dict, micro_batch: int, **spec) -> tuple[int, int]:
    peaks = []
    for mode in ("measure", "estimate"):
        # fp32, as the reference Trainer runs on the CPU (fitprobe's default precision is bf16-mixed)
        trial = run_trial(ProbeSpec(model=fields, capacity_bytes=1 << 32, mode=mode, **{"precision": "fp32", **spec}),
                          micro_batch).as_json()
        assert trial["trial"]["fits"]
        peaks.append(trial["trial"]["peak_allocated_bytes"])
    return peaks[0], peaks[1]


@pytest.mark.slow  # 45-90 s on the shared 2-core host: a real Trainer run, a trial and an estimate
def test_8bit_full_finetune_holds_what_hf_trainer_holds():
    """Micro-batch 1, with the second micro-step's forward holding the peak: weights, gradients and the
    optimizer state, the embedding's in 32 bits (bitsandbytes' CPU backend dequantizes its states into
    temporaries the CUDA kernel never makes, so the optimizer step itself is not the yardstick here)."""
    measured, estimated = _trial_and_estimate(COHERE2, 1, seq_len=256, optimizer="adamw_bnb_8bit", collation="packed")
    expected = trainer_peak_bytes(COHERE2, optim="adamw_bnb_8bit", micro_batch=1, seq_len=256)
    assert measured == pytest.approx(expected, rel=TOLERANCE)
    assert estimated == measured


@pytest.mark.slow  # 60-100 s on the shared 2-core host: a real Trainer run, a trial and an estimate
def test_flattened_batches_hold_what_hf_trainer_with_the_flattening_collator_holds():
    """Four rows flattened into one: without a cache, transformers reads the restarting position ids and
    masks each row to itself (a model called with a cache attends across rows, with less memory)."""
    measured, estimated = _trial_and_estimate(GRANITE, 4, seq_len=128, collation="flattened")
    expected = trainer_peak_bytes(GRANITE, micro_batch=4, seq_len=128, flatten=True)
    assert measured == pytest.approx(expected, rel=TOLERANCE)
    assert estimated == measured


TINY_GRANITE = dict(GRANITE, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1)


def test_all_linear_lora_adapts_what_peft_adapts_and_trains():
    """PEFT's own `target_modules="all-linear"` on the same model decides which layers get adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_GRANITE)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    for mode in ("measure", "estimate"):
        report = run_trial(ProbeSpec(model=TINY_GRANITE, seq_len=32, capacity_bytes=1 << 32, finetuning="lora",
                                     lora={"targets": "all-linear"}, mode=mode), 1).as_json()
        assert report["trial"]["fits"]
        assert report["model"]["trainable_parameters"] == trainable


def test_all_linear_beside_module_names_or_on_a_builtin_model_is_refused_with_the_fix():
    from pydantic import ValidationError

    from fitprobe.probe.models.reference import check_reference
    from fitprobe.probe.spec import SpecError

    with pytest.raises(ValidationError, match="name no other module beside it"):
        ProbeSpec(finetuning="lora", lora={"targets": ["all-linear", "q_proj"]})
    with pytest.raises(SpecError, match="name the builtin model's modules instead"):
        check_reference(ProbeSpec(model="builtin:gpt-nano", finetuning="lora", lora={"targets": ["all-linear"]}))
