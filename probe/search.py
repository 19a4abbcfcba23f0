"""Find the largest micro-batch that fits, in as few trials as possible. Pure control logic.

Peak memory is not affine in the micro-batch b: at small b the optimizer step holds the peak
(weights + gradients + state + its temporaries), at large b the backward through the logits does.
A line through two small trials therefore predicts the wrong phase. The meter reports the peak of
each phase separately, and each phase *is* close to affine in b, so we fit one line per phase and
predict the b where the first of them reaches capacity. Real trials then confirm the prediction
(b* fits, b*+1 does not); when the prediction misses, the step away from it doubles each time and
never leaves the bracket's far half, so a bad prediction costs O(log) trials, not a walk.

Lightning's binsearch spends 13-19 trials for maxima of 100-1000; this typically spends 4.
(For people, with the trial and the meter it searches over: docs/how-a-probe-works.md.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fitprobe.probe.spec import MAX_MICRO_BATCH

FIRST_MICRO_BATCHES = (2, 4)  # b=1 sits below the bend where activations start to dominate
SCOUT_RATIO = 4


class Measured(Protocol):
    micro_batch: int
    fits: bool
    peak_reserved_bytes: int | None
    alloc_retries: int
    phase_peak_bytes: dict[str, int]


@dataclass
class SearchResult:
    max_micro_batch: int
    safe_micro_batch: int
    limit: int | None
    trials: list = field(default_factory=list)
    predicted_max: int | None = None
    safe_basis: str = "measured"


def _series(result: Measured) -> dict[str, int]:
    """The memory figures we extrapolate: each phase's peak and the overall reserved peak."""
    series = dict(result.phase_peak_bytes)
    if result.peak_reserved_bytes is not None:
        series["reserved"] = result.peak_reserved_bytes
    return series


def predict_largest(points: list[Measured], threshold_bytes: float) -> int | None:
    """Largest b whose predicted peak stays within `threshold_bytes`, from trials that fitted.

    Each series is a line through the largest measured b and one about half as large: far enough
    apart that allocator rounding is noise, near enough that a change of dominant phase below
    is out of the picture.
    """
    fitting = sorted((p for p in points if p.fits), key=lambda p: p.micro_batch)
    if len(fitting) < 2:
        return None
    top = fitting[-1]
    lower = [p for p in fitting[:-1] if p.micro_batch <= top.micro_batch / 2] or fitting[:-1]
    base = lower[-1]
    span = top.micro_batch - base.micro_batch
    top_series, base_series = _series(top), _series(base)
    best = math.inf
    for name, top_bytes in top_series.items():
        if name not in base_series:
            continue
        slope = (top_bytes - base_series[name]) / span
        if slope <= 0:
            continue
        best = min(best, top.micro_batch + math.floor((threshold_bytes - top_bytes) / slope))
    return None if best == math.inf else int(best)


def _bracket(results: dict[int, Measured], ok: Callable[[Measured], bool]) -> tuple[int, int | None]:
    """(largest b known ok, smallest b known not ok above it): everything the trials so far prove."""
    good = [b for b, r in results.items() if ok(r)]
    lo = max(good, default=0)
    bad = [b for b, r in results.items() if not ok(r) and b > lo]
    return lo, min(bad, default=None)


def _largest_ok(
    run: Callable[[int], Measured],
    results: dict[int, Measured],
    ok: Callable[[Measured], bool],
    threshold_bytes: float,
    upper: int,
    confirm_above: bool = True,
) -> int:
    """Largest b ≤ upper with ok(trial(b)), guided by the fitted curve and bounded by a bracket.

    With `confirm_above=False` a measured b that the curve calls the answer is accepted without
    trying b+1: right for the safe micro-batch, where erring one low is harmless.
    """
    step_up = step_down = 1
    while True:
        lo, hi = _bracket(results, ok)
        hi_bound = hi if hi is not None else upper + 1
        if hi_bound - lo <= 1:
            return lo
        guess = predict_largest(list(results.values()), threshold_bytes)
        if not confirm_above and guess is not None and guess <= lo and step_up == 1:
            return lo
        mid = (lo + hi_bound) // 2
        if guess is None or guess <= lo:
            # the curve says lo is the answer (or knows nothing yet): test just above, then gallop
            candidate = lo + step_up if hi is None else min(lo + step_up, max(mid, lo + 1))
            step_up *= 2
        elif guess >= hi_bound:
            candidate = max(hi_bound - step_down, mid)
            step_down *= 2
        elif guess > SCOUT_RATIO * lo and hi is None:
            # a long extrapolation from small b can miss a bend in the curve: measure halfway first
            candidate = guess // 2
        else:
            candidate = guess
        candidate = min(max(candidate, lo + 1), hi_bound - 1)
        results[candidate] = run(candidate)


