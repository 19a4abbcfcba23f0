"""The peak by category: it sums to the peak, and its parts are what users count by hand.

The expected bytes come from the model itself (each parameter's storage, rounded up to the 512-byte blocks
the CUDA allocator hands out), never from fitprobe's own count. qwen2 (tied embeddings, q/k/v biases) was
not the family the categories were written against.
"""

from __future__ import annotations

import pytest

from fitprobe.probe.breakdown import CATEGORIES, describe
from fitprobe.probe.build import prepare
from fitprobe.probe.cli import _trial_table
from fitprobe.probe.report import TrialResult
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.trial import TrialRunner

QWEN2 = dict(model_type="qwen2", num_hidden_layers=2, vocab_size=2000, hidden_size=64, intermediate_size=160,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def _block_bytes(tensors) -> int:
    """Bytes of each distinct storage as the allocator hands them out: rounded up to 512."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-n // 512) * 512 for n in storages.values())


def _trial(micro_batch: int, **fields):
    spec = ProbeSpec(model=QWEN2, seq_len=16, capacity_bytes="512MiB", **fields)
    meter, model = prepare(spec)
    runner = TrialRunner(spec, meter, model)
    with meter.tracking():
        return runner(micro_batch), model.module


def test_a_full_fine_tunes_peak_is_weights_gradients_and_adamw_state_as_counted_by_hand():
    result, module = _trial(2, precision="fp32", finetuning="full", optimizer="adamw_torch_fused")
    assert result.fits and result.breakdown is not None
    assert list(result.breakdown) == list(CATEGORIES)
    assert sum(result.breakdown.values()) == result.peak_allocated_bytes
    parameters = list(module.parameters())
    assert result.breakdown["weights"] == _block_bytes(parameters + list(module.buffers()))
    # the trial's peak comes after the first micro-step's backward: every parameter has its gradient
    assert result.breakdown["gradients"] == _block_bytes(parameters)
    # AdamW's two moments per parameter, and its step count (one float32 scalar, one block, per parameter)
    assert result.breakdown["optimizer_state"] == 2 * _block_bytes(parameters) + 512 * len(parameters)
    assert result.breakdown["activations"] > 0 and result.breakdown["loss_head"] > 0


def test_lora_gradients_and_state_are_the_adapters_only():
    result, module = _trial(1, precision="bf16-mixed", finetuning="lora", optimizer="adamw_torch_fused")
    assert result.breakdown is not None and sum(result.breakdown.values()) == result.peak_allocated_bytes
    adapters = [p for p in module.parameters() if p.requires_grad]
    assert 0 < len(adapters) < len(list(module.parameters()))
    assert result.breakdown["weights"] == _block_bytes(list(module.parameters()) + list(module.buffers()))
    assert result.breakdown["gradients"] == _block_bytes(adapters)
    assert result.breakdown["optimizer_state"] == 2 * _block_bytes(adapters) + 512 * len(adapters)


@pytest.mark.slow  # two builds and trials, about 6 s
def test_more_rows_add_activations_and_loss_head_not_weights_or_state():
    (one, _), (four, _) = _trial(1, finetuning="full"), _trial(4, finetuning="full")
    assert one.breakdown is not None and four.breakdown is not None
    for fixed in ("weights", "gradients", "optimizer_state"):
        assert four.breakdown[fixed] == one.breakdown[fixed], fixed
    assert four.breakdown["activations"] > one.breakdown["activations"]
    assert four.breakdown["loss_head"] > one.breakdown["loss_head"]


def test_the_estimate_breaks_the_peak_down_as_the_measured_trial_does():
    measured, _ = _trial(3, precision="fp32", finetuning="full")
    estimated, _ = _trial(3, precision="fp32", finetuning="full", mode="estimate", extrapolate=False)
    assert estimated.peak_allocated_bytes == measured.peak_allocated_bytes
    assert estimated.breakdown == measured.breakdown


def test_the_text_line_is_the_peak_and_its_parts_in_one_unit():
    gib = 2**30
    breakdown = dict.fromkeys(CATEGORIES, 0) | {"weights": gib // 2, "gradients": gib // 4, "loss_head": gib // 4,
                                                 "optimizer_state": gib}
    assert describe(2 * gib, breakdown) == "peak 2.00 GiB = weights 0.50 + grads 0.25 + optimizer 1.00 + loss head 0.25"
    assert describe(3 * 2**20, {"weights": 3 * 2**20}) == "peak 3.00 MiB = weights 3.00"


def test_the_trial_table_ends_with_the_largest_fitting_trials_breakdown():
    mib = 2**20
    trials = [TrialResult(2, True, 3 * mib, 3 * mib, breakdown={"weights": mib, "activations": 2 * mib}),
              TrialResult(4, True, 4 * mib, 4 * mib, breakdown={"weights": mib, "activations": 3 * mib}),
              TrialResult(5, False, error="out of memory")]
    assert _trial_table(trials).splitlines()[-1] == "at micro_batch 4: peak 4.00 MiB = weights 1.00 + activations 3.00"
    assert trials[1].describe() == "fits, peak 4.00 MiB = weights 1.00 + activations 3.00"


def test_a_trial_that_did_not_fit_has_no_breakdown():
    spec = ProbeSpec(model=QWEN2, seq_len=16, capacity_bytes="2MiB", finetuning="full")
    meter, model = prepare(spec)
    with meter.tracking():
        result = TrialRunner(spec, meter, model)(8)
    assert not result.fits and result.breakdown is None
