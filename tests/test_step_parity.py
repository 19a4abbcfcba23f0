"""THE step holds what the user's own loop holds: trial and estimate against an independent count.

The expected peaks come from tests/reference_loop.py: the standard Hugging Face loop, built and
counted without probe/meter.py or probe/step.py. Architectures were chosen because fitprobe was not
written against them (grouped-query attention, sliding windows, fused qkv, tied embeddings).
"""

from __future__ import annotations

import pytest

from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import ProbeSpec
from tests.reference_loop import ARCHITECTURES, LoopSettings, quarter_vocabulary, user_loop_peak_bytes

TOLERANCE = 0.005  # the bar: within 0.5 % of the loop users run
SETTINGS = [("fp32", False), ("fp32", True), ("bf16-mixed", False), ("bf16-mixed", True)]


def fields_for(name: str, settings: LoopSettings) -> dict:
    """The architecture; under bf16-mixed on a quarter of its vocabulary (`quarter_vocabulary` says why)."""
    fields = ARCHITECTURES[name]
    return quarter_vocabulary(fields) if settings.precision == "bf16-mixed" else fields


def spec_for(name: str, settings: LoopSettings, **extra) -> ProbeSpec:
    return ProbeSpec(model=fields_for(name, settings), seq_len=settings.seq_len, precision=settings.precision,
                     finetuning="lora" if settings.lora else "full", capacity_bytes=1 << 32,
                     collation="padded" if settings.padded else "packed", **extra)


@pytest.mark.parametrize("precision,lora", SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_trial_peak_equals_the_standard_hf_loops_peak(name, precision, lora):
    settings = LoopSettings(precision=precision, lora=lora)
    loop_bytes = user_loop_peak_bytes(fields_for(name, settings), settings)
    trial = run_trial(spec_for(name, settings), settings.micro_batch).as_json()["trial"]
    assert trial["fits"]
    assert trial["peak_allocated_bytes"] == pytest.approx(loop_bytes, rel=TOLERANCE)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "gemma2-sliding", "phi3"])
def test_estimate_takes_the_users_attention_path(name, padded):
    """Under fake tensors the mask's values cannot be read; the estimate must still match the real run."""
    settings = LoopSettings(precision="bf16-mixed", lora=True, padded=padded, micro_batch=6)
    loop_bytes = user_loop_peak_bytes(fields_for(name, settings), settings)
    estimated = run_trial(spec_for(name, settings, mode="estimate"), settings.micro_batch).as_json()["trial"]
    assert estimated["peak_allocated_bytes"] == pytest.approx(loop_bytes, rel=TOLERANCE)


def test_padded_trial_is_the_worst_case_of_a_padded_loader():
    """One padding token forces the explicit mask (and repeated key/value heads under GQA): it costs more."""
    one_pad = LoopSettings(padded=True, micro_batch=6, seq_len=128)
    no_padding_bytes = user_loop_peak_bytes(ARCHITECTURES["llama-gqa"], LoopSettings(padded=False, micro_batch=6,
                                                                                         seq_len=128))
    padded_trial = run_trial(spec_for("llama-gqa", one_pad), 6).as_json()["trial"]["peak_allocated_bytes"]
    assert padded_trial > no_padding_bytes * (1 + TOLERANCE)
    assert padded_trial == pytest.approx(user_loop_peak_bytes(ARCHITECTURES["llama-gqa"], one_pad), rel=TOLERANCE)
