"""Split a target effective batch into micro-batch × accumulation steps × devices. Pure arithmetic.

`effective_batch = micro_batch × accumulation_steps × num_devices`: the effective batch is the
number that matters for the result; the micro-batch is whatever memory allows.

Two rules decide the headline plan, the one every export and the pre-flight verdict use:

- **Within the safe micro-batch.** A probe's plan never uses a micro-batch above its safe micro-batch
  (the largest that keeps the headroom free). When even micro-batch 1 eats the headroom (safe 0, max
  ≥ 1), the plan runs micro-batch 1, the step that leaves the most free, and the report's
  `headroom_shortfall` says what it costs; when nothing fits (max 0) there is no plan.
- **Even when possible.** HF Trainer, Lightning, DeepSpeed and Accelerate accumulate equal
  micro-batches, so the headline is an even split (micro × accumulation × devices == effective
  exactly) whenever one exists, even when an uneven one is expected to be faster. An *uneven* split
  (full micro-batches plus a smaller last one) is exact too, since THE training step (probe/step.py)
  divides every micro-step's summed token loss by the target tokens of the whole accumulated batch,
  but only a loop that cuts the batch itself runs it: it is offered as an alternative, labelled
  (`uneven_note`), and is the headline only when no even split is exact (the effective batch is not
  a multiple of the devices).

Throughput: one optimizer step costs the sum of its micro-steps' times (the devices run in
parallel). With trustworthy measured step times we fit a per-example cost that does not rise with
the micro-batch and never extrapolate it; without (CPU hosts, estimates), we assume a fixed cost per
micro-step on top of a cost per example, which makes fewer, larger micro-steps faster.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fitprobe.probe.report import Alternative, LrGuidance, PlanFacts, Search
from fitprobe.probe.spec import MAX_EFFECTIVE_BATCH, MAX_MICRO_BATCH, SpecError

# Without measurements: a micro-step's fixed cost is this fraction of a micro-step at the max
# micro-batch. With measurements: the least fixed cost a micro-step is credited with.
ASSUMED_OVERHEAD_FRACTION = 0.1
# Plans whose expected throughput is within this fraction of the best are equal: single step
# timings are noisier than that. Among equals an even split wins (equal shapes, every framework's
# accumulation expresses it), then the fewest micro-steps, then the smaller, more balanced micro-batch.
NOISE_TOLERANCE = 0.05
MAX_ALTERNATIVES = 8
UNEVEN_NOTE = ("uneven: not every micro-batch is the same size; HF Trainer, Lightning, DeepSpeed and Accelerate "
               "accumulate equal micro-batches, so only a training loop that cuts the batch itself runs it as written")


@dataclass(frozen=True)
class Split:
    """One way to cut the effective batch: per device, full micro-batches then a remainder.

    When `effective_batch` is not a multiple of `num_devices`, the first `effective_batch mod
    num_devices` devices take one example more than the rest.
    """

    micro_batch: int
    num_devices: int
    effective_batch: int
    target_batch: int

    @property
    def per_device(self) -> tuple[int, int]:
        """(examples on each device, how many devices take one more)."""
        return divmod(self.effective_batch, self.num_devices)

    def device_micro_batches(self, rank: int) -> list[int]:
        """Micro-batch sizes device `rank` runs in one optimizer step, in order."""
        base, extra = self.per_device
        examples = base + (1 if rank < extra else 0)
        full, rest = divmod(examples, self.micro_batch)
        return [self.micro_batch] * full + ([rest] if rest else [])

    @property
    def accumulation_steps(self) -> int:
        base, extra = self.per_device
        return -(-(base + (1 if extra else 0)) // self.micro_batch)  # device 0 takes the most examples

    @property
    def even(self) -> bool:
        base, extra = self.per_device
        return extra == 0 and base % self.micro_batch == 0

    @property
    def last_micro_batch(self) -> int | None:
        """The smallest micro-batch any device runs, when it is smaller than the others; None if even."""
        if self.even:
            return None
        last = [self.device_micro_batches(rank)[-1] for rank in {0, self.num_devices - 1}]
        return min(last)

    @property
    def exact(self) -> bool:
        return self.effective_batch == self.target_batch

    @property
    def deviation_percent(self) -> float:
        return round(100.0 * (self.effective_batch - self.target_batch) / self.target_batch, 2)

    def step_time(self, micro_step_s: MicroStepTime) -> float:
        """Seconds of one optimizer step: the busiest device's micro-steps, one after another."""
        base, extra = self.per_device
        full, rest = divmod(base + (1 if extra else 0), self.micro_batch)
        return full * micro_step_s(self.micro_batch) + (micro_step_s(rest) if rest else 0.0)

    def facts(self) -> dict[str, Any]:
        """The split as the report's SplitFacts fields, its `equation` included: the one notation for a split,
        carried with it so the CLI, the page and the exports need no copy of this module."""
        base, extra = self.per_device
        return {"micro_batch": self.micro_batch, "accumulation_steps": self.accumulation_steps,
                "num_devices": self.num_devices, "effective_batch": self.effective_batch, "exact": self.exact,
                "last_micro_batch": self.last_micro_batch, "examples_per_device": base + (1 if extra else 0),
                "devices_with_one_fewer": self.num_devices - extra if extra else 0,
                "deviation_percent": self.deviation_percent, "equation": plan_equation(self),
                "uneven_note": None if self.even else UNEVEN_NOTE}


