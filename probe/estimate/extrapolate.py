"""Estimate a deep decoder from two shallow cuts of it, moment by moment: seconds where the full depth takes minutes.

A decoder repeats one block, or a short pattern of blocks (Gemma's sliding and global layers, an
MoE's dense and sparse ones). At every moment of the training step it holds what the embeddings,
head and loss hold, plus the same bytes for every repetition of the pattern (a *period*): weights,
gradients and optimizer state per period, and the activations saved by the periods already run.
So each moment's live bytes are a line in the number of periods, each with its own slope.

A phase's peak is the largest of its moments, a maximum of lines: extrapolating the peaks of two
cuts is not exact, since a moment that is not the peak of the shallow cuts can overtake at full
depth (up to 6 % low at micro-batch 1). So the cuts' whole traces are extrapolated instead. The
cuts hold the dense prefix, the period two and three times, and the `rest` layers the full stack
ends on (so the first and last periods are distinct). Each cut's trial records every moment
(probe/meter.py `LiveBytesMode.trace`) and where the forward leaves the first period and enters the
last, and where the backward leaves the last and enters the first (tensor hooks on those layers'
outputs). Cut at those marks, the two traces are the same moments except for the deep cut's one
inserted middle period, whose forward and backward moments are dropped: at full depth each middle
period's moment is a line in its index, so never above the same moment in the first or last period.
Every other moment is paired index to index and extrapolated to s + R·(d − s), R the periods the
full stack has more than the shallow cut; a phase's peak is the largest extrapolated moment. The
optimizer step runs one kernel per parameter list (fused, foreach), so its moments pair up too,
once the state it creates per parameter (an allocation-only climb) is read at its top. bitsandbytes'
optimizers (8-bit AdamW, Lion) update one parameter at a time, in the model's parameter order: their
`update_step` is marked where it is done with the first period's parameters and with those of the
layer before the last period, and the deep cut's stretch between (the middle period's parameters) is
dropped as its forward and backward are. QLoRA's 4-bit layers are a layer's own ops and pair up as is.

Sharded (FSDP2 over a fake group, estimate mode), each cut's trial builds its own group and model as the
full depth's does (probe/sharded_trial.py), marked as it is built: one rank's moments (its shards, the
blocks it gathers and prefetches, the gradients it reduce-scatters) pair up as the unsharded step's do.
Measured FSDP runs real ranks at full depth.

Anything that does not pair up (lengths, phases, missing marks: per-parameter optimizers whose loop
cannot be marked, such as single-tensor AdamW or Adafactor) raises `Fallback` (probe/estimate/fallback.py):
the caller runs the full depth, and the report says why. Families whose extrapolated estimate was compared
with the full depth to the byte (tests/test_extrapolate.py) are extrapolated; any other model runs at full depth.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fitprobe.probe.breakdown import as_dict
from fitprobe.probe.build import attention_facts, build_key, model_facts, prepare
from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.events import Emit, Phase, ignore, progress
from fitprobe.probe.models.load import build_model
from fitprobe.probe.models.reference import check_seq_len, hf_config, reference_fields
from fitprobe.probe.report import TrialResult
from fitprobe.probe.sharded_trial import EstimatedShardedTrial
from fitprobe.probe.spec import MAX_CAPACITY_BYTES, ProbeSpec, SpecError, format_bytes
from fitprobe.probe.trial import TrialError, TrialRunner

if TYPE_CHECKING:
    from fitprobe.probe.estimate.cuda_attention import CudaAttention
    from fitprobe.probe.allocation_log import AllocationLog
    from fitprobe.probe.models.load import LoadedModel

# compared with the full depth to the byte, per phase, with LoRA, mixed precision and checkpointing; llama,
# qwen2 and mistral also with QLoRA (nf4) and 8-bit AdamW
VERIFIED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "qwen2_moe"})
# compared with the full depth under FSDP2 (tests/test_extrapolate.py FSDP_CASES); other families shard at full depth
FSDP_VERIFIED_MODEL_TYPES = frozenset({"llama", "qwen2"})
_PLAIN = (bool, int, float, str, type(None))
# attributes that differ between layers without changing what they allocate
_POSITION_ATTRIBUTES = frozenset({"layer_idx", "layer_id"})
# the marks of one micro-step, in the order they occur: forward leaves the first period, enters the last;
# backward leaves the last period, enters the first
MARKS = ("first_forward", "last_forward", "last_backward", "first_backward")
# the marks of one optimizer step that updates parameter by parameter: done with the first period's
# parameters, done with those of the layer before the last period (none for one kernel per list)
OPTIMIZER_MARKS = ("first_optimizer", "last_optimizer")

Trial = Callable[[int], TrialResult]
Moment = tuple[str, int]  # (phase, live bytes)
IndexedMoment = tuple[str, int, int]  # (phase, live bytes, its index in the trace)


@dataclass(frozen=True)
class Cuts:
    """The full stack is `prefix` layers, whole `period`-layer repetitions, then `rest` layers of one more."""

    full_layers: int
    prefix: int
    period: int
    rest: int

    @property
    def depths(self) -> tuple[int, int]:
        shallow = self.prefix + 2 * self.period + self.rest
        return shallow, shallow + self.period

    @property
    def repeats(self) -> int:
        """How many periods the full stack has more than the shallow cut."""
        return (self.full_layers - self.depths[0]) // self.period

    def marked_layers(self, depth: int) -> tuple[int, int]:
        """(last layer of the first period, layer just before the last period) in a cut of `depth` layers."""
        return self.prefix + self.period - 1, depth - self.rest - self.period - 1


def find_pattern(signatures: Sequence[Hashable]) -> tuple[int, int] | None:
    """(prefix, period) whose cuts are shallowest: `signatures[prefix:]` repeats every `period` layers.

    None when no pattern leaves the deeper cut (prefix + 3 periods + rest) shallower than the stack.
    """
    ids: dict[Hashable, int] = {}
    layers = [ids.setdefault(s, len(ids)) for s in signatures]
    n = len(layers)
    best: tuple[int, int] | None = None
    best_depth = n
    for prefix in range(n):
        if prefix + 3 >= best_depth:
            break
        tail = layers[prefix:]
        for period in range(1, len(tail) // 4 + 1):
            if prefix + 3 * period >= best_depth:
                break
            if all(tail[i] == tail[i + period] for i in range(len(tail) - period)):
                depth = prefix + 3 * period + len(tail) % period
                if depth < best_depth:
                    best, best_depth = (prefix, period), depth
                break
    return best


@dataclass
class Trace:
    """One cut's trial: its moments, and the trace index at each mark, one per micro-step."""

    moments: list[Moment]
    marks: dict[str, list[int]] = field(default_factory=lambda: {mark: [] for mark in MARKS + OPTIMIZER_MARKS})
    log: AllocationLog | None = None  # every allocation behind the moments, when the cut was asked to log them
    # the bytes by category at each moment (probe/breakdown.py), when the meter kept them
    categories: list[tuple[int, ...]] | None = None


