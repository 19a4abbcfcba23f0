"""The optimizer fitprobe runs is the one the user's framework runs, and its memory is counted as theirs.

Expected values come from outside fitprobe: the optimizer is built by transformers' own
`Trainer.get_optimizer_cls_and_kwargs` for each `optim` name, the loop is the standard HF loop
(tests/reference_loop.py), and the bytes are the CPU allocator's own account (torch.profiler memory
events). The two model families (Qwen3, OLMo-2) were never used while writing fitprobe.
"""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch

from fitprobe.probe import optimizers
from fitprobe.probe.cli import main
from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import Optimizer, ProbeSpec
from tests.reference_loop import (LiveBytes, LoopSettings, allocator_peak_bytes, hf_trainer_optimizer,
                                  run_user_loop)

TOLERANCE = 0.005
FAMILIES = {
    "qwen3": dict(model_type="qwen3", vocab_size=8000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  tie_word_embeddings=False),
    "olmo2": dict(model_type="olmo2", vocab_size=6000, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                  tie_word_embeddings=True),
}
TORCH_OPTIMIZERS = ["adamw_torch_fused", "adamw_torch", "adafactor", "sgd"]
BNB_OPTIMIZERS = ["adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit"]


def spec_for(family: str, optim: str, precision: str = "fp32", **extra) -> ProbeSpec:
    return ProbeSpec(model=FAMILIES[family], seq_len=LoopSettings.seq_len, capacity_bytes=1 << 32, optimizer=optim,
                     precision=precision, **extra)


def trial_peak(family: str, optim: str, micro_batch: int, **extra) -> int:
    trial = run_trial(spec_for(family, optim, **extra), micro_batch).as_json()
    assert trial["trial"]["fits"]
    return trial["trial"]["peak_allocated_bytes"]


@pytest.mark.parametrize("optim", get_args(Optimizer))
def test_every_name_builds_the_class_hf_trainer_builds(optim):
    ours = optimizers.make_optimizer(optim, torch.nn.Linear(4, 4), 1e-4, "cuda")
    theirs = hf_trainer_optimizer(optim, torch.nn.Linear(4, 4))
    assert type(ours) is type(theirs)
    for key in ("fused", "is_paged", "optim_bits", "momentum", "relative_step", "scale_parameter"):
        assert ours.defaults.get(key, getattr(ours, key, None)) == theirs.defaults.get(key, getattr(theirs, key, None))


def pairwise(optims: list[str]) -> list:
    """Each optimizer at both micro-batches, the family alternating: every (family, optimizer), (family,
    micro-batch) and (optimizer, micro-batch) pair occurs, in half the trials of the full product. What a
    family changes (tied embeddings, GQA) and what a micro-batch changes (which of states and activations
    holds the peak) are separate parts of the step: their pairs are where they meet."""
    families = list(FAMILIES)
    return [pytest.param(families[(i + j) % 2], optim, micro_batch,
                         id=f"{families[(i + j) % 2]}-{optim}-{bound}")
            for i, optim in enumerate(optims)
            for j, (micro_batch, bound) in enumerate([(1, "optimizer-bound"), (8, "activation-bound")])]


@pytest.mark.slow  # 5-15 s each on the shared 2-core machine: the HF loop and the trial, both real
@pytest.mark.parametrize("family,optim,micro_batch", pairwise(TORCH_OPTIMIZERS))
def test_trial_peak_equals_the_allocators_account_of_the_hf_loop(family, optim, micro_batch):
    settings = LoopSettings(micro_batch=micro_batch, optim=optim)
    expected = allocator_peak_bytes(lambda: run_user_loop(FAMILIES[family], settings))
    assert trial_peak(family, optim, micro_batch) == pytest.approx(expected, rel=TOLERANCE)


@pytest.mark.parametrize("optim", BNB_OPTIMIZERS)
def test_bitsandbytes_optimizers_hold_what_the_hf_loop_holds(optim):
    """bitsandbytes' CPU backend dequantizes each parameter's states into fp32 temporaries inside its op,
    which the CUDA kernel (blockwise, in registers) never makes: the allocator's account would charge the
    CPU backend's temporaries to a GPU plan. The yardstick here is therefore the tensors the loop's ops
    hand back, counted by the reference loop's own dispatch counter (not probe/meter.py)."""
    settings = LoopSettings(micro_batch=1, optim=optim)
    counter = LiveBytes()
    with counter:
        run_user_loop(FAMILIES["qwen3"], settings)
    assert trial_peak("qwen3", optim, 1) == pytest.approx(counter.peak, rel=TOLERANCE)


def test_8bit_state_is_a_quarter_of_fused_adamws_at_the_optimizer_step():
    model = _qwen3_on_meta()
    embedding_bytes = model.get_input_embeddings().weight.numel() * 4
    trainable_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    fused, eight_bit = trial_peak("qwen3", "adamw_torch_fused", 1), trial_peak("qwen3", "adamw_bnb_8bit", 1)
    # two fp32 moments (8 bytes per parameter) become two uint8 ones (2 bytes): 6 bytes less per parameter,
    # but for the token embedding's, which HF Trainer keeps in 32 bits
    assert fused - eight_bit == pytest.approx(1.5 * (trainable_bytes - embedding_bytes), rel=0.02)


def _qwen3_on_meta() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(FAMILIES["qwen3"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


@pytest.mark.parametrize("optim", [name for name in get_args(Optimizer) if name != "adamw_torch"])
def test_estimate_equals_the_measured_trial(optim):
    measured = trial_peak("olmo2", optim, 2)
    assert trial_peak("olmo2", optim, 2, mode="estimate") == pytest.approx(measured, rel=TOLERANCE)


def test_an_estimate_runs_adamw_torch_as_cuda_runs_it_not_as_the_host_would():
    """torch.optim.AdamW() picks foreach on CUDA and the single-tensor loop on CPU; an estimate is for a
    CUDA card, so it must count the foreach temporaries even on this CPU-only host."""
    settings = LoopSettings(micro_batch=1, optim="adamw_torch")
    cuda_loop = allocator_peak_bytes(lambda: run_user_loop(
        FAMILIES["qwen3"], settings, make_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True)))
    estimate = run_trial(spec_for("qwen3", "adamw_torch", mode="estimate"), 1).as_json()
    assert estimate["trial"]["peak_allocated_bytes"] == pytest.approx(cuda_loop, rel=TOLERANCE)
    assert estimate["optimizer"]["implementation"] == "torch.optim.AdamW(foreach=True)"
    assert trial_peak("qwen3", "adamw_torch", 1) < cuda_loop * (1 - TOLERANCE)  # the CPU measure: single-tensor


def test_paged_state_is_said_to_be_counted_as_device_memory():
    report = run_trial(spec_for("qwen3", "paged_adamw_8bit", mode="estimate"), 1).as_json()
    assert report["optimizer"]["implementation"] == "bitsandbytes.optim.AdamW(optim_bits=8, is_paged=True)"
    assert "counted as device memory" in report["optimizer"]["note"]


def test_old_optimizer_name_adamw_still_means_plain_torch_adamw():
    assert ProbeSpec(precision="fp32", optimizer="adamw").optimizer == "adamw_torch"
    assert ProbeSpec().optimizer == "adamw_torch_fused"


def test_cli_hf_export_names_the_optimizer(capsys):
    # the command line's own entry point, in this process (tests/test_cli.py runs it as a subprocess)
    code = main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                 "--capacity", "200MiB", "--effective-batch", "8", "--no-verify", "--optimizer",
                 "adamw_bnb_8bit", "--format", "hf", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["optim"] == "adamw_bnb_8bit"
