"""The what-if table: what must change to train this model on that card.

A probe answers one setting. Someone choosing how to fine-tune asks the question the other way
round: of the settings that change a step's memory (full / LoRA / QLoRA, gradient checkpointing,
a 32- or 8-bit optimizer, paged or not, mixed-precision or pure bf16 weights), which fit, at which
sequence lengths, with which micro-batch? Pure bf16 sits beside bf16-mixed by default because it is
how full fine-tuning of a large model fits one card (bf16 weights, an 8-bit optimizer, checkpointing:
torchtune's way), where fp32 master weights alone would not. Each cell
of the table is exactly the estimate a probe with that spec would give (the same trials, the same
search, under fake tensors), so a cell can be checked by running that probe.

The last column, the longest sequence that fits at micro-batch 1, is a bisection over seq_len on
a grid of SEQ_GRID tokens (and the model's context itself): a step's memory grows with seq_len, so
one trial per halving, about log2(context / SEQ_GRID) of them. The table's own cells bound it first.

Building the model is most of a single estimate's time, and the model a cell trains depends on the
model, precision, finetuning and checkpointing, not on seq_len or optimizer: `Builds` keeps the
last build and every cell, and every longest-sequence trial, whose spec differs from it only there
runs on it. The build is what a single estimate runs: for a decoder extrapolation is proven on, its
two shallow cuts (probe/estimate/extrapolate.py CutModels), else the full depth; each cell says which. Reusing
it is what a probe's own search already does between its trials (each trial creates its optimizer
and batches and frees them, gradients set to None), so a cell still answers what a fresh
`probe --estimate` of its setting answers; tests/test_whatif.py holds them equal.

On the cuts, the trials themselves are shared too: one to five traced trials per (build, optimizer)
teach probe/estimate/replay.py every allocation's size as a function of micro-batch and seq_len (one each where
the build's optimizers learn together, two where laws earlier rows learned explain the sizes), and every
other trial of those rows (each cell's search, the longest-sequence bisection) is replayed from their logs.

The table's shape (its rows' settings, its cells, its text) is probe/whatif_table.py, which needs no torch.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fitprobe.probe.build import Trial, build_key, prepare
from fitprobe.probe.heap import frozen_heap, settle
from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.events import Emit, ignore, whatif_cell
from fitprobe.probe.estimate.extrapolate import CutModels, check_extrapolable
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.meter import Meter
from fitprobe.probe.models.load import LoadedModel, build_model
from fitprobe.probe.models.reference import check_seq_len
from fitprobe.probe.search import find_micro_batch
from fitprobe.probe.spec import MAX_SEQ_LEN, ProbeSpec, SpecError
from fitprobe.probe.estimate.replay import Replay, SizeLaw
from fitprobe.probe.report import TrialResult
from fitprobe.probe.trial import TrialRunner
from fitprobe.probe.whatif_table import SEQ_GRID, Cell, Longest, Row, Setting, WhatIf, default_precisions, settings_grid


def _cell_spec(base: ProbeSpec, setting: Setting, seq_len: int) -> ProbeSpec:
    return base.model_copy(update={**setting.update(), "seq_len": seq_len, "mode": "estimate"})


@dataclass
class FullDepth:
    """A build at the model's full depth: a model the estimate cannot cut, or an optimizer whose cut traces did
    not pair up."""

    meter: Meter
    model: LoadedModel


@dataclass
class _KeyBuild:
    """What one build key has made: the model alive now, and what the key's optimizers learned on its cuts.

    `model` is the state: None (nothing built yet, or the cuts dropped for a full depth), the key's CutModels,
    or its FullDepth. Two models never live at once, so going to one drops the other.
    """

    key: str
    model: CutModels | FullDepth | None = None
    cuts_refused: Fallback | None = None  # why this key's model cannot be cut: every cell runs the full depth
    replays: dict[str, Replay | Fallback] = field(default_factory=dict)  # optimizer → its replay, or why traced
    full_depth_because: dict[str, str] = field(default_factory=dict)  # optimizer → why its cut traces did not pair


class Builds:
    """`trial_for(spec)`: (meter, facts, trial) as `make_trial(spec)` gives them for an estimate, on the build
    made for the last spec when `spec` differs from it only in BUILD_FREE (seq_len, optimizer).

    A build is what a single estimate would run: the two cuts of an extrapolable decoder
    (probe/estimate/extrapolate.py CutModels), else the full depth. One build is kept, not one per key: the
    grid's rows come ordered so that the rows sharing a build (the optimizers) are neighbours, and two
    models never live at once. An optimizer whose cut traces did not pair up (one that works parameter
    by parameter) runs its later cells of the build at full depth straight away, which is where a
    fresh estimate's first trial would send it.
    """

    def __init__(self, allowed_factories: Collection[str] = (), seq_lens: Sequence[int] = (),
                 emit: Emit = ignore, optimizers: Mapping[str, Sequence[str]] | None = None) -> None:
        self.allowed_factories = allowed_factories
        self.seq_lens, self.emit = seq_lens, emit  # with seq_lens, a cut build's trials are replayed (probe/estimate/replay.py)
        # build key → the optimizers the table runs on that build: their trials are learned together
        self.optimizers = optimizers or {}
        self._known_laws: set[SizeLaw] = set()  # every allocation size law learned by this table's rows so far
        self._built: _KeyBuild | None = None  # the last spec's build key, and what it made
        self.count = 0  # builds made (a pair of cuts is one): what the reuse saves is visible

    def trial_for(self, spec: ProbeSpec) -> tuple[Meter, dict[str, Any], Trial]:
        if spec.sharding == "fsdp":  # a sharded trial builds its own model in each rank
            return make_trial(spec, self.allowed_factories)
        key = build_key(spec)
        if self._built is None or self._built.key != key:  # the old model goes before the new one is built
            self._built = _KeyBuild(key)
        built = self._built
        try:
            return self._on_cuts(spec, built)
        except Fallback as refused:  # the plain path: the full depth, with the reason in the facts
            meter, trial = self._full_depth(spec, built)
            return meter, {"extrapolated_from_layers": None, "not_extrapolated_because": refused.reason}, trial

    def _on_cuts(self, spec: ProbeSpec, built: _KeyBuild) -> tuple[Meter, dict[str, Any], Trial]:
        """trial_for's shortcut: the build's cuts (replayed where learned); raises Fallback where the cuts do not
        apply to `spec` (the spec, this build's model, or this optimizer's traces before)."""
        check_extrapolable(spec)
        if spec.optimizer in built.full_depth_because:
            raise Fallback(built.full_depth_because[spec.optimizer])
        if built.cuts_refused is not None:
            raise Fallback(built.cuts_refused.reason)
        if not isinstance(built.model, CutModels):
            built.model = None
            try:
                built.model = CutModels.build(spec, self.allowed_factories)  # raises SpecError as a build does
                self.count += 1
            except Fallback as refused:
                built.cuts_refused = refused  # the build's later cells are not cut either
            settle()  # the old build is collected, the new one frozen (probe/heap.py)
            if built.cuts_refused is not None:
                raise Fallback(built.cuts_refused.reason)
        cuts = built.model
        assert isinstance(cuts, CutModels)
        meter, facts, traced = cuts.trial(spec, lambda failed, because: self._after_cuts_failed(failed, because, built))
        replay = self._replay(cuts, spec, built)
        return meter, facts, replay.trial(spec.seq_len, traced) if isinstance(replay, Replay) else traced

    def _replay(self, cuts: CutModels, spec: ProbeSpec, built: _KeyBuild) -> Replay | Fallback:
        """The replay of this build's trials with `spec`'s optimizer, learned at its first cell; or the Fallback
        that says why its trials are traced (kept, so it is not learned again)."""
        if not self.seq_lens:
            return Fallback("no seq_lens to learn the sizes at")
        replays = built.replays
        if spec.optimizer not in replays:
            together = [o for o in self.optimizers.get(cuts.key, ()) if o not in replays]
            if spec.optimizer in together and len(together) > 1:
                specs = [spec.model_copy(update={"optimizer": optimizer}) for optimizer in together]
                replays.update(Replay.learn_together(cuts, specs, self.seq_lens, self.emit, self._known_laws))
            else:
                try:
                    replays[spec.optimizer] = Replay.learn(cuts, spec, self.seq_lens, self.emit, self._known_laws)
                except Fallback as refused:
                    replays[spec.optimizer] = refused
            for replay in replays.values():
                if isinstance(replay, Replay) and replay.laws is not None:
                    self._known_laws.update(law for cut_laws in replay.laws for law in cut_laws)
        return replays[spec.optimizer]

    def _after_cuts_failed(self, spec: ProbeSpec, because: str, built: _KeyBuild) -> Trial:
        built.full_depth_because[spec.optimizer] = because
        return self._full_depth(spec, built)[1]

    def _full_depth(self, spec: ProbeSpec, built: _KeyBuild) -> tuple[Meter, Trial]:
        if not isinstance(built.model, FullDepth):
            built.model = None  # the cuts go before the full depth is built
            built.model = FullDepth(*prepare(spec, self.allowed_factories))  # raises SpecError as a build does
            self.count += 1
            settle()
        meter, model = built.model.meter, built.model.model
        check_seq_len(spec.seq_len, model.max_seq_len)  # the check a fresh build makes
        runner = TrialRunner(spec, meter, model)  # its own batches' generator, seeded as a probe's is

        def trial(micro_batch: int) -> TrialResult:
            with meter.tracking():
                return runner(micro_batch)

        return meter, trial


def estimate_cell(spec: ProbeSpec, allowed_factories: Collection[str] = (), builds: Builds | None = None) -> Cell:
    """The max and safe micro-batch for `spec` (an estimate), found by the probe's own search."""
    builds = builds or Builds(allowed_factories)
    try:
        meter, facts, trial = builds.trial_for(spec)
    except SpecError as exc:  # QLoRA on a builtin model, a seq_len beyond the context
        return Cell(spec.seq_len, note=f"not applicable: {exc}")
    found = find_micro_batch(trial, meter.capacity_bytes, spec.headroom, spec.micro_batch_limit)
    peak = next((t.peak_allocated_bytes for t in found.trials if t.fits and t.micro_batch == found.max_micro_batch),
                None)
    return Cell(spec.seq_len, found.max_micro_batch, found.safe_micro_batch, peak,
                extrapolated_from_layers=facts.get("extrapolated_from_layers"))