def _kept_segments(trace: Trace, shallow: bool) -> list[list[IndexedMoment]]:
    """The trace cut at its marks, without the stretches a middle period runs in (empty in the shallow cut).

    Raises Fallback, naming the cut, where its marks do not cut it into the stretches that pair up.
    """
    cut = "shallow cut" if shallow else "deep cut"
    counts = {len(trace.marks[mark]) for mark in MARKS}
    optimizer_marks = [trace.marks.get(mark, []) for mark in OPTIMIZER_MARKS]  # absent: one kernel per list
    optimizer_counts = {len(indices) for indices in optimizer_marks}
    if len(counts) != 1 or not counts.pop() or len(optimizer_counts) != 1:
        raise Fallback(f"{cut}: the marks on the period's layers fired "
                       f"{dict((k, len(v)) for k, v in trace.marks.items())} times")
    steps = list(zip(*(trace.marks[mark] for mark in MARKS), strict=False))
    bounds = [index for step in steps for index in step]
    if bounds != sorted(bounds):
        raise Fallback(f"{cut}: the marks on the period's layers fired out of order")
    middles = [(first_fwd, last_fwd) for first_fwd, last_fwd, _, _ in steps]
    middles += [(last_bwd, first_bwd) for _, _, last_bwd, first_bwd in steps]
    middles += list(zip(*optimizer_marks, strict=False))
    middles.sort()
    bounds = [index for middle in middles for index in middle]
    if bounds != sorted(bounds):
        raise Fallback(f"{cut}: the optimizer's marks fell inside a forward or backward stretch, or out of order")
    if shallow and any(enters != leaves for enters, leaves in middles):
        raise Fallback(f"{cut}: the shallow cut ran layers between its first and last period")
    # each moment with its index in the trace, where its categories are
    indexed = [(phase, live_bytes, index) for index, (phase, live_bytes) in enumerate(trace.moments)]
    segments, start = [], 0
    for enters, leaves in middles:
        segments.append(indexed[start:enters])
        start = leaves
    return segments + [indexed[start:]]


