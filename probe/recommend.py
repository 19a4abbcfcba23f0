"""What should I run on this card? The settings that save memory, each estimated, ranked by what they cost.

`probe/needs.py` answers a failed probe one knob at a time, at micro-batch 1. A user asking which
settings to run needs the combinations: a full fine-tune of an 8B model fits an 80 GB card with pure
bf16 weights, an 8-bit optimizer and gradient checkpointing together, and none of them alone. So the
candidates are the product of the savers on each axis, kept to the user's method (full stays full,
LoRA stays LoRA) unless they allow a change, and each is answered with the max and safe micro-batch a
`probe --estimate` of its settings gives. The cells run on the what-if table's machinery
(probe/whatif.py Builds): candidates that differ only in the optimizer share one build. Their trials are
traced, not replayed (probe/estimate/replay.py): at one seq_len the traced trials that learning needs cost
more than the searches they would replay (llama-3.1-8b on an h100-80gb, 32 candidates, the same answers:
693 s replayed against 462 s traced; llama-3.2-1b 1159 s against 910 s; one pair each on the 2-core host).

The cost of a candidate is counted, not guessed:
- extra compute: the FLOPs of its step (`torch.utils.flop_counter.FlopCounterMode` over one traced
  step at micro-batch 1 under fake tensors) over those of the step as asked, less one. Checkpointing's
  share is exact: it is the recomputed forward. A decoder's count is taken on the estimate's two cuts
  and extrapolated by the layers between them (every layer repeats the same ops).
- numerics: a flag per change that alters what the step computes (pure bf16 weights, 8-bit or
  factored optimizer state, a quantized base) or what it trains (LoRA).
Ranked: candidates whose safe micro-batch is at least 1 (they keep the headroom) first, then those that fit
only in the headroom, then fewest method changes, fewest numerics flags, least extra
compute, and the larger micro-batch. NOT_MODELLED says what the ranking leaves out.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from fitprobe.probe import events
from fitprobe.probe.events import Emit, Phase, ignore
from fitprobe.probe.heap import frozen_heap
from fitprobe.probe.spec import ProbeSpec, SpecError
from fitprobe.probe.models.reference import is_hugging_face

if TYPE_CHECKING:
    from fitprobe.probe.whatif import Builds

NOT_MODELLED = ("the ranking counts FLOPs and flags numerics; it does not model kernel speed (a fused or 8-bit "
                "kernel's time per FLOP), FSDP's communication, paged optimizers' host transfers or "
                "Adafactor's convergence: no tokens/s is claimed")

# optimizers from most to least state per parameter, as users step down
OPTIMIZER_LADDER = ("adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor")
PRECISION_LADDER = ("fp32", "bf16-mixed", "bf16")

NUMERICS = {
    "precision=bf16": "pure bf16 weights: no fp32 master copy, updates rounded to bf16",
    "optimizer=adamw_bnb_8bit": "8-bit optimizer state (block-wise quantized moments)",
    "optimizer=adamw_8bit": "8-bit optimizer state (block-wise quantized moments)",
    "optimizer=paged_adamw_8bit": "8-bit optimizer state (block-wise quantized moments)",
    "optimizer=adafactor": "factored second moment (Adafactor), no first moment",
    "quantization=nf4": "quantized base weights (nf4)",
    "finetuning=lora": "trains LoRA adapters, not every weight",
}

LABELS = {
    "gradient_checkpointing": lambda v: "gradient checkpointing (--grad-checkpointing)" if v else "no checkpointing",
    "optimizer": lambda v: f"--optimizer {v}",
    "precision": lambda v: f"--precision {v}",
    "trainer": lambda v: "TRL's fused LM head (--trainer trl)" if v == "trl" else f"--trainer {v}",
    "sharding": lambda v: f"FSDP over the devices (--sharding {v})",
    "finetuning": lambda v: "LoRA (--lora)" if v == "lora" else f"--finetuning {v}",
    "quantization": lambda v: f"QLoRA base (--quantization {v})",
}


@dataclass
class Candidate:
    """One combination of settings: what `probe --estimate` of it answers, and what it costs."""

    label: str
    settings: dict[str, Any]  # the spec fields it changes from the request
    max_micro_batch: int | None = None  # None: not applicable (see note)
    safe_micro_batch: int | None = None
    peak_bytes: int | None = None
    plan: dict[str, Any] | None = None  # with an effective batch: the plan a probe of it makes
    step_flops: int | None = None  # FLOPs of one micro-step at micro-batch 1
    extra_compute: float | None = None  # step_flops over the request's, less one
    numerics: list[str] = field(default_factory=list)
    method_changed: bool = False
    note: str | None = None

    @property
    def fits(self) -> bool:
        return bool(self.max_micro_batch)

    @property
    def fits_in_headroom(self) -> bool:
        return bool(self.safe_micro_batch)

    def rank_key(self) -> tuple:
        return (not self.fits_in_headroom, not self.fits, self.method_changed, len(self.numerics),
                round(self.extra_compute or 0.0, 4), -(self.max_micro_batch or 0))


@dataclass
class Recommendation:
    model: str
    seq_len: int
    capacity_bytes: int
    candidates: list[Candidate]  # ranked, cheapest fitting first
    not_modelled: str
    wall_s: float

    @property
    def first_fitting(self) -> Candidate | None:
        return next((c for c in self.candidates if c.fits), None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "first_fitting": self.candidates.index(self.first_fitting)
                if self.first_fitting else None}


def _lighter(ladder: Sequence[str], current: str) -> list[str]:
    """`current`, then every rung below it; a value off the ladder keeps itself only where nothing is lighter."""
    if current in ladder:
        return list(ladder[ladder.index(current):])
    return [current]


def candidate_settings(spec: ProbeSpec, allow_method_change: bool = False) -> list[dict[str, Any]]:
    """Every combination of the savers the request's method allows, as spec updates; {} is the request itself.

    Ordered so that combinations sharing a build (all but the optimizer) are neighbours."""
    optimizers = _lighter(OPTIMIZER_LADDER, spec.optimizer)
    if spec.optimizer in ("adamw_torch", "paged_adamw_32bit", "lion_32bit"):  # 32-bit state: the 8-bit rungs apply
        optimizers = [spec.optimizer, *OPTIMIZER_LADDER[1:]]
    axes: dict[str, list[Any]] = {
        "gradient_checkpointing": [spec.gradient_checkpointing] + ([] if spec.gradient_checkpointing else [True]),
        "precision": _lighter(PRECISION_LADDER, spec.precision),
        "trainer": [spec.trainer] + (["trl"] if spec.trainer == "hf" and is_hugging_face(spec.model) else []),
        "sharding": [spec.sharding] + (["fsdp"] if spec.num_devices > 1 and spec.sharding == "none" else []),
    }
    if spec.finetuning == "lora" and spec.quantization != "none":  # QLoRA: precision is the compute dtype
        axes["precision"] = [spec.precision]
    methods: list[dict[str, Any]] = [{}]
    if allow_method_change and is_hugging_face(spec.model):
        if spec.finetuning == "full":
            methods.append({"finetuning": "lora"})
        if spec.quantization == "none":
            methods.append({"finetuning": "lora", "quantization": "nf4"})
    names = list(axes)
    out = []
    for method in methods:
        for values in itertools.product(*axes.values()):
            update = {name: value for name, value in zip(names, values, strict=True) if getattr(spec, name) != value}
            if method.get("quantization") and update.get("sharding"):
                continue  # a quantized base is not sharded by fitprobe's FSDP path
            for optimizer in optimizers:
                out.append({**method, **update, **({"optimizer": optimizer} if optimizer != spec.optimizer else {})})
    return out


def label(settings: dict[str, Any]) -> str:
    if not settings:
        return "as asked"
    return " + ".join(LABELS[name](value) for name, value in settings.items() if name in LABELS
                      and not (name == "finetuning" and settings.get("quantization")))


def numerics_of(settings: dict[str, Any]) -> list[str]:
    return sorted({NUMERICS[f"{name}={value}"] for name, value in settings.items() if f"{name}={value}" in NUMERICS})


def recommend(spec: ProbeSpec, allow_method_change: bool = False, allowed_factories: Collection[str] = (),
              emit: Emit = ignore) -> Recommendation:
    """Every candidate estimated and costed, ranked cheapest fitting first."""
    started_s = time.perf_counter()
    with frozen_heap():  # each trial's collections walk only what trials made (probe/heap.py)
        base, candidates = _costed(spec, allow_method_change, allowed_factories, emit)
        builds = _builds(allowed_factories, emit)
        for done, candidate in enumerate(candidates, start=1):
            _answer(candidate, base, builds, allowed_factories)
            emit(events.recommend_candidate(done, len(candidates), candidate.label, candidate.max_micro_batch,
                                            candidate.note))
    candidates.sort(key=Candidate.rank_key)
    model = spec.model if isinstance(spec.model, str) else "hf:inline"
    assert base.capacity_bytes is not None
    return Recommendation(model, spec.seq_len, base.capacity_bytes, candidates, NOT_MODELLED,
                          round(time.perf_counter() - started_s, 3))


def cheapest_fitting(spec: ProbeSpec, allowed_factories: Collection[str] = (), emit: Emit = ignore
                     ) -> Candidate | None:
    """The first candidate `recommend` would rank, estimating only as far as needed: candidates of one cost
    are estimated together (the larger micro-batch wins among them), dearer ones only when none of them fits.

    A failed probe's answer (probe/needs.py): the method is kept, as the user asked it."""
    with frozen_heap():
        base, candidates = _costed(spec, False, allowed_factories, emit)
        builds = _builds(allowed_factories, emit)
        eating_headroom: Candidate | None = None
        for _, group in itertools.groupby(sorted(candidates, key=_cost), key=_cost):
            answered = list(group)
            for candidate in answered:
                _answer(candidate, base, builds, allowed_factories)
                emit(events.recommend_candidate(candidates.index(candidate) + 1, len(candidates), candidate.label,
                                                candidate.max_micro_batch, candidate.note))
            fitting = sorted((c for c in answered if c.fits), key=Candidate.rank_key)
            if fitting and fitting[0].fits_in_headroom:
                return fitting[0]
            eating_headroom = eating_headroom or (fitting[0] if fitting else None)
    return eating_headroom  # none keeps the headroom: the cheapest that fits at all


