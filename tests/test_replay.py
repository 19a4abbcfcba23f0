"""A replayed trial is the traced trial: the what-if table's cells are found on replays (probe/estimate/replay.py).

Each size law is checked against sizes worked out by hand; each family's replayed trials against trials
traced afresh at micro-batches and seq_lens the replay never traced, on families with grouped-query
attention, a sliding window, tied embeddings and an MoE's dense-then-sparse stack.
"""

from __future__ import annotations

import pytest

from fitprobe.probe.allocation_log import Allocate, AllocationLog, Free, Moment, PhaseChange, TrialStart
from fitprobe.probe.estimate.extrapolate import CutModels
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.heap import frozen_heap
from fitprobe.probe.estimate.replay import (
    Replay,
    SizeLaw,
    fit_sizes,
    learning_seq_lens,
    monomials_through,
    split_off_optimizer,
)
from fitprobe.probe.spec import ProbeSpec
from tests.test_extrapolate import FAMILIES

SEQS = (64, 96, 160)


def hand_sizes(b: int, s: int) -> list[int]:
    # labels padded by one (int64), an activation (bf16, hidden 64), an attention mask (bool), a rotary
    # table (no batch), a weight (neither)
    return [8 * b * (s + 1), 2 * 64 * b * s, b * s * s, 4 * 16 * s, 4096]


def test_size_laws_predict_sizes_they_were_not_learned_from():
    a, m, z = SEQS
    laws = fit_sizes({point: hand_sizes(*point) for point in [(1, a), (2, a), (1, m), (1, z)]}, SEQS)
    for b, s in [(3, 160), (7, 1000), (64, 8192), (1, 1)]:
        assert [law.at(b, s) for law in laws] == hand_sizes(b, s)


def test_equal_laws_compare_equal_whatever_points_they_were_learned_at():
    constant = fit_sizes({(1, 64): [4096], (2, 64): [4096], (1, 96): [4096], (1, 160): [4096]}, SEQS)
    assert constant == fit_sizes({(1, 8): [4096], (2, 8): [4096], (1, 24): [4096], (1, 40): [4096]}, (8, 24, 40))
    assert constant == [SizeLaw(0, 0, 0, 4096, 1)]


def test_a_monomial_is_read_off_two_points_and_an_ambiguous_size_is_not():
    # float32 activations of a 160-wide MLP: 640 bytes a token; at (1, 64) and (3, 160)
    (law,) = monomials_through(640 * 64, 640 * 3 * 160, 64, 160)
    assert law.at(7, 1000) == 640 * 7 * 1000
    (mask,) = monomials_through(64 * 64, 3 * 160 * 160, 64, 160)
    assert mask.at(2, 100) == 2 * 100 * 100
    assert monomials_through(100, 333, 64, 160) == set()
    # with z = 3a, b·s⁰ and b⁰·s give the same two sizes: two laws, so the row learns from five trials
    assert len(monomials_through(64, 192, 64, 192)) == 2


def test_a_size_that_is_not_a_power_of_the_micro_batch_is_refused():
    a, m, z = SEQS
    sizes = {(1, a): [8 * (1 + 1)], (2, a): [8 * (2 + 1)], (1, m): [16], (1, z): [16]}  # cu_seqlens: b + 1 rows
    with pytest.raises(Fallback, match="not a power of the micro-batch"):
        fit_sizes(sizes, SEQS)


def test_learning_seq_lens_are_the_tables_or_multiples_within_the_context():
    assert learning_seq_lens([512, 1024, 2048, 4096], 8192) == (512, 2048, 4096)
    assert learning_seq_lens([128], 1024) == (128, 256, 512)
    assert learning_seq_lens([128], 256) == (64, 128, 256)
    assert learning_seq_lens([4096], 4096) == (1024, 2048, 4096)
    assert learning_seq_lens([8192], 4096) is None


# llama: grouped-query attention, untied; qwen2: tied embeddings; mistral: a sliding window shorter than the seq_lens;
# qwen2_moe: dense layers first, then experts (routing under fake tensors)
REPLAY_CASES = [
    ("llama", dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=True,
                   optimizer="adamw_torch_fused")),
    ("qwen2", dict(precision="fp32", finetuning="full", gradient_checkpointing=False, optimizer="adamw_bnb_8bit")),
    ("mistral", dict(precision="bf16-mixed", finetuning="full", gradient_checkpointing=False,
                     optimizer="adamw_torch_fused", collation="packed")),
    ("qwen2_moe", dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=False,
                       optimizer="adamw_torch_fused")),
]