def _optimizer_climbs_read_at_the_top(moments: list[IndexedMoment]) -> list[IndexedMoment]:
    """Optimizer moments that only allocate (state created parameter by parameter) kept at their top."""
    return [moment for moment, after in zip(moments, moments[1:] + [("", -1)], strict=False)
            if not (moment[0] == after[0] == "optimizer" and after[1] >= moment[1])]


def extrapolate_trace(shallow: Trace, deep: Trace, repeats: int) -> dict[str, int]:
    """Each phase's peak at full depth, moment by moment; raises Fallback where the two traces do not pair up."""
    return _extrapolate(shallow, deep, repeats)[0]


def _extrapolate(shallow: Trace, deep: Trace, repeats: int) -> tuple[dict[str, int], list[int] | None]:
    """extrapolate_trace's peaks, and the bytes by category at the latest moment at the overall peak (None when
    the traces kept no categories).

    A moment's categories add up to its live bytes in both cuts, and each is extrapolated by the same line, so
    they add up to the extrapolated moment: the breakdown sums to the peak exactly, and it is the full depth's
    where each category's bytes are a line in the periods, as the live bytes are.
    """
    s_kept, d_kept = _kept_segments(shallow, True), _kept_segments(deep, False)
    peaks: dict[str, int] = {}
    peak_bytes, at_peak = -1, (0, 0)  # the overall peak and its moment's (shallow, deep) indices
    for s_segment, d_segment in zip(s_kept, d_kept, strict=False):
        s_moments, d_moments = (_optimizer_climbs_read_at_the_top(m) for m in (s_segment, d_segment))
        if len(s_moments) != len(d_moments):
            phases = sorted({m[0] for m in s_segment} | {m[0] for m in d_segment})
            raise Fallback(f"the cuts ran {len(s_moments)} and {len(d_moments)} allocating ops in the same stretch of the step "
                    f"(phases {', '.join(phases)}): the optimizer works parameter by parameter, or a layer's ops "
                    "depend on the depth")
        for (s_phase, s_bytes, s_index), (d_phase, d_bytes, d_index) in zip(s_moments, d_moments, strict=False):
            if s_phase != d_phase:
                raise Fallback(f"the cuts' moments do not pair up (phase {s_phase} against {d_phase})")
            n_bytes = s_bytes + repeats * (d_bytes - s_bytes)
            peaks[s_phase] = max(peaks.get(s_phase, 0), n_bytes)
            if n_bytes >= peak_bytes:  # the latest moment at the peak, as the meter keeps it
                peak_bytes, at_peak = n_bytes, (s_index, d_index)
    if shallow.categories is None or deep.categories is None:
        return peaks, None
    s_categories, d_categories = shallow.categories[at_peak[0]], deep.categories[at_peak[1]]
    return peaks, [s + repeats * (d - s) for s, d in zip(s_categories, d_categories, strict=True)]


def _module_signature(module: nn.Module) -> tuple:
    plain = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and k not in _POSITION_ATTRIBUTES and isinstance(v, _PLAIN)))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.requires_grad)
                    for store in (module._parameters, module._buffers) for name, t in store.items() if t is not None)
    return type(module).__qualname__, plain, tensors


def _signature(module: nn.Module, skip: str | None = None) -> tuple:
    """Everything about `module` that decides what it allocates, leaving out the subtree named `skip`."""
    return tuple((name, _module_signature(m)) for name, m in module.named_modules()
                 if skip is None or not (name == skip or name.startswith(skip + ".")))