def robust_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds per micro-step, seconds per example) through timed micro-batches, both ≥ 0.

    Siegel's repeated median: for each point the median slope to the others, then the median of
    those. One trial that ran slow because the host was busy moves neither, where a least-squares
    line (or a line through the two smallest trials) would. Non-negative terms make the cost per
    example, fixed / b + per_example, non-increasing in b, as it is on real devices.
    """
    slopes = [statistics.median((t_j - t_i) / (b_j - b_i) for b_j, t_j in points if b_j != b_i)
              for b_i, t_i in points]
    per_example = max(statistics.median(slopes), 0.0)
    fixed = max(statistics.median(t - per_example * b for b, t in points), 0.0)
    if per_example == 0.0 and fixed == 0.0:
        per_example = min(t / b for b, t in points)
    return fixed, per_example


class MicroStepTime:
    """Seconds of one micro-step (forward + backward) at micro-batch b, measured or assumed.

    Measured: a robust line, fixed + per_example × b, through the timed trials, used only inside
    the measured range; outside it the cost per example is held at the range's edge, so no plan
    gains from an extrapolation (below the smallest measurement a micro-batch costs at least that
    much per example: flat is its best case, never a win). Assumed (no trustworthy timings): a fixed
    cost per micro-step on top of a cost per example, which makes fewer, larger micro-steps faster.
    """

    def __init__(self, max_micro_batch: int, measured_s: dict[int, float] | None, trusted: bool = True,
                 width: Callable[[int], float] | None = None) -> None:
        self._width = width
        points = sorted((b, s) for b, s in (measured_s or {}).items() if b >= 1 and s > 0) if trusted else []
        self._max_micro_batch = max_micro_batch
        self._line: tuple[float, float] | None = None
        self.measured_range: tuple[int, int] | None = None
        if len(points) >= 2:
            fixed, per_example = robust_line(points)
            # timing noise can hide a micro-step's fixed cost, never create one: without this floor a
            # flat fit makes 59 micro-steps of 2 look as fast as 4 of 30
            floor = ASSUMED_OVERHEAD_FRACTION * (fixed + per_example * points[-1][0])
            self._line = (max(fixed, floor), per_example)
            self.measured_range = (points[0][0], points[-1][0])
            self.source = (f"measured: micro-step times at micro-batches {[b for b, _ in points]}, a robust line "
                           f"(repeated median) never extrapolated; plans within {NOISE_TOLERANCE:.0%} of the "
                           "best count as equal")
        else:
            why = ("step times on this device are not trustworthy (a shared CPU host, or fake tensors)"
                   if not trusted else "fewer than two measured step times")
            self.source = (f"assumed ({why}): each micro-step has a fixed cost of {ASSUMED_OVERHEAD_FRACTION:.0%} "
                           "of a micro-step at the max micro-batch, so the fewest micro-steps wins")

    def __call__(self, b: int) -> float:
        """Seconds (or the assumed unit) of a micro-step of b rows; with `width`, the per-example part scaled
        by how wide a padded batch of b of the user's rows is expected to be, next to the trials' worst batch."""
        scale = self._width(b) if self._width else 1.0
        if self._line is None or self.measured_range is None:
            return ASSUMED_OVERHEAD_FRACTION + (1 - ASSUMED_OVERHEAD_FRACTION) * b / self._max_micro_batch * scale
        fixed, per_example = self._line
        low, high = self.measured_range
        edge = min(max(b, low), high)
        return b * (fixed / edge + per_example * scale)

    def extrapolated(self, b: int) -> bool:
        """True when b lies below every measured micro-batch: its time is a bound, not a measurement."""
        return self.measured_range is not None and b < self.measured_range[0]


@dataclass(frozen=True)
class Plan:
    """The recommended split (which micro-batches each device runs) and the report's record of it (why, what else
    would work, the learning-rate guidance): the record is made once, here, and read by everyone after."""

    split: Split
    record: PlanFacts

    def device_micro_batches(self, rank: int) -> list[int]:
        return self.split.device_micro_batches(rank)

    def facts(self) -> PlanFacts:
        """The plan as the report holds it (a copy: the report adds its own sections to it)."""
        return self.record.model_copy()


def _check(effective_batch: int, max_micro_batch: int, num_devices: int) -> None:
    if num_devices < 1:
        raise SpecError(f"num_devices must be at least 1 (got {num_devices})")
    if not 1 <= effective_batch <= MAX_EFFECTIVE_BATCH:
        raise SpecError(f"effective_batch must be between 1 and {MAX_EFFECTIVE_BATCH} (got {effective_batch})")
    if effective_batch < num_devices:
        raise SpecError(
            f"effective_batch ({effective_batch}) must be at least num_devices ({num_devices}): every device "
            f"needs one example per step; raise the effective batch or use at most {effective_batch} devices"
        )
    if max_micro_batch < 1:
        raise SpecError(
            f"max_micro_batch must be at least 1 (got {max_micro_batch}): if not even one example fits, "
            "lower seq_len, enable gradient checkpointing, use LoRA or bf16, or use a bigger device"
        )
    if max_micro_batch > MAX_MICRO_BATCH:
        raise SpecError(f"max_micro_batch must be at most {MAX_MICRO_BATCH} (got {max_micro_batch})")


def lr_guidance(reference_lr: float, reference_batch: int, effective_batch: int) -> LrGuidance:
    """Learning rates scaled from a known-good (lr, batch) pair. Guidance, not a rule."""
    if reference_lr <= 0 or reference_batch < 1:
        raise SpecError(f"reference_lr must be > 0 and reference_batch ≥ 1 (got {reference_lr}, {reference_batch})")
    ratio = effective_batch / reference_batch
    return LrGuidance(
        reference_lr=reference_lr, reference_batch=reference_batch, linear_scaled_lr=reference_lr * ratio,
        sqrt_scaled_lr=reference_lr * math.sqrt(ratio),
        note="guidance, not a rule: square-root scaling often suits Adam-family optimizers, linear scaling "
             "suits SGD (with warmup); confirm with a short run",
    )


def _why(best: Split, fastest_uneven: Split | None, time: MicroStepTime, only_even: bool) -> str:
    """Why the headline; `fastest_uneven` when an uneven split is expected clearly faster than it."""
    e, n = best.target_batch, best.num_devices
    if best.even:
        why = (f"{plan_equation(best)}: " + ("the only even exact split under the micro-batch limit" if only_even else
               f"an even exact split within {NOISE_TOLERANCE:.0%} of the highest expected throughput of the even "
               "splits, with the fewest micro-steps, every micro-batch the same size"))
        if fastest_uneven is not None:
            gain = best.step_time(time) / fastest_uneven.step_time(time)
            why += (f"; the uneven {plan_equation(fastest_uneven)} is expected {gain:.2f}× as fast but most "
                    "frameworks cannot run it (see the alternatives and the nearest even plans)")
        return why
    layouts = {_layout(best.device_micro_batches(rank)) for rank in range(min(n, 2))} | \
        {_layout(best.device_micro_batches(n - 1))}
    return (f"{e} is not a multiple of {n} devices, so no even split is exact. Micro-batches of "
            f"{' or '.join(sorted(layouts, reverse=True))} per device reach {e} exactly; "
            "the loss is summed per token and divided by the target tokens of the whole step, so the update "
            "equals the full-batch mean; the nearest even plans below and above are given too")


def _layout(sizes: list[int]) -> str:
    """[25, 25, 25, 22] → '3 × 25 + 22', as plan_equation writes it."""
    full = sizes.count(sizes[0])  # the remainder is always smaller than the full micro-batches
    head = f"{full} × {sizes[0]}" if full > 1 else str(sizes[0])
    return head + "".join(f" + {b}" for b in sizes[full:])


def plan_for_probe(search: Search, effective_batch: int, num_devices: int,
                   micro_steps_per_trial: int, width: Callable[[int], float] | None = None) -> Plan:
    """The plan for a probe report's search: its safe micro-batch and its measured micro-step times.

    A trial's step is `micro_steps_per_trial` micro-steps plus one optimizer update; dividing
    attributes the update to the micro-steps, which slightly favours fewer of them, as it should.
    Timings count only where the search says they are trustworthy (a GPU, not a shared CPU host).
    """
    step_s = {t.micro_batch: t.step_s / micro_steps_per_trial for t in search.trials if t.fits and t.step_s}
    return make_plan(effective_batch, plan_limit(search.max_micro_batch, search.safe_micro_batch), num_devices,
                     step_s, timings_trusted=search.step_times_trusted, width=width)


def plan_limit(max_micro_batch: int, safe_micro_batch: int | None) -> int:
    """The largest micro-batch a probe's plan may use: the safe one, or 1 when only the headroom holds even that.

    One rule for every plan a probe makes (module docstring): a step above the safe micro-batch eats the
    headroom the user asked to keep, so the max is never planned; micro-batch 1 eats the least of it.
    """
    if not max_micro_batch:
        return 0
    return safe_micro_batch or 1


def make_plan(
    effective_batch: int,
    max_micro_batch: int,
    num_devices: int = 1,
    step_s_by_micro_batch: dict[int, float] | None = None,
    reference_lr: float | None = None,
    reference_batch: int | None = None,
    timings_trusted: bool = True,
    width: Callable[[int], float] | None = None,
) -> Plan:
    """The recommended split of `effective_batch` with micro-batches ≤ `max_micro_batch`.

    `step_s_by_micro_batch` are measured seconds of one micro-step per micro-batch (the probe's
    trials), ignored unless `timings_trusted`; `width(b)`, the expected width of a padded batch of b
    of the user's rows over the trials' width, makes padding part of the cost; `reference_lr` at `reference_batch` adds
    learning-rate guidance. The same inputs always give the same plan.
    """
    _check(effective_batch, max_micro_batch, num_devices)
    if (reference_lr is None) != (reference_batch is None):
        raise SpecError("give reference_lr and reference_batch together (the lr known to work at that batch)")
    time = MicroStepTime(max_micro_batch, step_s_by_micro_batch, timings_trusted, width)
    if width:
        time.source += ("; padded batches of your data: each micro-step's per-example cost scaled by the expected "
                        "width of a batch of that many of your rows (its padding included) over the trials' width")
    per_device = -(-effective_batch // num_devices)
    top = min(max_micro_batch, per_device)

    def throughput(s: Split) -> float:
        return s.effective_batch / s.step_time(time)

    def rank(s: Split) -> tuple[float, int]:
        # equal expected throughput: the smaller micro-batch wins, it leaves more memory free
        return (-round(throughput(s), 9), s.micro_batch)

    exact = [Split(b, num_devices, effective_batch, effective_batch) for b in range(1, top + 1)]
    evens = sorted((s for s in exact if s.even), key=rank)
    uneven = sorted((s for s in exact if not s.even), key=rank)
    # the headline is a split the user's framework runs as written: an even one whenever one is exact
    headline = evens or exact
    fastest = max(throughput(s) for s in headline)
    equals = [s for s in headline if throughput(s) * (1 + NOISE_TOLERANCE) >= fastest]
    best = min(equals, key=lambda s: (time.extrapolated(s.micro_batch), not s.even, s.accumulation_steps,
                                      s.micro_batch))

    faster_uneven = uneven[0] if uneven and throughput(uneven[0]) > throughput(best) * (1 + NOISE_TOLERANCE) else None
    nearest_below = nearest_above = None
    if not best.even or faster_uneven:  # the even plans closest to the target, for a user who would rather not wait
        below, above = _nearest_even(effective_batch, top, num_devices, throughput)
        nearest_below, nearest_above = below, above

    candidates = evens[:5] + uneven[:1] + [s for s in (nearest_below, nearest_above) if s]
    best_throughput = throughput(best)
    alternatives = []
    for s in sorted({c for c in candidates if c != best}, key=rank)[:MAX_ALTERNATIVES]:
        alternatives.append(Alternative(**s.facts(), relative_throughput=round(throughput(s) / best_throughput, 3)))

    def described(s: Split | None) -> Alternative | None:
        return None if s is None else Alternative(**s.facts(),
                                                  relative_throughput=round(throughput(s) / best_throughput, 3))

    return Plan(best, PlanFacts(
        **best.facts(),
        reason=_why(best, faster_uneven, time, len(evens) == 1),
        throughput_model=time.source,
        alternatives=alternatives,
        nearest_below=described(nearest_below),
        nearest_above=described(nearest_above),
        lr_guidance=None if reference_lr is None or reference_batch is None
        else lr_guidance(reference_lr, reference_batch, effective_batch),
    ))


def _nearest_even(effective_batch: int, top: int, num_devices: int, throughput) -> tuple[Split | None, Split | None]:
    """Even splits (every micro-batch b on every device) reaching closest below and above the target."""
    below: Split | None = None
    above: Split | None = None
    for b in range(1, top + 1):
        steps_down, steps_up = divmod(effective_batch, b * num_devices)
        if steps_down >= 1 and b * steps_down * num_devices < effective_batch:
            s = Split(b, num_devices, b * steps_down * num_devices, effective_batch)
            if below is None or (s.effective_batch, throughput(s)) > (below.effective_batch, throughput(below)):
                below = s
        s = Split(b, num_devices, b * (steps_down + (1 if steps_up else 0)) * num_devices, effective_batch)
        if s.effective_batch > effective_batch and (
                above is None or (-s.effective_batch, throughput(s)) > (-above.effective_batch, throughput(above))):
            above = s
    return below, above


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _count(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _device_equation(sizes: list[int]) -> str:
    """[20, 20, 20, 4] → '64 = 3 × 20 + 4 (three micro-batches of 20, then one of 4)'."""
    total, full = sum(sizes), sizes.count(sizes[0])
    if full == len(sizes):
        return f"{total} ({_count(full)} micro-batch{'es' if full > 1 else ''} of {sizes[0]})"
    rest = sizes[-1]
    plural = "micro-batches" if full > 1 else "micro-batch"
    return f"{total} = {full} × {sizes[0]} + {rest} ({_count(full)} {plural} of {sizes[0]}, then one of {rest})"


def plan_equation(split: Split) -> str:
    """How the examples are cut, in words a person checks by eye, uneven plans included."""
    n = split.num_devices
    if split.even:  # count × size, as the uneven form: '96 = 3 × 32 (three micro-batches of 32)'
        steps, micro = split.accumulation_steps, split.micro_batch
        devices, on = (f" × {n} devices", f" on each of {n} devices") if n > 1 else ("", "")
        return (f"{split.effective_batch} = {steps} × {micro}{devices} ({_count(steps)} "
                f"micro-batch{'es' if steps > 1 else ''} of {micro}{on})")
    if n == 1:
        return _device_equation(split.device_micro_batches(0))
    layouts: dict[tuple[int, ...], list[int]] = {}
    for rank in range(n):
        layouts.setdefault(tuple(split.device_micro_batches(rank)), []).append(rank)
    parts = [f"{_device_equation(list(sizes))} on {_count(len(ranks))} device{'s' if len(ranks) > 1 else ''}"
             for sizes, ranks in layouts.items()]
    return f"{split.effective_batch} over {n} devices: " + "; ".join(parts)


def format_plan(plan: PlanFacts) -> str:
    """The plan as a few lines a person reads at a terminal; every split written as its `equation`."""
    lines = [
        f"plan: {plan.equation}  [{'exact' if plan.exact else format(plan.deviation_percent, '+.2f') + '%'}]",
        f"  why: {plan.reason}",
        f"  throughput model: {plan.throughput_model}",
    ]
    if plan.uneven_note:
        lines.append(f"  {plan.uneven_note}")
    for key, near in (("nearest below", plan.nearest_below), ("nearest above", plan.nearest_above)):
        if near:
            lines.append(f"  {key} (even): {near.equation} ({near.deviation_percent:+.2f}%)")
    if plan.alternatives:
        lines.append("  alternatives (by expected throughput):")
        rows = [(alt.equation + (" *" if alt.uneven_note else ""), str(alt.micro_batch), str(alt.accumulation_steps),
                 str(alt.num_devices), str(alt.effective_batch), f"{alt.relative_throughput:.2f}×",
                 f"{alt.deviation_percent:+.2f}%")
                for alt in plan.alternatives]
        header = ("split", "micro-batch", "accumulation", "devices", "effective", "throughput", "deviation")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("    " + "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                                             for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())
        uneven = next((alt.uneven_note for alt in plan.alternatives if alt.uneven_note), None)
        if uneven:
            lines.append(f"    * {uneven}")
    guidance = plan.lr_guidance
    if guidance:
        lines.append(f"  learning rate: linear-scaled {guidance.linear_scaled_lr:.3g}, sqrt-scaled "
                     f"{guidance.sqrt_scaled_lr:.3g} (from {guidance.reference_lr:g} at batch "
                     f"{guidance.reference_batch}); {guidance.note}")
    return "\n".join(lines)