def _fits_at_one(spec: ProbeSpec, builds: Builds) -> int | None:
    """Peak bytes of micro-batch 1 at spec.seq_len, or None when it does not fit."""
    _, _, trial = builds.trial_for(spec)
    result = trial(1)
    return result.peak_allocated_bytes if result.fits else None


def seq_grid(context: int) -> list[int]:
    """The seq_lens the longest-sequence search may answer: multiples of SEQ_GRID, and the context."""
    grid = list(range(SEQ_GRID, context + 1, SEQ_GRID))
    return grid if grid and grid[-1] == context else [*grid, context]


def longest_at_one(base: ProbeSpec, setting: Setting, context: int, cells: Sequence[Cell],
                   allowed_factories: Collection[str] = (), builds: Builds | None = None) -> Longest:
    """Bisect the grid for the longest seq_len whose step fits at micro-batch 1."""
    builds = builds or Builds(allowed_factories)
    grid = seq_grid(context)
    # what the table already proved: a seq_len that fits bounds from below, one that does not from above
    lo, hi = -1, len(grid)  # grid[lo] fits (or lo = -1), grid[hi] does not (or hi = len)
    for cell in cells:
        if cell.max_micro_batch is None:
            continue
        if cell.max_micro_batch >= 1:
            lo = max(lo, max((i for i, s in enumerate(grid) if s <= cell.seq_len), default=-1))
        else:
            hi = min(hi, min((i for i, s in enumerate(grid) if s >= cell.seq_len), default=len(grid)))
    peaks: dict[int, int] = {}
    trials = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            peak = _fits_at_one(_cell_spec(base, setting, grid[mid]), builds)
        except SpecError as exc:
            return Longest(None, trials=trials, note=f"not applicable: {exc}")
        trials += 1
        if peak is None:
            hi = mid
        else:
            lo, peaks[mid] = mid, peak
    if lo >= 0 and lo not in peaks:  # bounded by a table cell: its peak at micro-batch 1 is one trial away
        peaks[lo] = _fits_at_one(_cell_spec(base, setting, grid[lo]), builds) or 0
        trials += 1
    return Longest(grid[lo] if lo >= 0 else 0, grid[hi] if hi < len(grid) else None,
                   peaks.get(lo), trials)


