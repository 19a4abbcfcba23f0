"""An estimate from two shallow cuts of a decoder equals the full-depth estimate, to the byte.

Every family extrapolation is on for, cut down to tiny widths with its layer pattern kept (Gemma's
sliding/global alternation, an MoE's dense layer first): each trial's per-phase peaks, at micro-batch 1
and 3, must be the full depth's exactly, and so must the search's answer. The per-family comparisons run
the shallowest full depth that is still extrapolated two periods past the shallow cut (4 layers for a
plain stack, Gemma's 8): the cost of a full-depth trial is its layer count. The searches and the case
that once underestimated run 8 layers, six periods past the shallow cut.
"""

from __future__ import annotations

import pytest

from fitprobe.probe.estimate.extrapolate import (
    FSDP_VERIFIED_MODEL_TYPES,
    VERIFIED_MODEL_TYPES,
    Cuts,
    Trace,
    check_extrapolable,
    extrapolate_trace,
    find_pattern,
)
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.heap import frozen_heap
from fitprobe.probe.job import make_trial, run_probe
from fitprobe.probe.spec import ProbeSpec

_SMALL = dict(vocab_size=2000, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False)
# (config, expected cuts): the cuts hold the dense prefix, the pattern twice and three times, and the layers
# the stack ends on
FAMILIES: dict[str, tuple[dict, tuple[int, int]]] = {
    "llama": (dict(model_type="llama", num_hidden_layers=8, **_SMALL), (2, 3)),
    "qwen2": (dict(model_type="qwen2", num_hidden_layers=8, **{**_SMALL, "tie_word_embeddings": True}), (2, 3)),
    "mistral": (dict(model_type="mistral", num_hidden_layers=8, sliding_window=16, **_SMALL), (2, 3)),
    "gemma2": (dict(model_type="gemma2", num_hidden_layers=8, head_dim=16, sliding_window=16,
                    **{**_SMALL, "tie_word_embeddings": True}), (4, 6)),
    "phi3": (dict(model_type="phi3", num_hidden_layers=8, pad_token_id=0, **_SMALL), (2, 3)),
    "qwen3": (dict(model_type="qwen3", num_hidden_layers=8, head_dim=16, **_SMALL), (2, 3)),
    "mixtral": (dict(model_type="mixtral", num_hidden_layers=8, num_local_experts=4, num_experts_per_tok=2,
                     **_SMALL), (2, 3)),
    # one dense layer is the prefix: the cuts keep it and the sparse layers repeat after it
    "qwen2_moe": (dict(model_type="qwen2_moe", num_hidden_layers=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=64, mlp_only_layers=[0],
                       **_SMALL), (3, 4)),
}


def shallowest_depth(family: str) -> int:
    """The fewest layers a family's stack can have and still be extrapolated two periods past its shallow cut:
    the deep cut and one period more (the pattern finder cuts nothing shallower than the deep cut plus a period)."""
    shallow, deep = FAMILIES[family][1]
    return deep + (deep - shallow)
# each pair of the three settings in every combination of its values, in four runs
SETTINGS = [
    dict(precision="fp32", finetuning="full", gradient_checkpointing=False),
    dict(precision="fp32", finetuning="lora", gradient_checkpointing=True),
    dict(precision="bf16-mixed", finetuning="full", gradient_checkpointing=True),
    dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=False),
]
# Each family runs two of them, both precisions and both fine-tunings (checkpointing off in one half of the
# families, on in the other), and each setting runs in four families: 16 comparisons instead of all 32, which
# cost CI about four minutes more. The case that once underestimated (qwen2, fp32 full, micro-batch 1) has its
# own test below. The pairs alternate down the family list.
CASES = [(family, SETTINGS[i]) for n, family in enumerate(FAMILIES) for i in ((0, 3) if n % 2 == 0 else (1, 2))]


def test_a_plain_stack_is_cut_to_two_and_three_layers():
    assert find_pattern(["block"] * 32) == (0, 1)
    assert Cuts(32, 0, 1, 0).depths == (2, 3) and Cuts(32, 0, 1, 0).repeats == 30


