"""The search over scripted memory curves: exact answers, few trials, limits respected."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings, strategies as st

from fitprobe.probe.search import find_micro_batch

MIB = 1 << 20


@dataclass
class Scripted:
    micro_batch: int
    fits: bool
    peak_reserved_bytes: int | None
    alloc_retries: int = 0
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)


def transformer_curve(static_mib: float, optimizer_extra_mib: float, act_mib: float, bend_b: int = 3):
    """Peaks like a real step: the optimizer phase holds the peak at small b, activations at large b,
    and inside forward/backward a constant gradient spike dominates until `bend_b`."""

    def phases(b: int) -> dict[str, int]:
        forward_backward = static_mib + max(act_mib * bend_b, act_mib * b)
        return {"forward_backward": int(forward_backward * MIB),
                "optimizer": int((static_mib + optimizer_extra_mib) * MIB)}

    return phases


def scripted_trial(phases, capacity_bytes: int, tried: list[int]):
    def trial(b: int) -> Scripted:
        tried.append(b)
        peaks = phases(b)
        peak = max(peaks.values())
        return Scripted(b, peak <= capacity_bytes, min(peak, capacity_bytes), 0, peaks)

    return trial


def true_max(phases, capacity_bytes: int) -> int:
    b = 0
    while max(phases(b + 1).values()) <= capacity_bytes:
        b += 1
    return b


def lightning_binsearch_trials(fits) -> int:
    """Lightning's binsearch: double from 2 until a failure, then bisect (its documented algorithm)."""
    trials, low, high, b = 0, 1, None, 2
    while True:
        trials += 1
        if fits(b):
            low = b
            if high is None:
                b *= 2
            elif high - low <= 1:
                return trials
            else:
                b = (low + high) // 2
        else:
            high = b
            if high - low <= 1:
                return trials
            b = (low + high) // 2


@pytest.mark.parametrize("act_mib,capacity_mib", [(30, 4_000), (3, 4_000), (1.5, 2_000), (50, 70_000)])
def test_finds_the_exact_maximum_with_far_fewer_trials_than_binsearch(act_mib, capacity_mib):
    phases = transformer_curve(static_mib=900, optimizer_extra_mib=700, act_mib=act_mib)
    capacity = capacity_mib * MIB
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, headroom=0.1)
    expected = true_max(phases, capacity)
    assert result.max_micro_batch == expected
    binsearch = lightning_binsearch_trials(lambda b: max(phases(b).values()) <= capacity)
    assert len(tried) <= 6 < binsearch


def test_optimizer_phase_peak_at_small_batch_does_not_mislead_the_prediction():
    # at b=2 and b=4 the optimizer step is the peak; a single line through total peaks would be flat
    phases = transformer_curve(static_mib=1000, optimizer_extra_mib=2000, act_mib=20, bend_b=1)
    capacity = 8_000 * MIB
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, headroom=0.0)
    assert result.max_micro_batch == true_max(phases, capacity) == 350
    assert len(tried) <= 5


def test_never_tries_beyond_the_limit_the_effective_batch_needs():
    phases = transformer_curve(static_mib=100, optimizer_extra_mib=50, act_mib=1)
    capacity = 10_000 * MIB
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, 0.1, limit=24)
    assert result.max_micro_batch == 24
    assert max(tried) == 24


def test_nothing_fits_returns_zero_after_trying_one():
    phases = transformer_curve(static_mib=100, optimizer_extra_mib=50, act_mib=500)
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, 400 * MIB, tried), 400 * MIB, 0.1)
    assert (result.max_micro_batch, result.safe_micro_batch) == (0, 0)
    assert tried == [2, 1]


def test_safe_micro_batch_leaves_the_headroom_free():
    phases = transformer_curve(static_mib=1000, optimizer_extra_mib=200, act_mib=10)
    capacity = 3_000 * MIB
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, headroom=0.2)
    safe_peak = max(phases(result.safe_micro_batch).values())
    above_peak = max(phases(result.safe_micro_batch + 1).values())
    assert safe_peak <= 0.8 * capacity < above_peak
    assert result.safe_micro_batch < result.max_micro_batch


@settings(max_examples=150, deadline=None)
@given(
    static_mib=st.integers(50, 20_000),
    optimizer_extra_mib=st.integers(0, 20_000),
    act_mib=st.floats(0.01, 500),
    bend_b=st.integers(1, 16),
    capacity_mib=st.integers(100, 200_000),
    noise_mib=st.integers(0, 2),
)
def test_any_convex_curve_gives_the_exact_maximum_in_logarithmic_trials(
    static_mib, optimizer_extra_mib, act_mib, bend_b, capacity_mib, noise_mib
):
    base = transformer_curve(static_mib, optimizer_extra_mib, act_mib, bend_b)

    def phases(b: int) -> dict[str, int]:  # allocator rounding: a little deterministic jitter
        return {k: v + (b * 7919 % 3) * noise_mib * MIB // 2 for k, v in base(b).items()}

    capacity = capacity_mib * MIB
    tried: list[int] = []
    result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, 0.1, limit=4096)
    def fits(b: int) -> bool:
        return max(phases(b).values()) <= capacity

    best = result.max_micro_batch
    # jitter can make the curve non-monotonic: "exact" means what the issue says, B fits and B+1 not
    assert best == 0 if not fits(1) else (fits(best) and (best == 4096 or not fits(best + 1)))
    assert best >= min(true_max(phases, capacity), 4096)
    assert len(tried) <= 2 * 13 + 2  # never worse than twice a plain bisection over 1..4096
    assert len(set(tried)) == len(tried), "a micro-batch was tried twice"


def test_a_right_hint_needs_three_trials_and_a_wrong_one_still_finds_the_maximum():
    phases = transformer_curve(static_mib=900, optimizer_extra_mib=700, act_mib=3)
    capacity = 4_000 * MIB
    expected = true_max(phases, capacity)
    for hint, most_trials in ((expected, 3), (expected * 2, 8), (expected // 3, 8)):
        tried: list[int] = []
        result = find_micro_batch(scripted_trial(phases, capacity, tried), capacity, 0.1, hint=hint)
        assert result.max_micro_batch == expected
        assert len(tried) <= most_trials, (hint, tried)
