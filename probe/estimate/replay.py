"""Answer a cut model's trial at any micro-batch and seq_len from one to five traced ones: the what-if table's trials.

Under fake tensors a trial is a program of allocations, frees and moments (probe/allocation_log.py: the
events' table, and the one walk by which `replay`, `split_off_optimizer` and `frees_in_order` read a log).
At another micro-batch b or seq_len s a decoder runs the same program with other sizes, and each
allocation's size is a product of its dims: b^β·q(s), q a polynomial of degree at most 2 in s (an
activation b·s·h, the attention mask b·s², a label row padded by one b·(s+1)): its *law*. A replayed
trial is one pass over the two cuts' logs in Python instead of a step under fake tensors, and it is the
trial: the same moments, marks and extrapolation (probe/estimate/extrapolate.py extrapolated_result), so the
probe's own search on it finds what `probe --estimate` finds (tests/test_whatif.py holds the table's
cells equal to single estimates, tests/test_replay.py replayed trials equal to traced ones).

Learning is one plan, tried in order until a step explains every allocation's size (a, m, z: the table's
shortest, a middle and its longest seq_len, or multiples). A step that cannot refuses with a `Fallback`;
the next step reuses the trials it traced, and after the last the trials are traced one by one.

    step        traced trials                   each allocation's law (solver)          checked by
    together    one per optimizer of a build:   outside the optimizer phase, as "from   each trial replays to itself;
                (1, a), (3, z), then (1, a)     known"; the optimizer's own: constants  a guess at (2, m)
    from known  (1, a), (3, z)                  the one law of earlier rows through     both replay to themselves;
                                                both points, or a constant              a guess at (2, m)
                                                (`laws_through`), else a guessed
                                                c·b^β·s^σ (`monomials_through`)
    from five   (1, a), (2, a), (1, m), (1, z)  β from b = 1, 2 and a quadratic in s    the four replay to
                                                through a, m, z (`fit_sizes`)           themselves; (3, z) traced

"Together" is for rows that differ only in the optimizer (`Replay.learn_together`): their forward and
backward allocate the same tensors in the same order whatever updates the weights, so the first
optimizer's trial at (1, a) and the second's at (3, z) are the two points of every allocation outside
the optimizer phase; what an optimizer allocates in its phase (state, its temporaries) is
parameter-shaped, a constant read off the optimizer's own trial. Where the optimizers' trials differ
outside that phase, each learns alone ("from known", then "from five"), reusing the trials made. "From
known" serves another setting of a model whose laws a row learned: another optimizer, checkpointing or a
4-bit base allocates activations of the same shapes; QLoRA's float32 activations are its guessed
products.

Not replayed, and traced trial by trial as before, with the reason: a program that changes with b or s
(logs that differ: the flattened collation's per-row tensors), a cut that falls back to the full depth, a
storage resized in place (FSDP2), a size none of the laws above explains. A point whose predicted size is
not a whole number of bytes is traced. When the step does not fit at (1, a), no larger b or s does (the
search and the longest-sequence bisection assume the same monotony), so those trials are answered "does
not fit" without learning the sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from fitprobe.probe.allocation_log import (
    Allocate,
    AllocationLog,
    Free,
    FreeEarlier,
    Keep,
    LogEvent,
    Moment,
    PhaseChange,
    Reclass,
    ReclassEarlier,
    Resize,
    TrialStart,
    frees_in_order,
    walk,
)
from fitprobe.probe.breakdown import ACTIVATIONS, CATEGORIES, TEMPORARIES, WEIGHTS
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.events import Emit, Phase, progress
from fitprobe.probe.estimate.extrapolate import CutModels, ExtrapolatedTrial, Trace, extrapolated_result
from fitprobe.probe.meter import round_allocation
from fitprobe.probe.report import TrialResult
from fitprobe.probe.spec import MAX_SEQ_LEN, ProbeSpec
from fitprobe.probe.trial import TrialError

Trial = Callable[[int], TrialResult]
_TOO_FEW_SEQ_LENS = "fewer than three seq_lens fit the model's context to learn the sizes from"
_RESIZED = "the log holds a storage resized in place (FSDP2): not replayed"
Point = tuple[int, int]  # (micro-batch, seq_len)


@dataclass(frozen=True)
class SizeLaw:
    """One allocation's requested bytes: b^beta · (a2·s² + a1·s + a0) / denominator."""

    beta: int
    a2: int
    a1: int
    a0: int
    denominator: int

    @classmethod
    def lowest_terms(cls, beta: int, a2: int, a1: int, a0: int, denominator: int) -> SizeLaw:
        """The law with its fraction reduced, so that two equal laws compare equal (a constant is (0, 0, 0, n, 1))."""
        divisor = math.gcd(a2, a1, a0, denominator) * (1 if denominator > 0 else -1)
        return cls(beta, a2 // divisor, a1 // divisor, a0 // divisor, denominator // divisor)

    def at(self, micro_batch: int, seq_len: int) -> int | None:
        numerator = (self.a2 * seq_len + self.a1) * seq_len + self.a0
        whole, rest = divmod(numerator * micro_batch**self.beta, self.denominator)
        return None if rest or whole < 0 else whole


def fit_sizes(by_point: dict[Point, Sequence[int]], seqs: tuple[int, int, int]) -> list[SizeLaw]:
    """Each allocation's law from its sizes at (1, a), (2, a), (1, m), (1, z); raises Fallback."""
    a, m, z = seqs
    laws = []
    # Lagrange's quadratic through (a, y_a), (m, y_m), (z, y_z), over one common integer denominator
    d_a, d_m, d_z = (a - m) * (a - z), (m - a) * (m - z), (z - a) * (z - m)
    denominator = d_a * d_m * d_z
    basis = [(denominator // d_a, m + z, m * z), (denominator // d_m, a + z, a * z), (denominator // d_z, a + m, a * m)]
    columns = zip(by_point[(1, a)], by_point[(2, a)], by_point[(1, m)], by_point[(1, z)], strict=True)
    for one, two, at_m, at_z in columns:
        if one == two:
            beta = 0
        elif two == 2 * one:
            beta = 1
        elif two == 4 * one:
            beta = 2
        else:
            raise Fallback(f"an allocation of {one} bytes at micro-batch 1 has {two} at 2: not a power of the "
                           "micro-batch")
        a2 = a1 = a0 = 0
        for y, (weight, pair_sum, pair_product) in zip((one, at_m, at_z), basis, strict=True):
            a2 += y * weight
            a1 -= y * weight * pair_sum
            a0 += y * weight * pair_product
        laws.append(SizeLaw.lowest_terms(beta, a2, a1, a0, denominator))
    return laws


def monomials_through(one: int, three: int, a: int, z: int) -> set[SizeLaw]:
    """The laws c·b^β·s^σ (β, σ at most 2) that give `one` byte at (1, a) and `three` at (3, z)."""
    laws = set()
    for beta in range(3):
        for sigma in range(3):
            if one * 3**beta * z**sigma == three * a**sigma:
                a2, a1, a0 = (one if power == sigma else 0 for power in (2, 1, 0))
                laws.add(SizeLaw.lowest_terms(beta, a2, a1, a0, a**sigma))
    return laws


def laws_through(first: Sequence[int], last: Sequence[int], known: Collection[SizeLaw], a: int, z: int
                 ) -> tuple[list[SizeLaw], bool]:
    """Each allocation's law from its sizes at (1, a) and (3, z): the one known law that gives both, a constant,
    or a plain product c·b^β·s^σ (then `guessed` is True: a third point must check it); raises Fallback."""
    by_first: dict[int | None, set[SizeLaw]] = {}
    for law in known:
        by_first.setdefault(law.at(1, a), set()).add(law)
    laws, guessed = [], False
    for one, three in zip(first, last, strict=True):
        fitting = {law for law in by_first.get(one, ()) if law.at(3, z) == three}
        if one == three:
            fitting.add(SizeLaw(0, 0, 0, one, 1))
        if not fitting:  # a tensor no other row allocates (QLoRA's float32 activations): b^β·c·s^σ?
            fitting, guessed = monomials_through(one, three, a, z), True
        if len(fitting) != 1:
            raise Fallback(f"{len(fitting)} sizes explain an allocation of {one} bytes at "
                           f"(1, {a}) and {three} at (3, {z})")
        laws.append(fitting.pop())
    return laws, guessed


def replay(log: AllocationLog, sizes: Sequence[int]
           ) -> tuple[list[tuple[str, int]], dict[str, int], list[tuple[int, ...]]]:
    """The trace's moments, the meter's phase peaks and the bytes by category at each moment, had the log's
    allocations had `sizes`.

    Does what probe/meter.py LiveBytesMode does at each event, in the same order.
    """
    replaying = _Replaying(log, sizes)
    walk(log.events, replaying)
    return replaying.moments, replaying.peaks, replaying.at_moments


class _Replaying:
    """`replay`'s reader: the meter's live bytes, phase peaks and bytes by category, with the sizes given."""

    def __init__(self, log: AllocationLog, sizes: Sequence[int]) -> None:
        self.rounded = [round_allocation(n) for n in sizes]
        self.category_of = list(log.categories)  # each allocation's category now, by number
        self.allocated = 0  # how many allocations the walk has passed
        self.live, self.phase = log.start_bytes, log.start_phase
        # before the trial's start nothing is classed: it all becomes weights there
        self.categories = [0] * len(CATEGORIES)
        self.peaks: dict[str, int] = {}
        self.moments: list[tuple[str, int]] = []
        self.at_moments: list[tuple[int, ...]] = []

    def allocate(self, event: Allocate) -> None:
        n_bytes = self.rounded[event.number]
        self.live += n_bytes
        self.categories[self.category_of[event.number]] += n_bytes
        self.allocated = event.number + 1
        if self.live > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.live

    def free(self, event: Free) -> None:
        n_bytes = self.rounded[event.number]
        self.live -= n_bytes
        self.categories[self.category_of[event.number]] -= n_bytes

    def free_earlier(self, event: FreeEarlier) -> None:
        self.live -= event.n_bytes
        self.categories[event.category] -= event.n_bytes

    def moment(self, event: Moment) -> None:
        self.moments.append((self.phase, self.live))
        self.at_moments.append(tuple(self.categories))

    def phase_change(self, event: PhaseChange) -> None:
        self.phase = event.name
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live)
        self.moments.append((self.phase, self.live))
        self.at_moments.append(tuple(self.categories))

    def trial_start(self, event: TrialStart) -> None:
        self.category_of[:self.allocated] = [WEIGHTS] * self.allocated
        self.categories = [0] * len(CATEGORIES)
        self.categories[WEIGHTS] = self.live
        self.peaks = {self.phase: self.live}
        self.moments = [(self.phase, self.live)]
        self.at_moments = [tuple(self.categories)]

    def resize(self, event: Resize) -> None:
        raise Fallback(_RESIZED)

    def reclass(self, event: Reclass) -> None:
        n_bytes = self.rounded[event.number]
        self.categories[self.category_of[event.number]] -= n_bytes
        self.categories[event.category] += n_bytes
        self.category_of[event.number] = event.category

    def reclass_earlier(self, event: ReclassEarlier) -> None:
        self.categories[event.old] -= event.n_bytes
        self.categories[event.new] += event.n_bytes

    def keep(self, event: Keep) -> None:
        kept = self.category_of[:self.allocated]
        self.category_of[:self.allocated] = [ACTIVATIONS if c == TEMPORARIES else c for c in kept]
        self.categories[ACTIVATIONS] += self.categories[TEMPORARIES]
        self.categories[TEMPORARIES] = 0


@dataclass
class _Traced:
    """One traced trial of both cuts: its result and the cuts' traces, with their logs."""

    result: TrialResult
    shallow: Trace
    deep: Trace


class Replay:
    """`trial(seq_len)`: the extrapolated trial of one (build, optimizer) at that seq_len, replayed where it can be."""

    def __init__(self, cuts: CutModels, spec: ProbeSpec, seqs: tuple[int, int, int], emit: Emit) -> None:
        self.cuts, self.spec, self.seqs, self.emit = cuts, spec, seqs, emit
        self.capacity_bytes: int = spec.capacity_bytes or 0
        self.traced: dict[Point, _Traced] = {}
        self.fits_nowhere_from: int | None = None  # a seq_len at which micro-batch 1 does not fit
        self.laws: tuple[list[SizeLaw], list[SizeLaw]] | None = None
        self.base: Point = (1, seqs[0])  # the traced point whose logs are replayed with the laws' sizes
        self.replayed = 0  # trials answered without tracing

    @classmethod
    def learn(cls, cuts: CutModels, spec: ProbeSpec, seq_lens: Sequence[int], emit: Emit,
              known: Collection[SizeLaw] = ()) -> Replay:
        """A replay of `spec`'s trials on `cuts`; raises Fallback where its trials must be traced.

        The plan's steps "from known" and "from five" (the module's table): two traced trials where the `known`
        laws (other rows' of the same table) explain every size, three where the rest are plain products, else five.
        """
        seqs = learning_seq_lens(seq_lens, cuts.traced[0].max_seq_len or MAX_SEQ_LEN)
        if seqs is None:
            raise Fallback(_TOO_FEW_SEQ_LENS)
        return cls(cuts, spec, seqs, emit)._learn_alone(known)

    def _learn_alone(self, known: Collection[SizeLaw]) -> Replay:
        """`learn` on this replay, whose traced trials (if any) are reused; laws an attempt together left are not.

        The plan's steps after "together", in order: each step's Fallback is caught here and the next runs; the
        last one's goes to the caller. A cut that does not run is a Fallback too (its trials are traced).
        """
        self.base = (1, self.seqs[0])
        *shortcuts, last = (self._learn_from_known, self._learn_from_five)
        try:
            for step in shortcuts:
                self.laws = None
                try:
                    step(known)
                    return self
                except Fallback:
                    pass  # its traced trials are kept: the next step reuses them
            self.laws = None
            last(known)
        except TrialError as exc:
            raise Fallback(str(exc)) from exc
        return self

    @classmethod
    def learn_together(cls, cuts: CutModels, specs: Sequence[ProbeSpec], seq_lens: Sequence[int], emit: Emit,
                       known: Collection[SizeLaw] = ()) -> dict[str, Replay | Fallback]:
        """Replays of one build's trials with each of `specs`' optimizers (by optimizer), from one traced trial each
        (the plan's step "together", the module's table); an optimizer whose trials must be traced has the
        Fallback that says why instead. Where the optimizers' trials do not line up, each learns alone, reusing
        the trials made. When the first does not fit at (1, a), it fits nowhere larger and the others learn
        without it.
        """
        seqs = learning_seq_lens(seq_lens, cuts.traced[0].max_seq_len or MAX_SEQ_LEN)
        if seqs is None:
            return {spec.optimizer: Fallback(_TOO_FEW_SEQ_LENS) for spec in specs}
        made = [cls(cuts, spec, seqs, emit) for spec in specs]
        if len(made) > 1:
            try:
                first = made[0]
                if not first._trace(1, seqs[0], 1, len(made)).result.fits:  # nothing larger fits: no laws to learn
                    first.fits_nowhere_from = seqs[0]
                    return {first.spec.optimizer: first, **cls.learn_together(cuts, specs[1:], seq_lens, emit, known)}
                cls._learn_together(made, known)
                return {replay.spec.optimizer: replay for replay in made}
            except Fallback:
                pass  # each learns alone
            except TrialError as exc:
                return {spec.optimizer: Fallback(str(exc)) for spec in specs}
        learned: dict[str, Replay | Fallback] = {}
        for replay in made:
            try:
                learned[replay.spec.optimizer] = replay._learn_alone(known)
            except Fallback as refused:
                learned[replay.spec.optimizer] = refused
        return learned

    @staticmethod
    def _learn_together(made: Sequence[Replay], known: Collection[SizeLaw]) -> None:
        """The plan's first step for `made`, one replay per optimizer of a build (the module's table); raises Fallback."""
        first = made[0]
        a, m, z = first.seqs
        points: list[Point] = [(1, a), (3, z), *([(1, a)] * (len(made) - 2))]
        traced = [replay._trace(*point, done, len(made))
                  for done, (replay, point) in enumerate(zip(made, points, strict=True), 1)]
        logs = [replay._logs(point) for replay, point in zip(made, points, strict=True)]
        splits = [[split_off_optimizer(log, trace.marks) for log, trace in zip(cut_logs, (one.shallow, one.deep),
                                                                                 strict=True)]
                  for cut_logs, one in zip(logs, traced, strict=True)]
        cut_laws: list[list[SizeLaw]] = []
        guessed = False
        for cut in (0, 1):
            anchor = splits[0][cut]
            if any(row[cut].skeleton != anchor.skeleton or row[cut].marks != anchor.marks for row in splits[1:]):
                raise Fallback("the optimizers' trials differ outside the optimizer's own allocations")
            sizes = [[cut_logs[cut].sizes[n] for n in row[cut].shared] for cut_logs, row in zip(logs, splits, strict=True)]
            if any(other != sizes[0] for other in sizes[2:]):  # a third optimizer's trial is at (1, a) too
                raise Fallback("the optimizers' shared allocations differ in size at the same point")
            laws, cut_guessed = laws_through(sizes[0], sizes[1], known, a, z)
            cut_laws.append(laws)
            guessed = guessed or cut_guessed
        for replay, point, cut_logs, row in zip(made, points, logs, splits, strict=True):
            per_cut = []
            for cut in (0, 1):
                laws = [SizeLaw(0, 0, 0, size, 1) for size in cut_logs[cut].sizes]  # the optimizer's own: constants
                for index, number in enumerate(row[cut].shared):
                    laws[number] = cut_laws[cut][index]
                per_cut.append(laws)
            replay.laws, replay.base = (per_cut[0], per_cut[1]), point
            if replay._replayed(*point) != replay.traced[point].result:
                raise Fallback("replaying a traced trial's own log does not give its result")
        if guessed:  # a law read off two points is checked at a third
            first._validate(2, m, len(made) + 1, len(made) + 1)

    def _learn_from_five(self, known: Collection[SizeLaw] = ()) -> None:
        """The plan's last step: each allocation's law from four traced trials, a fifth to check (`fit_sizes`)."""
        a, m, z = self.seqs
        points: list[Point] = [(1, a), (2, a), (1, m), (1, z), (3, z)]
        first = self._trace(1, a, 1, len(points))
        if not first.result.fits:  # nothing larger fits either: no sizes to learn
            self.fits_nowhere_from = a
            return
        for done, (micro_batch, seq_len) in enumerate(points[1:4], start=2):
            self._trace(micro_batch, seq_len, done, len(points))
        self._same_program(points[:4])
        logs = [[self._logs(point)[cut] for point in points[:4]] for cut in (0, 1)]
        laws = tuple(fit_sizes({point: log.sizes for point, log in zip(points, cut_logs, strict=False)}, self.seqs)
                     for cut_logs in logs)
        self.laws = (laws[0], laws[1])
        for point in points[:4]:  # the logs replay to the traces they came from
            if self._replayed(*point) != self.traced[point].result:
                raise Fallback("replaying a traced trial's own log does not give its result")
        self._validate(3, z, 5, len(points))

    def _learn_from_known(self, known: Collection[SizeLaw]) -> None:
        """Each allocation's law from two traced trials, (1, a) and (3, z), and the laws other rows learned.

        Another setting of the same model allocates tensors of the same shapes (the same activations with
        another optimizer, or with checkpointing, or over a 4-bit base): an allocation whose sizes at both
        points one known law gives, and only one, takes it; one of the same size at both is constant (an
        optimizer's state, a dequantized weight). Anything else, or a replay that does not give both traced
        results, and the sizes are learned from five trials.
        """
        a, _, z = self.seqs
        if not self._trace(1, a, 1, 2).result.fits:
            self.fits_nowhere_from = a
            return
        self._trace(3, z, 2, 2)
        self._same_program([(1, a), (3, z)])
        laws, guessed = [], False
        for first_log, last_log in zip(self._logs((1, a)), self._logs((3, z)), strict=True):
            cut_laws, cut_guessed = laws_through(first_log.sizes, last_log.sizes, known, a, z)
            laws.append(cut_laws)
            guessed = guessed or cut_guessed
        self.laws = (laws[0], laws[1])
        for point in [(1, a), (3, z)]:
            if self._replayed(*point) != self.traced[point].result:
                raise Fallback("replaying a traced trial's own log does not give its result")
        if guessed:  # a law read off two points is checked at a third
            self._validate(2, self.seqs[1], 3, 3)

    def _same_program(self, points: Sequence[Point]) -> None:
        """The traced trials at `points` ran the same events (frees in a canonical order) and marks."""
        first = self.traced[points[0]]
        for cut in (0, 1):
            logs = [self._logs(point)[cut] for point in points]
            programs = [frees_in_order(log.events) for log in logs]  # the logs themselves stay as traced
            if any(program != programs[0] or log.start_bytes != logs[0].start_bytes
                   for program, log in zip(programs[1:], logs[1:], strict=True)):
                raise Fallback("the step's allocations change with the micro-batch or seq_len")
        if any(self.traced[point].shallow.marks != first.shallow.marks
               or self.traced[point].deep.marks != first.deep.marks for point in points[1:]):
            raise Fallback("the marks on the period's layers move with the micro-batch or seq_len")

    def _validate(self, micro_batch: int, seq_len: int, done: int, total: int) -> None:
        """Trace (micro_batch, seq_len): the same events as at (1, a), every size as the laws predict, the same result."""
        assert self.laws is not None
        predicted = self._replayed(micro_batch, seq_len)
        traced = self._trace(micro_batch, seq_len, done, total)
        for log, base_log, laws in zip(self._logs((micro_batch, seq_len)), self._logs(self.base), self.laws,
                                       strict=True):
            if frees_in_order(log.events) != frees_in_order(base_log.events):
                raise Fallback(f"the step's allocations at micro-batch {micro_batch}, seq_len {seq_len} are "
                               f"not those at {self.base[0]}, {self.base[1]}")
            if [law.at(micro_batch, seq_len) for law in laws] != log.sizes:
                raise Fallback(f"the sizes learned do not predict those at micro-batch {micro_batch}, "
                               f"seq_len {seq_len}")
        if traced.result != predicted:
            raise Fallback(f"the replay does not predict the trial at micro-batch {micro_batch}, seq_len {seq_len}")

    def _logs(self, point: Point) -> tuple[AllocationLog, AllocationLog]:
        traced = self.traced[point]
        if traced.shallow.log is None or traced.deep.log is None:
            raise Fallback("the cuts kept no allocation log")
        return traced.shallow.log, traced.deep.log

    def _extrapolated(self, seq_len: int) -> ExtrapolatedTrial:
        def refuse(_spec: ProbeSpec, why: str):
            raise Fallback(why)

        return self.cuts.trial(self.spec.model_copy(update={"seq_len": seq_len}), refuse)[2]

    def _trace(self, micro_batch: int, seq_len: int, done: int, total: int) -> _Traced:
        if (micro_batch, seq_len) in self.traced:
            return self.traced[(micro_batch, seq_len)]
        self.emit(progress(Phase.TRACING_SIZES, done, total, f"micro-batch {micro_batch} at seq_len {seq_len}"))
        trial = self._extrapolated(seq_len)
        for cut in self.cuts.traced:
            cut.logging = True
        try:
            result = trial(micro_batch)
        finally:
            for cut in self.cuts.traced:
                cut.logging = False
        assert trial.last_traces is not None, "a trial on the cuts keeps their traces"
        self.traced[(micro_batch, seq_len)] = _Traced(result, *trial.last_traces)
        return self.traced[(micro_batch, seq_len)]

    def _replayed(self, micro_batch: int, seq_len: int) -> TrialResult | None:
        """The trial at (micro_batch, seq_len) from the base point's logs; None where a size is not whole."""
        assert self.laws is not None
        traces = []
        base = self.traced[self.base]
        for log, laws, traced in zip(self._logs(self.base), self.laws, (base.shallow, base.deep), strict=True):
            sizes = [law.at(micro_batch, seq_len) for law in laws]
            if any(size is None for size in sizes):
                return None
            moments, peaks, categories = replay(log, sizes)  # type: ignore[arg-type]  # no None left
            traces.append((Trace(moments, traced.marks, categories=categories), peaks))
        (shallow, shallow_peaks), (deep, _) = traces
        try:
            return extrapolated_result(micro_batch, shallow_peaks, shallow, deep, self.cuts.cuts.repeats,
                                       self.capacity_bytes)
        except Fallback:
            return None  # traced, where the cuts' trial falls back as it sees fit

    def trial(self, seq_len: int, traced: Trial) -> Trial:
        """The trial at `seq_len`: replayed, else `traced` (the cuts' own trial at that seq_len)."""
        def run(micro_batch: int) -> TrialResult:
            known = self.traced.get((micro_batch, seq_len))
            if known is not None:
                return known.result
            if self.fits_nowhere_from is not None and seq_len >= self.fits_nowhere_from:
                self.replayed += 1
                return TrialResult(micro_batch, False, error=f"out of memory: micro-batch 1 at seq_len "
                                   f"{self.fits_nowhere_from} does not fit, so neither does this")
            result = self._replayed(micro_batch, seq_len) if self.laws is not None else None
            if result is None:
                return traced(micro_batch)
            self.replayed += 1
            return result

        return run


OPTIMIZER_PHASE = "optimizer"  # the phase probe/step.py train_step names the update's


@dataclass
class _Split:
    """A traced cut's log seen apart from its optimizer's own allocations: what optimizers of one build share."""

    shared: list[int]  # the allocations made outside the optimizer phase, by number, in order
    skeleton: list[LogEvent]  # the events without the optimizer's own, shared allocations numbered in `shared`
    marks: dict[str, list[int]]  # the marks on the period's forward and backward, counted in the kept moments


def split_off_optimizer(log: AllocationLog, marks: dict[str, list[int]]) -> _Split:
    """The log's shared part: its allocations outside the optimizer phase, their frees, the moments there, and
    the marks on the forward and backward (a per-parameter optimizer's own marks are its own)."""
    splitting = _Splitting(log.start_phase)
    walk(log.events, splitting)
    kept = splitting.kept
    if any(i >= len(kept) for name, indices in marks.items() for i in indices):
        raise Fallback("a mark lies past the trial's moments")
    shared_marks = {name: [kept[i] for i in indices] for name, indices in marks.items()
                    if not name.endswith("_optimizer")}
    return _Split(list(splitting.shared_of), frees_in_order(splitting.skeleton), shared_marks)


class _Splitting:
    """`split_off_optimizer`'s reader: what the skeleton keeps of each event, and which moments count."""

    def __init__(self, start_phase: str) -> None:
        self.phase = start_phase
        self.shared_of: dict[int, int] = {}  # an allocation outside the optimizer phase -> its number in the skeleton
        self.skeleton: list[LogEvent] = []
        self.kept = [0]  # kept[i]: moments among the first i since the trial's start that are not the optimizer's own

    def allocate(self, event: Allocate) -> None:
        if self.phase != OPTIMIZER_PHASE:
            self.shared_of[event.number] = len(self.shared_of)
            self.skeleton.append(Allocate(self.shared_of[event.number]))

    def free(self, event: Free) -> None:
        if event.number in self.shared_of:
            self.skeleton.append(Free(self.shared_of[event.number]))

    def reclass(self, event: Reclass) -> None:
        # a shared storage classed again (a gradient); the optimizer's own (its state) are its own
        if event.number in self.shared_of:
            self.skeleton.append(Reclass(self.shared_of[event.number], event.category))

    def moment(self, event: Moment) -> None:
        self.kept.append(self.kept[-1] + (self.phase != OPTIMIZER_PHASE))
        if self.phase != OPTIMIZER_PHASE:
            self.skeleton.append(event)

    def phase_change(self, event: PhaseChange) -> None:  # a phase change is a moment of both trials
        self.phase = event.name
        self.kept.append(self.kept[-1] + 1)
        self.skeleton.append(event)

    def trial_start(self, event: TrialStart) -> None:
        # the trial's start: the moments (and the marks' count) begin again at this one
        self.kept = [0, 1]
        self.skeleton.append(event)

    def resize(self, event: Resize) -> None:
        raise Fallback(_RESIZED)

    def _as_is(self, event: FreeEarlier | ReclassEarlier | Keep) -> None:
        self.skeleton.append(event)

    free_earlier = reclass_earlier = keep = _as_is


def learning_seq_lens(seq_lens: Sequence[int], context: int) -> tuple[int, int, int] | None:
    """Three distinct seq_lens to learn sizes at: the table's shortest, one between, its longest (within the
    context); with fewer than three, multiples of its longest or halves of its shortest."""
    seqs = sorted({s for s in seq_lens if s <= context})
    if not seqs:
        return None
    for extra in (2 * seqs[-1], 4 * seqs[-1], seqs[0] // 2, seqs[0] // 4):
        if len(seqs) >= 3:
            break
        if 1 <= extra <= context and extra not in seqs:
            seqs = sorted({*seqs, extra})
    if len(seqs) < 3:
        return None
    return seqs[0], seqs[len(seqs) // 2], seqs[-1]