def test_an_alternating_stack_keeps_whole_pairs_and_the_layers_it_ends_on():
    assert find_pattern(["sliding", "full"] * 13) == (0, 2)
    gemma3 = (["sliding"] * 5 + ["full"]) * 4 + ["sliding"] * 2
    assert find_pattern(gemma3) == (0, 6)
    # 2 + 12 + 2 layers, then 6 more: 26 = 14 + 2 x 6
    assert Cuts(26, 0, 6, 2).depths == (14, 20) and Cuts(26, 0, 6, 2).repeats == 2
    # the marks sit on the first period's last layer and on the layer before the last period
    assert Cuts(26, 0, 6, 2).marked_layers(20) == (5, 11)


def test_dense_layers_first_are_kept_as_a_prefix():
    assert find_pattern(["dense"] * 3 + ["moe"] * 58) == (3, 1)


def test_a_stack_without_enough_repetitions_is_not_cut():
    assert find_pattern(["a", "b", "c", "a", "b"]) is None
    assert find_pattern(["block"] * 3) is None  # the deeper cut would be the whole stack
    assert find_pattern(["a", "b"] * 3) is None


def _trace(moments: list[tuple[str, int]], first_forward: int, last_forward: int, last_backward: int,
           first_backward: int) -> Trace:
    return Trace(moments, {"first_forward": [first_forward], "last_forward": [last_forward],
                           "last_backward": [last_backward], "first_backward": [first_backward]})


def test_a_moment_that_is_not_the_cuts_peak_can_be_the_full_depths():
    # the shallow cut peaks at its second moment (100 > 90); the third grows faster: 90, 100, then +10 a period
    shallow = _trace([("fb", 50), ("fb", 100), ("fb", 90), ("optimizer", 60)], 1, 1, 3, 3)
    # the deep cut inserts a middle period's forward (index 1-2) and backward (index 4): dropped
    deep = _trace([("fb", 55), ("fb", 999), ("fb", 999), ("fb", 105), ("fb", 100), ("fb", 999), ("optimizer", 70)],
                  1, 3, 5, 6)
    # three periods more than the shallow cut: 90 + 3 x 10 = 120 beats 100 + 3 x 5 = 115; optimizer 60 + 3 x 10
    assert extrapolate_trace(shallow, deep, 3) == {"fb": 120, "optimizer": 90}


def test_optimizer_state_created_parameter_by_parameter_is_read_at_its_top():
    # a fused optimizer's first step: one zeros per parameter (the deep cut has more), then the kernel
    shallow = _trace([("fb", 10), ("optimizer", 11), ("optimizer", 12), ("optimizer", 13), ("idle", 5)], 1, 1, 1, 1)
    deep = _trace([("fb", 10), ("optimizer", 11), ("optimizer", 12), ("optimizer", 13), ("optimizer", 14),
                   ("idle", 6)], 1, 1, 1, 1)
    assert extrapolate_trace(shallow, deep, 2) == {"fb": 10, "optimizer": 13 + 2 * 1, "idle": 5 + 2 * 1}


def test_a_per_parameter_optimizers_middle_period_is_dropped_between_its_marks():
    # bitsandbytes: state made and a temporary freed per parameter; the deep cut's middle period is indices 3-4
    shallow = _trace([("fb", 10), ("optimizer", 12), ("optimizer", 11), ("optimizer", 14), ("optimizer", 13)],
                     1, 1, 1, 1)
    shallow.marks.update(first_optimizer=[3], last_optimizer=[3])
    deep = _trace([("fb", 11), ("optimizer", 13), ("optimizer", 12), ("optimizer", 99), ("optimizer", 99),
                   ("optimizer", 16), ("optimizer", 15)], 1, 1, 1, 1)
    deep.marks.update(first_optimizer=[3], last_optimizer=[5])
    # paired: 12/13, 11/12 (each +1 a period), then the last period's 14/16 (+2 a period): 14 + 3 x 2
    assert extrapolate_trace(shallow, deep, 3) == {"fb": 13, "optimizer": 20}
    deep.marks.update(last_optimizer=[])
    with pytest.raises(Fallback, match="deep cut: the marks"):
        extrapolate_trace(shallow, deep, 3)