def _layer_stack(module: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList] | None:
    """The outermost list of `n_layers` modules: the decoder's repeated blocks."""
    return next(((name, m) for name, m in module.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)


def _layer_count_key(config: Any) -> str:
    return type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")


def _cut_spec(spec: ProbeSpec, model_type: str, fields: dict[str, Any], config: Any, depth: int) -> ProbeSpec:
    """The spec with the stack cut to its first `depth` layers, uncapped (the full depth is compared later)."""
    fields = {k: v for k, v in fields.items() if k not in ("num_hidden_layers", _layer_count_key(config))}
    fields[_layer_count_key(config)] = depth
    if isinstance(getattr(config, "layer_types", None), list):
        fields["layer_types"] = list(config.layer_types[:depth])
    return spec.model_copy(update={"model": {"model_type": model_type, **fields}, "capacity_bytes": MAX_CAPACITY_BYTES,
                                   "gpu": spec.gpu, "extrapolate": False})


def check_extrapolable(spec: ProbeSpec) -> None:
    """Raises Fallback where the spec itself rules the cuts out (before any model is built).

    A build is reused across optimizers (probe/whatif.py), so this is asked again for every spec the
    build serves. Paged optimizers are not among the reasons: under fake tensors bitsandbytes makes
    their state as ordinary tensors on the fake device (its CPU branch), which the cuts count like any
    other state, and on a card the paged state holds the same bytes.
    """

    if not spec.extrapolate:
        raise Fallback("extrapolate is off (--no-extrapolate)")
    if spec.mode != "estimate":
        ranks = f" on {spec.num_devices} real ranks" if spec.sharding == "fsdp" else ""
        raise Fallback(f"{spec.mode} mode runs the real model{ranks}: extrapolation is for estimates under fake tensors")
    if isinstance(spec.model, str) and spec.model.startswith(("builtin:", "factory:")):
        raise Fallback("only Hugging Face decoders (preset:, hf:, inline configs) have a layer count to cut")
    model_type, _ = reference_fields(spec.model)
    if model_type not in VERIFIED_MODEL_TYPES:
        raise Fallback(f"model_type {model_type}: its extrapolated estimate was not compared with the full depth "
                       f"(verified: {', '.join(sorted(VERIFIED_MODEL_TYPES))})")
    if spec.sharding == "fsdp" and model_type not in FSDP_VERIFIED_MODEL_TYPES:
        raise Fallback(f"model_type {model_type} with sharding=fsdp: its extrapolated estimate was not compared with the "
                       f"full depth under FSDP (verified: {', '.join(sorted(FSDP_VERIFIED_MODEL_TYPES))})")


def plan_cuts(spec: ProbeSpec, full: nn.Module, allowed_factories: Collection[str] = ()
              ) -> tuple[Cuts, list[ProbeSpec]]:
    """The cuts and their specs; raises Fallback where the full depth must run. `full` is the model built on meta."""

    check_extrapolable(spec)
    model_type, fields = reference_fields(spec.model)
    config = hf_config(model_type, dict(fields))
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or (found := _layer_stack(full, n_layers)) is None:
        raise Fallback(f"no stack of num_hidden_layers={n_layers} layers found in the model")
    stack_name, stack = found
    layers = [_signature(layer) for layer in stack]
    pattern = find_pattern(layers)
    if pattern is None:
        raise Fallback(f"{n_layers} layers: no repeating pattern of layers leaves two cuts (its period twice and three "
                       "times) shallower than the model, so they would cost as much as the full depth")
    prefix, period = pattern
    cuts = Cuts(n_layers, prefix, period, (n_layers - prefix) % period)
    specs = [_cut_spec(spec, model_type, fields, config, depth) for depth in cuts.depths]
    around = _signature(full, skip=stack_name)
    for depth, cut_spec in zip(cuts.depths, specs, strict=False):
        cut = build_model(cut_spec, "meta", allowed_factories).module
        cut_stack = _layer_stack(cut, depth)
        if (cut_stack is None or [_signature(layer) for layer in cut_stack[1]] != layers[:depth]
                or _signature(cut, skip=cut_stack[0]) != around):
            raise Fallback(f"the model cut to {depth} layers is not the full model's first {depth} layers")
    return cuts, specs


CutTrial = Callable[[int], tuple[TrialResult, Trace]]
FullDepth = Callable[[ProbeSpec, str], Trial]  # (spec, why the cuts did not do) → the full depth's trial


class TracedCut:
    """One cut model with marks on its first and last period; `bind(spec)` is THE estimate trial on it for a
    spec of this cut (any seq_len and optimizer), recording its moments.

    Unsharded, the cut is built once and every trial runs on it. Sharded (FSDP2), a trial builds its own
    group and model, as the full depth's does (probe/sharded_trial.py): each fresh model is marked as
    it is built, and one rank's moments (its shards, the blocks it gathers, the gradients it reduces)
    are traced as the unsharded step's are.
    """

    def __init__(self, spec: ProbeSpec, cuts: Cuts, depth: int, allowed_factories: Collection[str],
                 attention: CudaAttention | None = None) -> None:
        if spec.mode != "estimate" or spec.capacity_bytes is None:
            raise SpecError(f"a cut is traced under fake tensors: its spec must be in estimate mode (got {spec.mode})")
        self.meter = EstimateMeter(spec.capacity_bytes, gpu=spec.gpu)
        # the cut runs uncapped, so its spec names no card: it counts attention as the full spec's card runs it
        self.meter.attention = attention
        self.cuts, self.depth, self.allowed_factories = cuts, depth, allowed_factories
        self.trace = Trace([])
        self.logging = False  # whether trials keep their allocation log (probe/estimate/replay.py learns sizes from it)
        self.marked_layers: dict[str, nn.Module] = {}
        self.model: LoadedModel | None = None
        if spec.sharding == "fsdp":
            self.max_seq_len = build_model(spec, "meta", allowed_factories).max_seq_len
        else:
            self.model = prepare(spec, allowed_factories, self.meter)[1]
            self.max_seq_len = self.model.max_seq_len
            self._mark(self.model)

    def _mark(self, model: LoadedModel) -> None:
        """Hooks on the last layer of the first period and on the layer before the last period."""
        stack = _layer_stack(model.module, self.depth)
        if stack is None:
            raise TrialError(f"the cut model has no stack of {self.depth} layers")
        first, last = self.cuts.marked_layers(self.depth)
        # before FSDP2's own hooks on the layer: its pre-backward hook on the output gathers the layer and
        # prefetches the one before it, which is a block in the deep cut and the root's (already gathered)
        # in the shallow one, so a mark after it would count the prefetch on one side of it only
        stack[1][first].register_forward_hook(partial(self._forward_ended, "first"), prepend=True)
        stack[1][last].register_forward_hook(partial(self._forward_ended, "last"), prepend=True)
        self.marked_layers = {"first": stack[1][first], "last": stack[1][last]}

    def _forward_ended(self, period: str, _module: nn.Module, _args: Any, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # gradient checkpointing recomputing the layer inside the backward: not a forward
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        self.trace.marks[f"{period}_forward"].append(len(self.trace.moments))
        if hidden.requires_grad:
            # the gradient w.r.t. the layer's output is ready: the backward is about to enter the layer
            hidden.register_hook(lambda _grad: self.trace.marks[f"{period}_backward"].append(len(self.trace.moments)))

    def _watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark where a per-parameter optimizer is done with each marked layer's parameters.

        bitsandbytes' optimizers create state and update one parameter at a time, so the deep cut runs
        more optimizer moments than the shallow one; parameters come in the model's order (embeddings,
        layers, norm, head), so the stretch between the two marks is the middle period's parameters,
        dropped as its forward and backward are. A middle period's moment holds the state made for the
        parameters before it, a line in its index, so it is never above the same moment of the last period.
        """
        if not _updates_parameter_by_parameter(optimizer):
            return
        ends: dict[int, list[str]] = {}
        for period, layer in self.marked_layers.items():
            trained = [p for p in layer.parameters() if p.requires_grad]
            if trained:  # a period with nothing trained leaves no mark, and the count says so
                ends.setdefault(id(trained[-1]), []).append(period)
        per_parameter: Any = optimizer  # bitsandbytes ships no types
        update_step = per_parameter.update_step

        def marked_update_step(group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
            update_step(group, p, gindex, pindex)
            for period in ends.get(id(p), ()):
                self.trace.marks[f"{period}_optimizer"].append(len(self.trace.moments))

        per_parameter.update_step = marked_update_step  # its `step` calls the instance's attribute

    def bind(self, spec: ProbeSpec) -> CutTrial:
        runner: Trial
        if spec.sharding == "fsdp":
            runner = EstimatedShardedTrial(spec, self.allowed_factories, self.meter, self._mark, self._watch_optimizer)
        else:
            assert self.model is not None, "an unsharded cut is built once, in __init__"
            # its own batches' generator, seeded as a fresh build's runner is
            unsharded = TrialRunner(spec, self.meter, self.model, self._watch_optimizer)

            def runner(micro_batch: int) -> TrialResult:
                with self.meter.tracking():
                    return unsharded(micro_batch)

        return partial(self._run, runner)

    def _run(self, runner: Trial, micro_batch: int) -> tuple[TrialResult, Trace]:
        if self.logging:  # what earlier trials left to the collector is freed before the log begins, not in it
            self.meter.release()
        self.trace = Trace(self.meter.record_trace(True))
        self.trace.categories = self.meter.trace_categories()
        self.trace.log = self.meter.record_log(True) if self.logging else None
        try:
            result = runner(micro_batch)
        finally:
            self.meter.record_trace(False)
            self.meter.record_log(False)
        if not result.fits:
            raise TrialError(f"the cut model did not run at micro-batch {micro_batch}: {result.error}")
        return result, self.trace


class ExtrapolatedTrial:
    """`trial(b)`: both cuts traced, each moment extrapolated to full depth and capped; else the full depth.

    When the traces do not pair up, this trial and every later one run the full depth, and `facts`
    (the report's model section) says why. `full_depth(spec, why)` makes that trial: by default a
    fresh build, as a single estimate has no other.
    """

    def __init__(self, spec: ProbeSpec, cuts: Cuts, shallow: CutTrial, deep: CutTrial, facts: dict[str, Any],
                 full_depth: FullDepth) -> None:
        if spec.capacity_bytes is None:
            raise SpecError("extrapolation caps the extrapolated peak at the capacity: set capacity_bytes or gpu")
        self.spec, self.cuts, self.facts = spec, cuts, facts
        self.capacity_bytes: int = spec.capacity_bytes
        self.cut_trials: tuple[CutTrial, CutTrial] | None = (shallow, deep)
        self.make_full_depth = full_depth
        self.full: Trial | None = None
        self.last_traces: tuple[Trace, Trace] | None = None  # the cuts' traces of the latest trial (probe/estimate/replay.py)

    def __call__(self, micro_batch: int) -> TrialResult:
        if self.cut_trials is None:
            assert self.full is not None, "the cuts go only once the full depth replaces them"
            return self.full(micro_batch)
        (shallow, s_trace), (_, d_trace) = (cut(micro_batch) for cut in self.cut_trials)
        self.last_traces = (s_trace, d_trace)
        try:
            return extrapolated_result(micro_batch, shallow.phase_peak_bytes, s_trace, d_trace, self.cuts.repeats,
                                       self.capacity_bytes)
        except Fallback as refused:
            self.cut_trials = None  # the cuts may go before the full depth is built
            self.facts.update(extrapolated_from_layers=None, not_extrapolated_because=refused.reason)
            self.full = self.make_full_depth(self.spec, refused.reason)
            return self.full(micro_batch)


def extrapolated_result(micro_batch: int, shallow_phase_peaks: dict[str, int], shallow: Trace, deep: Trace,
                        repeats: int, capacity_bytes: int) -> TrialResult:
    """The full depth's trial from its two cuts' traces (and the shallow cut's meter peaks, which its trace must
    hold), capped at the capacity; raises Fallback where the traces do not pair up."""
    phases, categories = _extrapolate(shallow, deep, repeats)
    if _trace_peaks(shallow) != shallow_phase_peaks:
        raise Fallback("the shallow cut's trace disagrees with its meter's phase peaks")
    peak_bytes = max(phases.values())
    if peak_bytes > capacity_bytes:
        return TrialResult(micro_batch, False, error=f"out of memory: the step's extrapolated peak "
                           f"{format_bytes(peak_bytes)} is more than the capacity {format_bytes(capacity_bytes)}")
    return TrialResult(micro_batch, True, peak_bytes, peak_bytes, 0, None, phases,
                       None if categories is None else as_dict(categories))


def _updates_parameter_by_parameter(optimizer: torch.optim.Optimizer) -> bool:
    """bitsandbytes' optimizers: `step` calls `update_step` once per parameter, in the parameters' order."""
    if not type(optimizer).__module__.startswith("bitsandbytes"):
        return False
    from bitsandbytes.optim.optimizer import Optimizer8bit

    return isinstance(optimizer, Optimizer8bit)


def _trace_peaks(trace: Trace) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for phase, live_bytes in trace.moments:
        peaks[phase] = max(peaks.get(phase, 0), live_bytes)
    return peaks


class CutModels:
    """The two cut models of one build, made once; `trial(spec)` for every spec that differs from the
    build's only in the fields a build does not read (probe/build.py BUILD_FREE: seq_len, optimizer).

    A single estimate makes one and asks it once; the what-if table (probe/whatif.py) asks it for every
    cell of a build, so its cells run the same two cuts a single estimate runs, built once.
    """

    def __init__(self, spec: ProbeSpec, cuts: Cuts, specs: list[ProbeSpec], facts: dict[str, Any],
                 allowed_factories: Collection[str], emit: Emit) -> None:
        self.key, self.cuts, self.facts = build_key(spec), cuts, facts
        self.allowed_factories = allowed_factories
        if spec.capacity_bytes is None:
            raise SpecError("estimate mode needs a capacity: set capacity_bytes (e.g. 40GiB) or gpu (a card's name)")
        self.meter = EstimateMeter(spec.capacity_bytes, gpu=spec.gpu)  # the capacity the report names
        self.cut_specs = specs
        self.traced = []
        for done, (depth, cut_spec) in enumerate(zip(cuts.depths, specs, strict=True), start=1):
            emit(progress(Phase.BUILDING_CUT, done, len(specs), f"{depth} of {cuts.full_layers} layers"))
            self.traced.append(TracedCut(cut_spec, cuts, depth, allowed_factories, self.meter.attention))

    @classmethod
    def build(cls, spec: ProbeSpec, allowed_factories: Collection[str] = (),
              emit: Emit = ignore) -> CutModels:
        """The cuts of the spec's model, built; raises Fallback where the full depth must run, SpecError as a build
        does."""

        if spec.mode != "estimate":
            raise SpecError("extrapolation is for estimate mode: a measured trial runs the real model")
        full = build_model(spec, "meta", allowed_factories, spec.capacity_bytes)  # refuses weights past the capacity
        cuts, specs = plan_cuts(spec, full.module, allowed_factories)
        facts = {**model_facts(full), "attention": attention_facts(full, spec),
                 "extrapolated_from_layers": list(cuts.depths), "not_extrapolated_because": None}
        if spec.sharding == "fsdp":
            facts["sharded_over_devices"] = spec.num_devices
        del full
        return cls(spec, cuts, specs, facts, allowed_factories, emit)

    def trial(self, spec: ProbeSpec, full_depth: FullDepth) -> tuple[Any, dict[str, Any], ExtrapolatedTrial]:
        """(meter, facts, trial) for `spec`, as a fresh `extrapolated_trial(spec)` gives them.

        The facts are this trial's own (a fallback to the full depth rewrites them); `full_depth(spec, why)`
        makes that fallback (probe/make_trial.py builds it afresh; the what-if table keeps one).
        """

        if build_key(spec) != self.key:
            raise ValueError("CutModels.trial: the spec differs from the cuts' build in more than seq_len and "
                             "optimizer; make a CutModels for it")
        check_seq_len(spec.seq_len, self.traced[0].max_seq_len)  # the check a fresh build makes
        same = {"seq_len": spec.seq_len, "optimizer": spec.optimizer}
        shallow, deep = (cut.bind(cut_spec.model_copy(update=same))
                         for cut, cut_spec in zip(self.traced, self.cut_specs, strict=True))
        facts = {**self.facts, "attention": dict(self.facts["attention"])}
        return self.meter, facts, ExtrapolatedTrial(spec, self.cuts, shallow, deep, facts, full_depth)


def extrapolated_trial(spec: ProbeSpec, allowed_factories: Collection[str], emit: Emit,
                       full_depth: FullDepth) -> tuple[Any, dict[str, Any], Trial]:
    """(meter, the full model's facts, trial) for an estimate from two cuts; raises Fallback where the full depth
    must run. `full_depth(spec, why)` is the trial it falls back to when the cuts' traces do not pair up."""
    return CutModels.build(spec, allowed_factories, emit).trial(spec, full_depth)
