"""fitprobe recommend: every candidate is its own single estimate, costed by FLOPs counted independently."""

from __future__ import annotations

import json
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fitprobe.probe.job import run_probe
from fitprobe.probe.recommend import Candidate, recommend
from fitprobe.probe.spec import ProbeSpec

# held out: no other test sizes this Qwen2; two layers, so every step runs at full depth
QWEN2 = dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
SEQ_LEN = 64


def test_the_ranking_puts_fitting_first_then_fewer_numerics_changes_then_less_compute_then_larger_micro_batch():
    def candidate(name: str, max_mb: int, extra: float, numerics: int = 0) -> Candidate:
        return Candidate(name, {}, max_micro_batch=max_mb, safe_micro_batch=max_mb, extra_compute=extra,
                         numerics=["x"] * numerics)

    ranked = sorted([candidate("none fits", 0, 0.0), candidate("8-bit", 9, 0.0, numerics=1),
                     candidate("ckpt small", 3, 0.25), candidate("ckpt large", 5, 0.25),
                     candidate("free", 2, 0.0)], key=Candidate.rank_key)
    assert [c.label for c in ranked] == ["free", "ckpt large", "ckpt small", "8-bit", "none fits"]
    in_headroom = Candidate("keeps headroom", {}, max_micro_batch=2, safe_micro_batch=1, numerics=["x"])
    eats_it = Candidate("eats headroom", {}, max_micro_batch=1, safe_micro_batch=0)
    assert sorted([eats_it, in_headroom], key=Candidate.rank_key)[0] is in_headroom


def _by_hand_recompute_flops() -> int:
    """What checkpointing recomputes, counted without fitprobe: a forward and backward at micro-batch 1 as a user
    writes it, with and without `gradient_checkpointing_enable(use_reentrant=False)`, on real CPU tensors.

    Not a whole forward per layer: torch's non-reentrant checkpoint stops recomputing once every tensor the
    backward needs is back (a layer's last projection is not run again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    counted = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, QWEN2["vocab_size"], (1, SEQ_LEN))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        counted.append(counter.get_total_flops())
    return counted[1] - counted[0]


@pytest.fixture(scope="module")
def found():
    # pure bf16 and Adafactor as asked leave one axis: checkpointing (and TRL's fused head)
    spec = ProbeSpec(model=QWEN2, seq_len=SEQ_LEN, mode="estimate", capacity_bytes=6 << 20, collation="packed",
                     precision="bf16", optimizer="adafactor", effective_batch=16)
    seen: list[dict] = []
    return spec, recommend(spec, emit=seen.append), seen


def test_progress_counts_each_builds_flops_then_answers_each_candidate(found):
    _, answer, seen = found
    # checkpointing off/on × the plain and TRL's fused head run four different steps: four FLOP counts, each
    # announced before it runs, then one event per candidate
    counting = [e for e in seen if e["type"] == "phase" and e["phase"] == "counting_flops"]
    assert [(e["done"], e["total"]) for e in counting] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    answered = [e for e in seen if e["type"] == "recommend_candidate"]
    assert [e["done"] for e in answered] == list(range(1, len(answer.candidates) + 1))
    assert seen.index(counting[-1]) < seen.index(answered[0])


def test_checkpointings_extra_compute_is_the_recomputed_forward_counted_by_hand(found):
    _, answer, _ = found
    by_settings = {json.dumps(c.settings, sort_keys=True): c for c in answer.candidates}
    asked, checkpointed = by_settings["{}"], by_settings['{"gradient_checkpointing": true}']
    assert checkpointed.step_flops - asked.step_flops == _by_hand_recompute_flops()
    assert checkpointed.extra_compute == pytest.approx(checkpointed.step_flops / asked.step_flops - 1, abs=1e-6)


def test_every_candidate_answers_what_its_own_probe_estimate_answers(found):
    spec, answer, _ = found
    assert len(answer.candidates) == 4  # checkpointing off/on × trainer hf/trl
    for candidate in answer.candidates:
        single = run_probe(spec.model_copy(update=candidate.settings)).search
        assert (candidate.max_micro_batch, candidate.safe_micro_batch) == (
            single.max_micro_batch, single.safe_micro_batch), candidate.label
    first = answer.first_fitting
    assert first is not None and first is answer.candidates[0]


RECOMMEND = ["recommend", "--model", "builtin:gpt-nano", "--capacity", "12MiB", "--seq-len", "64",
             "--precision", "bf16", "--optimizer", "adafactor", "--effective-batch", "8", "--quiet"]


def test_json_lists_each_candidates_settings_max_safe_plan_and_cost_and_format_exports_any_of_them(capsys):
    from fitprobe.probe.cli import main

    assert main([*RECOMMEND, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [c["settings"] for c in answer["candidates"]] != []
    for candidate in answer["candidates"]:
        assert {"settings", "max_micro_batch", "safe_micro_batch", "plan", "extra_compute", "numerics"} <= set(candidate)
    first = answer["candidates"][answer["first_fitting"]]
    assert first["plan"]["micro_batch"] * first["plan"]["accumulation_steps"] == 8
    assert main([*RECOMMEND, "--format", "hf"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["per_device_train_batch_size"] == first["plan"]["micro_batch"]
    assert config["gradient_checkpointing"] == first["settings"].get("gradient_checkpointing", False)
    # any other candidate exports by its rank, with the settings it changed
    other_rank = next(rank for rank, c in enumerate(answer["candidates"], 1)
                      if rank - 1 != answer["first_fitting"] and c["max_micro_batch"])
    other = answer["candidates"][other_rank - 1]
    assert main([*RECOMMEND, "--format", "hf", "--candidate", str(other_rank)]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["per_device_train_batch_size"] == other["plan"]["micro_batch"]
    assert config["gradient_checkpointing"] == other["settings"].get("gradient_checkpointing", False)
    assert main([*RECOMMEND, "--format", "hf", "--candidate", str(len(answer["candidates"]) + 1)]) == 2
    assert f"--candidate must be a rank from 1 to {len(answer['candidates'])}" in capsys.readouterr().err


# The case, an 8B full fine-tune on one H100 (the first candidate keeps full fine-tuning and equals its
# own estimate), takes half an hour of fake-tensor work on the 2-core host: bench/recommend_speed.py runs it,
# checks those and records the answer in bench/results/recommend-speed-cpu.json.