def test_traces_that_do_not_pair_up_are_refused_with_the_reason():
    # single-tensor AdamW: a temporary made and freed per parameter, so the deep cut has more ops
    shallow = _trace([("fb", 10), ("optimizer", 20), ("optimizer", 12)], 1, 1, 1, 1)
    deep = _trace([("fb", 10), ("optimizer", 20), ("optimizer", 12), ("optimizer", 20), ("optimizer", 12)],
                  1, 1, 1, 1)
    with pytest.raises(Fallback, match="parameter by parameter"):
        extrapolate_trace(shallow, deep, 2)
    unmarked = Trace([("fb", 10)])
    with pytest.raises(Fallback, match="shallow cut: the marks"):
        extrapolate_trace(unmarked, deep, 2)


def _spec(family: str, layers: int | None = None, **settings) -> ProbeSpec:
    """The family's 8-layer config, or cut to `layers` (still extrapolated: see `shallowest_depth`)."""
    config = FAMILIES[family][0] if layers is None else {**FAMILIES[family][0], "num_hidden_layers": layers}
    return ProbeSpec(model=config, seq_len=32, capacity_bytes="1GiB", mode="estimate", **settings)


def _shallow_spec(family: str, **settings) -> ProbeSpec:
    return _spec(family, shallowest_depth(family), **settings)


def test_every_verified_family_is_compared_here():
    assert {config["model_type"] for config, _ in FAMILIES.values()} == VERIFIED_MODEL_TYPES


def test_the_cases_cover_every_setting_in_four_families_and_both_values_of_each_in_every_family():
    assert all(sum(settings == s for _, settings in CASES) == 4 for s in SETTINGS)
    for family in FAMILIES:
        mine = [settings for name, settings in CASES if name == family]
        assert {s["precision"] for s in mine} == {"fp32", "bf16-mixed"}
        assert {s["finetuning"] for s in mine} == {"full", "lora"}


def _assert_cuts_equal_the_full_depth(spec: ProbeSpec, depths: list[int]) -> None:
    """Per-phase peaks of the extrapolated trial, and its peak's breakdown by category, equal the full depth's at
    micro-batch 1 and 3, from those cuts. Inside `frozen_heap()`, as a probe runs them (probe/job.py): each
    trial's collections walk only what the trials made, not the models and imports."""
    with frozen_heap():
        _, facts, extrapolated = make_trial(spec)
        _, _, full = make_trial(spec.model_copy(update={"extrapolate": False}))
        for micro_batch in (1, 3):
            cut, whole = extrapolated(micro_batch), full(micro_batch)
            assert cut.phase_peak_bytes == whole.phase_peak_bytes, micro_batch
            assert cut.breakdown == whole.breakdown and whole.breakdown is not None, micro_batch
    assert facts["extrapolated_from_layers"] == depths
    assert facts["not_extrapolated_because"] is None


@pytest.mark.slow
@pytest.mark.parametrize("family,settings", CASES, ids=lambda v: v if isinstance(v, str) else
                         f"{v['precision']}-{v['finetuning']}-{'ckpt' if v['gradient_checkpointing'] else 'nockpt'}")
def test_extrapolated_phase_peaks_equal_the_full_depths_at_micro_batch_1_and_3(family, settings):
    _assert_cuts_equal_the_full_depth(_shallow_spec(family, **settings), list(FAMILIES[family][1]))


