"""The evaluation batch (probe/evaluate.py) against real `Trainer.evaluate()` runs, counted by the CPU
allocator's own account over the evaluation's window (tests/reference_trainer.py).

Families held out while writing the code: Qwen2 (grouped-query attention, tied embeddings) and Mistral
(sliding window). fp32 on the CPU, as the reference Trainer runs there.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fitprobe.probe.build import prepare
from fitprobe.probe.evaluate import EvalRunner, search_evaluation
from fitprobe.probe.spec import ProbeSpec
from tests.reference_trainer import trainer_eval_peak_bytes

TOLERANCE = 0.005  # the bar
QWEN2 = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
MISTRAL = dict(model_type="mistral", vocab_size=1200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=16,
               tie_word_embeddings=False)
SEQ_LEN = 32


def _spec(fields: dict, mode: str = "measure", capacity_bytes: int = 1 << 30, **evaluation) -> ProbeSpec:
    return ProbeSpec(model=fields, seq_len=SEQ_LEN, precision="fp32", collation="packed", mode=mode,
                     capacity_bytes=capacity_bytes, eval=True, **evaluation)


def _peaks(fields: dict, batch: int, steps: int, **evaluation) -> tuple[int, int]:
    """The eval trial's peak measured on the CPU and estimated under fake tensors."""
    peaks = []
    for mode in ("measure", "estimate"):
        spec = _spec(fields, mode, **evaluation)
        meter, model = prepare(spec)
        result = EvalRunner(spec, meter, model)(batch, steps)
        assert result.fits and result.peak_allocated_bytes
        peaks.append(result.peak_allocated_bytes)
    return peaks[0], peaks[1]


SLOW = pytest.mark.slow  # 8-25 s each on the shared 2-core host: a real Trainer run, a trial and an estimate


@pytest.mark.parametrize("fields,alone", [
    pytest.param(QWEN2, False, id="qwen2-beside-training", marks=SLOW),
    pytest.param(QWEN2, True, id="qwen2-evaluation-only"),
    pytest.param(MISTRAL, False, id="mistral-beside-training", marks=SLOW)])
def test_eval_step_holds_what_trainer_evaluate_holds(fields, alone):
    """No compute_metrics: the logits die with each step, the weights and optimizer state stay."""
    measured, estimated = _peaks(fields, 4, 1, eval_alone=alone)
    expected = trainer_eval_peak_bytes(fields, eval_batch=4, seq_len=SEQ_LEN, eval_rows=4, compute_metrics=False,
                                       train_first=not alone)
    assert measured == pytest.approx(expected, rel=TOLERANCE)
    assert estimated == measured


@SLOW
@pytest.mark.parametrize("fields", [QWEN2, MISTRAL], ids=["qwen2", "mistral"])
def test_with_compute_metrics_the_kept_logits_of_every_step_count(fields):
    """Three steps of batch 3: the trainer keeps each step's logits and labels concatenated on the device."""
    measured, estimated = _peaks(fields, 3, 3, eval_compute_metrics=True)
    expected = trainer_eval_peak_bytes(fields, eval_batch=3, seq_len=SEQ_LEN, eval_rows=9, compute_metrics=True)
    assert measured == pytest.approx(expected, rel=TOLERANCE)
    assert estimated == measured
    alone, _ = _peaks(fields, 3, 3)
    assert measured > alone  # without compute_metrics the same three steps keep nothing


@pytest.mark.slow  # ~40 s on the shared 2-core host: two searches and four real Trainer evaluations
def test_the_eval_batch_and_the_steps_that_fit_are_the_true_max():
    """Under a capacity: the real evaluation fits at the max and not at max + 1; with compute_metrics the
    eval set's steps past eval_steps_fit do not fit, which eval_accumulation_steps avoids."""
    capacity = 4 << 20
    evaluation = search_evaluation(_spec(QWEN2, capacity_bytes=capacity, eval_compute_metrics=True, eval_rows=64))
    estimated = search_evaluation(_spec(QWEN2, "estimate", capacity, eval_compute_metrics=True, eval_rows=64))
    assert estimated == evaluation.model_copy(update={})
    top = evaluation.batch.max
    assert 1 < top < 64
    assert trainer_eval_peak_bytes(QWEN2, eval_batch=top, seq_len=SEQ_LEN, eval_rows=top,
                                   compute_metrics=False) <= capacity
    assert trainer_eval_peak_bytes(QWEN2, eval_batch=top + 1, seq_len=SEQ_LEN, eval_rows=top + 1,
                                   compute_metrics=False) > capacity
    batch, steps = evaluation.per_device_eval_batch_size, evaluation.eval_steps_fit
    assert steps is not None and evaluation.eval_accumulation_steps is not None
    assert trainer_eval_peak_bytes(QWEN2, eval_batch=batch, seq_len=SEQ_LEN, eval_rows=batch * steps,
                                   compute_metrics=True) <= capacity
    assert trainer_eval_peak_bytes(QWEN2, eval_batch=batch, seq_len=SEQ_LEN, eval_rows=batch * (steps + 1),
                                   compute_metrics=True) > capacity


def test_eval_settings_without_eval_are_refused_with_the_fix():
    with pytest.raises(ValidationError, match=r"add eval \(--eval\)"):
        ProbeSpec(eval_compute_metrics=True)
    with pytest.raises(ValidationError, match="less than or equal to 16777216"):
        ProbeSpec(eval=True, eval_rows=1 << 30)


@pytest.mark.slow  # ~10 s on the shared host: two estimated probes with their evaluation searches
def test_the_hf_export_carries_the_eval_batch_and_the_accumulation_that_bounds_its_logits(capsys):
    """What a user pastes into TrainingArguments: the eval batch the report found, and eval_accumulation_steps."""
    import json

    from fitprobe.probe.cli import main

    argv = ["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--estimate", "--capacity", "8MiB",
            "--eval", "--eval-compute-metrics", "--effective-batch", "16", "--format", "hf", "--quiet"]
    assert main(argv) == 0
    config = json.loads(capsys.readouterr().out)
    assert main([*argv[:-3], "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)["evaluation"]
    assert config["per_device_eval_batch_size"] == evaluation["per_device_eval_batch_size"] > 0
    assert config["eval_accumulation_steps"] == evaluation["eval_accumulation_steps"] >= 1