@pytest.mark.slow  # five learning trials and two fresh ones per family, about 40 s each
@pytest.mark.parametrize("family,settings", REPLAY_CASES, ids=[family for family, _ in REPLAY_CASES])
def test_replayed_trials_equal_trials_traced_afresh(family, settings):
    config, _ = FAMILIES[family]
    spec = ProbeSpec(model=config, seq_len=SEQS[0], mode="estimate", capacity_bytes=1 << 30, **settings)
    with frozen_heap():
        cuts = CutModels.build(spec)
        assert isinstance(cuts, CutModels), cuts
        replay = Replay.learn(cuts, spec, list(SEQS), lambda _event: None)
        assert isinstance(replay, Replay), replay

        def refuse(_spec, why):
            raise AssertionError(why)

        for b, s in [(5, 128), (2, 200)]:  # between the learned seq_lens, and past them
            traced = cuts.trial(spec.model_copy(update={"seq_len": s}), refuse)[2]
            before = replay.replayed
            replayed = replay.trial(s, traced)(b)
            assert replay.replayed == before + 1, "answered by tracing, not by the replay"
            assert replayed == traced(b), (b, s)


def test_a_step_that_does_not_fit_at_micro_batch_one_fits_nowhere_larger_without_learning():
    config, _ = FAMILIES["llama"]
    # 4 MiB holds the 2.3 MiB of fp32 weights, not their gradients and AdamW state as well
    spec = ProbeSpec(precision="fp32", model=config, seq_len=SEQS[0], mode="estimate", capacity_bytes=4 << 20)
    with frozen_heap():
        cuts = CutModels.build(spec)
        replay = Replay.learn(cuts, spec, list(SEQS), lambda _event: None)
        assert isinstance(replay, Replay) and replay.laws is None and set(replay.traced) == {(1, 64)}
        traced_calls = []
        trial = replay.trial(128, lambda b: traced_calls.append(b))
        assert not trial(1).fits and not trial(8).fits and traced_calls == []
        below = replay.trial(32, lambda b: traced_calls.append(b))
        below(1)
        assert traced_calls == [1], "a shorter seq_len than the one that failed is traced"
        # learning together with another optimizer: weights and gradients alone are past 4 MiB, one trial each
        specs = [spec.model_copy(update={"optimizer": optimizer}) for optimizer in ("adamw_torch", "adamw_bnb_8bit")]
        replays = Replay.learn_together(cuts, specs, list(SEQS), lambda _event: None)
        assert [(set(r.traced), r.fits_nowhere_from) for r in replays.values()] == [({(1, 64)}, 64)] * 2


# another optimizer on another build (checkpointing recomputes the forward inside the backward): every size is a
# law the first row learned, so two traced trials; over a 4-bit base too, whose float32 activations no row has
# allocated: read off those two points as plain products and checked at a third
OTHER_SETTINGS = [
    (dict(optimizer="adamw_bnb_8bit", gradient_checkpointing=True), [(1, 64), (3, 160)]),
    (dict(optimizer="adamw_bnb_8bit", gradient_checkpointing=True, quantization="nf4"), [(1, 64), (2, 96), (3, 160)]),
]


FIRST = ProbeSpec(model=FAMILIES["llama"][0], seq_len=SEQS[0], mode="estimate", capacity_bytes=1 << 30,
                  precision="bf16-mixed", finetuning="lora", gradient_checkpointing=False, optimizer="adamw_torch_fused")


@pytest.fixture(scope="module")
def first_laws() -> frozenset[SizeLaw]:
    """The laws the first setting's row learns (five traced trials), learned once for both other settings; frozen,
    so neither test can change what the other reads."""
    with frozen_heap():
        first = Replay.learn(CutModels.build(FIRST), FIRST, list(SEQS), lambda _event: None)
        assert isinstance(first, Replay) and first.laws is not None, first
        return frozenset(law for cut_laws in first.laws for law in cut_laws)