# the "does not fit" answer's shrinking settings (probe/needs.py) that once ran the full depth: QLoRA alone
# (llama), all together with bitsandbytes' paged 8-bit AdamW (qwen2, QLoRA's usual optimizer: LoRA's small
# adapters keep 32-bit state; under fake tensors paged state is an ordinary tensor the cuts count), and
# 8-bit AdamW on a full fine-tune (mistral: 8-bit state for the linears, 32-bit for the norms)
SHRINKING_CASES = [
    ("llama", dict(precision="bf16-mixed", finetuning="lora", quantization="nf4", gradient_checkpointing=False)),
    ("qwen2", dict(precision="bf16-mixed", finetuning="lora", quantization="nf4", gradient_checkpointing=True,
                   optimizer="paged_adamw_8bit")),
    ("mistral", dict(precision="fp32", finetuning="full", optimizer="adamw_bnb_8bit")),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,settings", SHRINKING_CASES, ids=lambda v: v if isinstance(v, str) else
                         f"{v.get('quantization', 'noquant')}-{v.get('optimizer', 'fused')}")
def test_qlora_and_8bit_adamw_extrapolate_to_the_full_depths_phase_peaks(family, settings):
    _assert_cuts_equal_the_full_depth(_shallow_spec(family, **settings), [2, 3])


@pytest.mark.slow
def test_qwen2_full_fine_tune_at_micro_batch_1_peaks_where_the_cuts_do_not_and_is_still_exact():
    # per-phase lines through the cuts were 6 % low here: the start of backward peaks the cuts, not 8 layers
    spec = _spec("qwen2", precision="fp32", finetuning="full", gradient_checkpointing=False)
    _, _, extrapolated = make_trial(spec)
    _, _, full = make_trial(spec.model_copy(update={"extrapolate": False}))
    assert extrapolated(1).phase_peak_bytes == full(1).phase_peak_bytes


@pytest.mark.slow
def test_foreach_adamw_pairs_up_and_adafactor_falls_back_to_the_full_depth():
    foreach = _shallow_spec("llama", optimizer="adamw_torch")
    _, facts, extrapolated = make_trial(foreach)
    _, _, full = make_trial(foreach.model_copy(update={"extrapolate": False}))
    assert extrapolated(2).phase_peak_bytes == full(2).phase_peak_bytes
    assert facts["not_extrapolated_because"] is None
    adafactor = _shallow_spec("llama", optimizer="adafactor")
    _, facts, extrapolated = make_trial(adafactor)
    _, _, full = make_trial(adafactor.model_copy(update={"extrapolate": False}))
    assert extrapolated(2).phase_peak_bytes == full(2).phase_peak_bytes
    assert facts["extrapolated_from_layers"] is None
    assert "parameter by parameter" in facts["not_extrapolated_because"]


@pytest.mark.slow
def test_the_search_over_an_extrapolated_llama_finds_the_full_depths_micro_batch_and_says_so():
    spec = _spec("llama", finetuning="lora").model_copy(update={"capacity_bytes": 12 * 2**20})
    events: list[dict] = []
    extrapolated = run_probe(spec, events.append).as_json()
    full = run_probe(spec.model_copy(update={"extrapolate": False})).as_json()
    assert extrapolated["model"]["extrapolated_from_layers"] == [2, 3]
    assert full["model"]["not_extrapolated_because"].startswith("extrapolate is off")
    assert extrapolated["search"]["max_micro_batch"] == full["search"]["max_micro_batch"] > 2
    assert [t["phase_peak_bytes"] for t in extrapolated["search"]["trials"] if t["fits"]] == \
        [t["phase_peak_bytes"] for t in full["search"]["trials"] if t["fits"]]
    cuts = [(e["done"], e["total"], e["option"]) for e in events if e.get("phase") == "building_cut"]
    assert cuts == [(1, 2, "2 of 8 layers"), (2, 2, "3 of 8 layers")]


def test_builtin_models_run_at_full_depth_and_the_report_says_why():
    report = run_probe(ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=32, capacity_bytes="16MiB",
                                 mode="estimate")).as_json()
    assert report["model"]["extrapolated_from_layers"] is None
    assert "Hugging Face" in report["model"]["not_extrapolated_because"]