def _cost(candidate: Candidate) -> tuple:
    return candidate.rank_key()[2:5]


def _costed(spec: ProbeSpec, allow_method_change: bool, allowed_factories: Collection[str], emit: Emit = ignore
            ) -> tuple[ProbeSpec, list[Candidate]]:
    """The request as an estimate, and its candidates with their FLOPs and numerics counted, none estimated."""
    from fitprobe.probe.estimate.flops import step_flops

    if spec.capacity_bytes is None:
        raise SpecError("a recommendation plans for a card: give gpu (a card's name) or capacity_bytes")
    base = spec.model_copy(update={"mode": "estimate"})
    candidates = []
    flops: dict[str, int | str] = {}  # FLOPs depend on the operations a step runs, not on the optimizer's state
    updates = candidate_settings(base, allow_method_change)
    to_count = len({_flops_key(base.model_copy(update=update)) for update in updates})
    for update in updates:
        candidate = Candidate(label(update), update, numerics=numerics_of(update),
                              method_changed="finetuning" in update or "quantization" in update)
        candidate_spec = base.model_copy(update=update)
        key = _flops_key(candidate_spec)
        if key not in flops:
            emit(events.progress(Phase.COUNTING_FLOPS, len(flops) + 1, to_count, candidate.label))
            flops[key] = step_flops(candidate_spec, allowed_factories)
        counted = flops[key]
        candidate.step_flops = counted if isinstance(counted, int) else None
        candidates.append(candidate)
    asked = candidates[0].step_flops
    for candidate in candidates:
        if asked and candidate.step_flops is not None:
            candidate.extra_compute = round(candidate.step_flops / asked - 1, 6)
    return base, candidates