def model_context(base: ProbeSpec, allowed_factories: Collection[str] = ()) -> int:
    """The longest seq_len the model takes (its position table), capped at what any spec allows."""
    try:
        context = build_model(base, "meta", allowed_factories).max_seq_len
    except SpecError:
        context = None
    return min(context or MAX_SEQ_LEN, MAX_SEQ_LEN)


def run_whatif(base: ProbeSpec, seq_lens: Sequence[int], settings: Sequence[Setting] | None = None,
               emit: Emit = ignore, allowed_factories: Collection[str] = (), longest_up_to: int | None = None
               ) -> WhatIf:
    """Every setting × seq_len cell, then each setting's longest sequence at micro-batch 1.

    `base` holds what stays fixed (model, capacity, collation, LoRA rank, headroom); each row overrides
    finetuning, quantization, gradient_checkpointing, optimizer and precision (without `settings`, the
    default grid at the base's precisions: default_precisions). `longest_up_to` caps the
    longest-sequence search below the model's context (a service's own largest seq_len).
    """
    with frozen_heap():  # each trial's collections walk only what trials made (probe/heap.py)
        return _whatif(base, seq_lens, settings, emit, allowed_factories, longest_up_to)


def _whatif(base: ProbeSpec, seq_lens: Sequence[int], settings: Sequence[Setting] | None, emit: Emit,
            allowed_factories: Collection[str], longest_up_to: int | None) -> WhatIf:
    capacity_bytes = base.capacity_bytes
    if capacity_bytes is None:
        raise SpecError("the what-if table needs a capacity: give gpu (a card's name) or capacity_bytes")
    started_s = time.perf_counter()
    if settings is None:
        settings = settings_grid(precisions=default_precisions(base.precision))
    settings = list(settings)
    base = base.model_copy(update={"mode": "estimate"})
    context = min(model_context(base, allowed_factories), longest_up_to or MAX_SEQ_LEN)
    total, done = len(settings) * (len(seq_lens) + 1), 0
    # the sizes are learned from the shortest grid point too, where the longest-sequence bisection may go
    optimizers: dict[str, list[str]] = {}  # each build's optimizers, in the rows' order
    for setting in settings:
        spec = _cell_spec(base, setting, base.seq_len)
        optimizers.setdefault(build_key(spec), []).append(spec.optimizer)
    builds = Builds(allowed_factories, [*seq_lens, *seq_grid(context)[:1]], emit, optimizers)
    rows = []
    for setting in settings:
        row = Row(setting, setting.label)
        for seq_len in seq_lens:
            cell = estimate_cell(_cell_spec(base, setting, seq_len), allowed_factories, builds)
            row.cells.append(cell)
            done += 1
            emit(whatif_cell(done, total, row.label, seq_len=seq_len, max_micro_batch=cell.max_micro_batch,
                             safe_micro_batch=cell.safe_micro_batch, peak_bytes=cell.peak_bytes, note=cell.note))
        if any(cell.note for cell in row.cells) and all(cell.max_micro_batch is None for cell in row.cells):
            row.longest = Longest(None, note=row.cells[0].note)
        else:
            row.longest = longest_at_one(base, setting, context, row.cells, allowed_factories, builds)
        done += 1
        emit(whatif_cell(done, total, row.label, seq_len="longest", longest_seq_len=row.longest.seq_len,
                         note=row.longest.note))
        rows.append(row)
    model = base.model if isinstance(base.model, str) else "hf:inline"
    return WhatIf(model, capacity_bytes, base.precision, list(seq_lens), context, rows,
                  round(time.perf_counter() - started_s, 3))