# FSDP2 over a fake group of 2 or 4: one rank's shards, the blocks it gathers and prefetches, the gradients it
# reduce-scatters. Both fine-tunings, both precisions, checkpointing on and off, a tied and an untied head.
FSDP_CASES = [
    ("llama", 4, dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=True)),
    ("qwen2", 2, dict(precision="fp32", finetuning="full", gradient_checkpointing=False)),
    ("qwen2", 4, dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=False)),
]


def _fsdp_spec(family: str, num_devices: int, layers: int | None = None, **settings) -> ProbeSpec:
    return _spec(family, layers, sharding="fsdp", num_devices=num_devices, **settings)


def test_an_fsdp_estimate_extrapolates_to_the_full_depths_phase_peaks():
    spec = _fsdp_spec("llama", 2, shallowest_depth("llama"), precision="fp32", finetuning="full")
    _, facts, extrapolated = make_trial(spec)
    _, _, full = make_trial(spec.model_copy(update={"extrapolate": False}))
    cut, whole = extrapolated(2), full(2)
    assert cut.phase_peak_bytes == whole.phase_peak_bytes
    assert cut.breakdown == whole.breakdown and whole.breakdown is not None
    assert facts["extrapolated_from_layers"] == [2, 3] and facts["not_extrapolated_because"] is None
    assert facts["sharded_over_devices"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("family,num_devices,settings", FSDP_CASES, ids=lambda v: str(v) if not isinstance(v, dict)
                         else f"{v['precision']}-{v['finetuning']}-{'ckpt' if v['gradient_checkpointing'] else 'nockpt'}")
def test_fsdp_extrapolated_phase_peaks_equal_the_full_depths_at_micro_batch_1_and_3(family, num_devices, settings):
    spec = _fsdp_spec(family, num_devices, shallowest_depth(family), **settings)
    with frozen_heap():
        _, facts, extrapolated = make_trial(spec)
        _, _, full = make_trial(spec.model_copy(update={"extrapolate": False}))
        for micro_batch in (1, 3):
            assert extrapolated(micro_batch).phase_peak_bytes == full(micro_batch).phase_peak_bytes, micro_batch
    assert facts["extrapolated_from_layers"] == [2, 3] and facts["not_extrapolated_because"] is None


@pytest.mark.slow
def test_the_search_over_an_fsdp_llama_finds_the_full_depths_micro_batch_past_out_of_memory_trials():
    # 8 MiB per device: micro-batch 2 fits, 3 and 4 run out, and 1 comes after them
    spec = _fsdp_spec("llama", 2, precision="bf16-mixed", finetuning="full").model_copy(
        update={"capacity_bytes": 8 * 2**20})
    extrapolated = run_probe(spec).as_json()
    full = run_probe(spec.model_copy(update={"extrapolate": False})).as_json()
    assert extrapolated["model"]["extrapolated_from_layers"] == [2, 3]
    assert extrapolated["search"]["max_micro_batch"] == full["search"]["max_micro_batch"] == 2
    assert [(t["micro_batch"], t["phase_peak_bytes"]) for t in extrapolated["search"]["trials"] if t["fits"]] == \
        [(t["micro_batch"], t["phase_peak_bytes"]) for t in full["search"]["trials"] if t["fits"]]
    assert {1, 2} <= {t["micro_batch"] for t in full["search"]["trials"] if t["fits"]}


def test_every_family_extrapolated_under_fsdp_is_compared_here():
    assert {family for family, _, _ in FSDP_CASES} | {"llama"} == FSDP_VERIFIED_MODEL_TYPES


def test_measured_fsdp_and_unverified_families_run_at_full_depth_and_say_why():
    measured = _fsdp_spec("llama", 2).model_copy(update={"mode": "measure"})
    with pytest.raises(Fallback, match="real model on 2 real ranks"):
        check_extrapolable(measured)
    check_extrapolable(measured.model_copy(update={"mode": "estimate"}))
    with pytest.raises(Fallback, match="not compared with the full depth under FSDP"):
        check_extrapolable(_fsdp_spec("gemma2", 2))
    check_extrapolable(_spec("gemma2"))