def interpolate_safe(results: dict[int, Measured], ok: Callable[[Measured], bool], safe_bytes: float) -> int:
    """Largest b whose peak is proven ≤ `safe_bytes` by the trials already run.

    Each phase's peak is convex in b (a max of lines), so between two measured points it lies on
    or below their chord: where every phase's chord, plus the larger allocator overhead
    (reserved − allocated) of the two trials, stays under the threshold, b is safe without a trial.
    """
    fitting = sorted((r for r in results.values() if r.fits), key=lambda r: r.micro_batch)
    best = max((r.micro_batch for r in fitting if ok(r)), default=0)
    for low, high in itertools.pairwise(fitting):
        if not ok(low) or high.alloc_retries:
            continue
        overhead = max(_overhead(low), _overhead(high))
        span = high.micro_batch - low.micro_batch
        steps = span - 1
        for name, low_bytes in low.phase_peak_bytes.items():
            rise = high.phase_peak_bytes.get(name, low_bytes) - low_bytes
            if rise > 0:
                steps = min(steps, math.floor((safe_bytes - overhead - low_bytes) * span / rise))
        best = max(best, low.micro_batch + steps)
    return best


def _overhead(result: Measured) -> int:
    allocated = max(result.phase_peak_bytes.values(), default=0)
    return max((result.peak_reserved_bytes or allocated) - allocated, 0)


def find_micro_batch(
    trial: Callable[[int], Measured],
    capacity_bytes: int,
    headroom: float,
    limit: int | None = None,
    hint: int | None = None,
) -> SearchResult:
    """Largest micro-batch that runs (`max`) and largest that leaves `headroom` free (`safe`).

    `limit` stops the search at what the user needs (their effective batch, or their cap): a
    micro-batch beyond it would never be used, so it is never tried. `hint` (an estimate of the
    max) replaces the first two small trials by hint/2 and hint: when it is right, the line through
    them is local and the confirmation needs one more trial.
    """
    upper = min(limit or MAX_MICRO_BATCH, MAX_MICRO_BATCH)
    order: list[Measured] = []
    results: dict[int, Measured] = {}

    def run(b: int) -> Measured:
        result = trial(b)
        order.append(result)
        return result

    def fits(r: Measured) -> bool:
        return r.fits

    safe_bytes = capacity_bytes * (1.0 - headroom)

    def safe(r: Measured) -> bool:
        return r.fits and r.alloc_retries == 0 and (r.peak_reserved_bytes or 0) <= safe_bytes

    first = (max(1, hint // 2), hint) if hint and hint >= 2 * FIRST_MICRO_BATCHES[-1] else FIRST_MICRO_BATCHES
    for b in first:
        if b > upper:
            break
        results[b] = run(b)
        if not results[b].fits:
            break
    max_b = _largest_ok(run, results, fits, capacity_bytes, upper)
    predicted = predict_largest(list(results.values()), capacity_bytes)
    if max_b == 0:
        return SearchResult(0, 0, limit, order, predicted)
    safe_b = interpolate_safe(results, safe, safe_bytes)
    basis = "measured" if safe_b in results else "interpolated"
    smallest = results[min(b for b, r in results.items() if r.fits)]
    if safe_b == 0 and smallest.micro_batch > 1 and smallest.peak_reserved_bytes:
        # no trial under the safe line yet: one where peak ∝ b would put it (peak has an offset, so
        # this lands under the line), then the chord to the trials above gives the answer
        guess = max(1, math.floor(smallest.micro_batch * safe_bytes / smallest.peak_reserved_bytes))
        results[guess] = run(guess)
        safe_b = interpolate_safe(results, safe, safe_bytes)
    if safe_b == 0:
        # even that was above the safe line: look below it, with trials
        results.setdefault(max_b + 1, _NotOk(max_b + 1))
        safe_b = _largest_ok(run, results, safe, safe_bytes, max_b, confirm_above=False)
        basis = "measured"
    return SearchResult(max_b, safe_b, limit, order, predicted, basis)


@dataclass
class _NotOk:
    """Stands for 'known not to fit' above the max without a trial."""

    micro_batch: int
    fits: bool = False
    peak_reserved_bytes: int | None = None
    alloc_retries: int = 0
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