def _builds(allowed_factories: Collection[str], emit: Emit) -> Builds:
    """The what-if table's build cache, without seq_lens: the candidates' trials are traced, not replayed (the
    module's docstring says why)."""
    from fitprobe.probe.whatif import Builds

    return Builds(allowed_factories, emit=emit)


def _answer(candidate: Candidate, base: ProbeSpec, builds: Builds, allowed_factories: Collection[str]) -> None:
    """The candidate's max, safe micro-batch, peak and plan: what `probe --estimate` of its settings answers."""
    from fitprobe.probe.whatif import estimate_cell

    candidate_spec = base.model_copy(update=candidate.settings)
    cell = estimate_cell(candidate_spec, allowed_factories, builds)
    candidate.max_micro_batch, candidate.safe_micro_batch = cell.max_micro_batch, cell.safe_micro_batch
    candidate.peak_bytes, candidate.note = cell.peak_bytes, cell.note
    if cell.max_micro_batch and base.effective_rows is not None:
        candidate.plan = _plan(candidate_spec, cell.max_micro_batch, cell.safe_micro_batch)


def _flops_key(spec: ProbeSpec) -> str:
    """Specs whose steps run the same operations: the build without what leaves the FLOPs alone."""
    return spec.model_copy(update={"optimizer": "sgd", "precision": "bf16-mixed", "sharding": "none",
                                   "num_devices": 1, "capacity_bytes": None, "gpu": None}).model_dump_json(
        exclude={"capacity_bytes", "gpu"})


def _plan(spec: ProbeSpec, max_micro_batch: int, safe_micro_batch: int | None) -> dict[str, Any]:
    """The plan a probe of `spec` makes from this max and safe micro-batch (probe/data.py plan_facts)."""
    from fitprobe.probe.data import padded_width_ratio, plan_facts
    from fitprobe.probe.plan import make_plan, plan_limit

    assert spec.effective_rows is not None
    plan = make_plan(spec.effective_rows, plan_limit(max_micro_batch, safe_micro_batch), spec.num_devices,
                     width=padded_width_ratio(spec))
    return plan_facts(plan, spec).model_dump(mode="json")


class RecommendSpec(ProbeSpec):
    """A recommendation request (POST /v1/recommendations): the probe request whose method is kept, estimated."""

    allow_method_change: bool = Field(
        False, description="also try LoRA, then QLoRA, when the request is full fine-tuning")

    def candidate_count(self) -> int:
        """How many candidates `recommend` estimates: the door bounds the job's work by it, before any is built."""
        return len(candidate_settings(self, self.allow_method_change))

    def probe_spec(self) -> ProbeSpec:
        return ProbeSpec(**self.model_dump(exclude={"allow_method_change"}))


def run_recommend_job(spec: RecommendSpec, emit: Emit = ignore, allowed_factories: Collection[str] = ()
                      ) -> dict[str, Any]:
    """The service's recommendation job: `recommend` as `fitprobe recommend --json` prints it."""
    return recommend(spec.probe_spec(), spec.allow_method_change, allowed_factories, emit).to_dict()