@pytest.mark.slow  # two or three learning trials and two fresh ones, ~50-60 s, after the first row's five (~50 s, shared)
@pytest.mark.parametrize("changes,traced_points", OTHER_SETTINGS, ids=["8bit-ckpt", "qlora-8bit-ckpt"])
def test_another_setting_takes_the_laws_learned_for_the_first_from_two_or_three_traced_trials(
        changes, traced_points, first_laws):
    other = FIRST.model_copy(update=changes)
    known = first_laws
    with frozen_heap():
        cuts = CutModels.build(other)
        replay = Replay.learn(cuts, other, list(SEQS), lambda _event: None, known)
        assert isinstance(replay, Replay), replay
        assert sorted(replay.traced) == traced_points, "learned from other traced trials than it should"

        def refuse(_spec, why):
            raise AssertionError(why)

        for b, s in [(5, 128), (2, 200)]:
            traced = cuts.trial(other.model_copy(update={"seq_len": s}), refuse)[2]
            replayed = replay.trial(s, traced)(b)
            assert replayed == traced(b) and replayed.fits, (b, s)


def test_the_shared_part_of_a_log_leaves_out_what_the_optimizer_allocates_and_counts_marks_without_its_moments():
    # a batch (0), the trial's start; a forward allocation (1) and a gradient (2); the update makes state (3) and a
    # temporary (4), frees the temporary and the gradient; the next forward allocates (5)
    log = AllocationLog(100, "idle", [
        Allocate(0), Moment(), TrialStart(), PhaseChange("forward_backward"), Allocate(1), Moment(), Allocate(2),
        Moment(), Free(1),
        PhaseChange("optimizer"), Allocate(3), Moment(), Allocate(4), Moment(), Free(4), Free(2),
        PhaseChange("forward_backward"), Allocate(5), Moment(), PhaseChange("idle"), Free(5), Free(3), Free(0)],
        sizes=[8, 16, 32, 64, 4, 16])
    # moments since the start: 0 reset, 1 phase, 2 and 3 allocations, 4 phase, 5 and 6 the optimizer's, 7 phase, 8
    marks = {"first_forward": [2, 8], "first_optimizer": [6]}
    split = split_off_optimizer(log, marks)
    assert split.shared == [0, 1, 2, 5]
    assert split.skeleton == [
        Allocate(0), Moment(), TrialStart(), PhaseChange("forward_backward"), Allocate(1), Moment(), Allocate(2),
        Moment(), Free(1),
        PhaseChange("optimizer"), Free(2), PhaseChange("forward_backward"), Allocate(3), Moment(), PhaseChange("idle"),
        Free(0), Free(3)]
    # the second mark has the optimizer's two moments before it; the optimizer's own mark is its own
    assert split.marks == {"first_forward": [2, 6]}


# three optimizers on one build, on families the size laws were not written against (tied embeddings, a sliding
# window): the first traces (1, a) and (2, m) (its laws are guessed, no row learned any before), the second (3, z),
# the third (1, a), and each one's replayed trial equals its trial traced afresh at a point it did not trace
TOGETHER = ["adamw_torch_fused", "adamw_bnb_8bit", "adamw_torch"]


@pytest.mark.slow  # four learning trials and three fresh ones per family, about 30 s each
@pytest.mark.parametrize("family,settings", [
    ("qwen2", dict(precision="bf16-mixed", finetuning="lora", gradient_checkpointing=False)),
    ("mistral", dict(precision="fp32", finetuning="full", gradient_checkpointing=True)),
], ids=["qwen2-lora", "mistral-full-ckpt"])
def test_the_optimizers_of_one_build_learn_together_from_one_traced_trial_each(family, settings):
    config, _ = FAMILIES[family]
    specs = [ProbeSpec(model=config, seq_len=SEQS[0], mode="estimate", capacity_bytes=1 << 30, optimizer=optimizer,
                       **settings) for optimizer in TOGETHER]
    with frozen_heap():
        cuts = CutModels.build(specs[0])
        replays = Replay.learn_together(cuts, specs, list(SEQS), lambda _event: None)
        assert all(isinstance(replays[o], Replay) for o in TOGETHER), replays
        assert [sorted(replays[o].traced) for o in TOGETHER] == [[(1, 64), (2, 96)], [(3, 160)], [(1, 64)]]

        def refuse(_spec, why):
            raise AssertionError(why)

        # each at a point it did not trace: past the learned seq_lens, where the first traced, between them
        for spec, (b, s) in zip(specs, [(2, 200), (1, 64), (5, 128)], strict=True):
            replay = replays[spec.optimizer]
            traced = cuts.trial(spec.model_copy(update={"seq_len": s}), refuse)[2]
            replayed = replay.trial(s, traced)(b)
            assert replay.replayed == 1, "traced, not replayed"
            assert replayed == traced(b), (spec.optimizer, b, s)
