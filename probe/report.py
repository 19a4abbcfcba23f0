"""The report: what one probe found, typed once.

The pipeline (probe/job.py: build → search → plan → verify) fills it; the CLI prints it, the
service stores its JSON and answers with it (`response_model`, so the API documents every field),
the exports read its plan, the page draws it. A field that exists here exists everywhere; nothing
downstream re-parses a dict or re-derives what a section already says (a plan's `equation` is
written once, by probe/plan.py, and read by the terminal and the page alike).

Sections whose keys are facts about a model, a data file or an optimizer's implementation stay
open mappings (their keys follow what was loaded); the numbers fitprobe computes are typed.
Every section forbids unknown keys, so a key added in one place and not here fails a test, not a
user.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fitprobe_client.phases import oom_words
from fitprobe.probe import breakdown
from fitprobe.probe.spec import ProbeSpec, format_bytes


@dataclass
class TrialResult:
    """One trial's record: the search reads it, the report lists it, the trial events stream it."""

    micro_batch: int
    fits: bool
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    alloc_retries: int = 0
    step_s: float | None = None
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    # the peak by category (probe/breakdown.py), summing to peak_allocated_bytes; None where not known (CUDA, OOM)
    breakdown: dict[str, int] | None = None
    error: str | None = None
    # an OOM trial has no peak (it stopped part-way): where it stopped instead
    oom_live_bytes: int | None = None
    oom_request_bytes: int | None = None
    # a measured search that estimated first: the estimate at this micro-batch and its relative error
    estimated_peak_bytes: int | None = None
    estimate_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for people: a peak (by category where known) when it fit, where it stopped when it did not."""
        if self.fits and self.breakdown is not None and self.peak_allocated_bytes is not None:
            return f"fits, {breakdown.describe(self.peak_allocated_bytes, self.breakdown)}"
        if self.fits:
            return f"fits, peak {format_bytes(self.peak_allocated_bytes)}"
        return "out of memory" + oom_words(self.oom_live_bytes, self.oom_request_bytes)


@dataclass
class Check:
    """One verification check: its name, whether it passed, and what was seen."""

    name: str
    passed: bool
    detail: str


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def as_json(self) -> dict[str, Any]:
        """The JSON the store keeps, `--json` prints and the API answers."""
        return self.model_dump(mode="json")


class DeviceFacts(Section):
    device: str = Field(description="the torch device the trials ran on (`meta`/`cpu` for an estimate)")
    name: str = Field(description="the card's name, or what kind of estimate this is")
    total_bytes: int | None = Field(description="the device's memory; null for a CPU or an estimate")
    capacity_bytes: int | None = Field(description="the memory the search worked within")
    meter: str = Field(description="what counted the bytes: cuda-allocator, cpu-allocator or fake-tensors")
    allocator_config: str | None = Field(None, description="PYTORCH_CUDA_ALLOC_CONF during the trials")
    accuracy_note: str | None = Field(None, description="for an estimate: what its count leaves out")
    kernels: dict[str, Any] | None = Field(None, description="for an estimate for a named card: the kernels assumed")
    breakdown_note: str | None = Field(None, description="why the trials carry no breakdown of their peak "
                                       "(a measured CUDA trial); null where they do")


class Search(Section):
    max_micro_batch: int = Field(description="the largest micro-batch whose full step fit; 0 when none did")
    safe_micro_batch: int | None = Field(description="the largest that also keeps the headroom free")
    safe_micro_batch_basis: str | None = Field(description="how the safe micro-batch was chosen")
    limit: int | None = Field(description="the micro-batch the search stopped at (what the effective batch needs)")
    limit_reached: bool
    predicted_max_micro_batch: int | None
    trial_count: int
    trials: list[TrialResult] = Field(description="every trial, in the order it ran")
    estimated_max_micro_batch: int | None = Field(description="the estimate's answer that placed the first trial")
    max_tokens_per_micro_batch: int | None = Field(description="packed and flattened batches: tokens, not rows")
    safe_tokens_per_micro_batch: int | None
    step_times_trusted: bool = Field(description="false on a shared CPU host and for fake tensors: plans ignore them")
    wall_s: float


class SizingOption(Section):
    change: str = Field(description="the setting, as the command line writes it")
    settings: dict[str, Any] = Field(description="the spec fields it changes")
    needs_bytes: int = Field(description="micro-batch 1's estimated peak with the change")
    fits: bool


class CheapestFitting(Section):
    """The first candidate `fitprobe recommend` ranks (probe/recommend.py): the method kept, estimated."""

    change: str = Field(description="the settings, as the command line writes them")
    settings: dict[str, Any] = Field(description="the spec fields it changes")
    max_micro_batch: int
    safe_micro_batch: int | None
    extra_compute: float | None = Field(description="its step's FLOPs over the request's, less one")
    numerics: list[str] = Field(description="what it changes in the numbers the step computes")


class DoesNotFit(Section):
    needs_bytes: int | None = Field(description="micro-batch 1's estimated peak as asked")
    capacity_bytes: int
    device_bytes_needed: int | None = Field(description="the smallest device that fits it with the headroom kept")
    options: list[SizingOption]
    cheapest_fitting: CheapestFitting | None = Field(
        None, description="the cheapest combination of settings that fits, the method kept (fitprobe recommend)")
    message: str


class HeadroomShortfall(Section):
    micro_batch: int
    peak_bytes: int
    capacity_bytes: int
    headroom_left: float
    headroom_asked: float
    options: list[SizingOption]
    message: str


class SplitFacts(Section):
    """One split of the effective batch, with its `equation`: the one notation for it."""

    micro_batch: int
    accumulation_steps: int
    num_devices: int
    effective_batch: int
    exact: bool
    last_micro_batch: int | None = Field(description="the smaller last micro-batch of an uneven split")
    examples_per_device: int
    devices_with_one_fewer: int
    deviation_percent: float
    equation: str = Field(description="how the examples are cut, the one notation of every surface: "
                          "`64 = 4 micro × 16 accum × 1 device`; uneven: `97 = 25 micro × 4 accum × 1 device (3 × 25 + 22)`")
    uneven_note: str | None = Field(None, description="for an uneven split (a smaller last micro-batch, or devices "
                                    "with one example fewer): which frameworks cannot run it as written")


class Alternative(SplitFacts):
    relative_throughput: float = Field(description="expected throughput over the chosen plan's")


class LrGuidance(Section):
    reference_lr: float
    reference_batch: int
    linear_scaled_lr: float
    sqrt_scaled_lr: float
    note: str


class TokenBudget(Section):
    effective_batch_tokens: int
    effective_batch_tokens_asked: int
    tokens_per_row: int
    tokens_per_micro_batch: int
    equation: str = Field(description="the split in tokens: `65536 tokens = 4096 micro × 16 accum × 1 device "
                          "(rows of 1024 tokens)`")


class PlanFacts(SplitFacts):
    """The recommended split, why, what else would work, and the learning-rate guidance."""

    reason: str
    throughput_model: str
    alternatives: list[Alternative] = Field(default_factory=list)
    nearest_below: Alternative | None = None
    nearest_above: Alternative | None = None
    lr_guidance: LrGuidance | None = None
    padding_fraction: float | None = Field(None, description="padded batches of the user's data: expected padding")
    tokens: TokenBudget | None = Field(None, description="a token budget's arithmetic, in rows of seq_len")


class Verification(Section):
    passed: bool
    checks: list[Check]
    grad_rel_error: float | None
    gradient_noise_scale: float | None
    gradient_noise_note: str
    peak_reserved_bytes: int | None
    capacity_bytes: int
    step_s: float | None
    tokens_per_s: float | None
    losses: list[float | None] = Field(description="per step; null where a loss was not finite")
    steps: int
    micro_batch: int
    accumulation_steps: int
    num_devices: int
    examples_per_step: int
    input_tokens_per_step: int
    reference_split: list[int]
    batches: str = Field(description="what was trained on: synthetic rows, or the user's first rows")
    wall_s: float


class EvalSearch(Section):
    """One search of the evaluation (its batch, or its kept steps at that batch), with every trial."""

    max: int = Field(description="the largest that fits")
    safe: int = Field(description="the largest that leaves the headroom free")
    trial_count: int
    trials: list[TrialResult] = Field(description="each trial; in kept_steps its micro_batch is the step count")


class Resident(Section):
    """What a no-grad search ran beside (probe/resident.py), and the capacity that state left it."""

    resident: str = Field(description="what stays on the device while it runs")
    resident_bytes: int = Field(description="the resident state's bytes, counted before the first trial")
    capacity_bytes: int | None = Field(description="the device's capacity (null: a CUDA device without a cap)")
    capacity_left_bytes: int | None = Field(description="capacity − resident_bytes: what the batch may use")


class Evaluation(Resident):
    """`Trainer.evaluate()` beside what training keeps resident: the eval batch and the logits it keeps."""

    batch: EvalSearch = Field(description="per_device_eval_batch_size searched at one eval step")
    per_device_eval_batch_size: int = Field(description="the batch to export: the safe one (the max if none)")
    compute_metrics: bool
    eval_steps: int | None = Field(None, description="steps one evaluation takes (eval_rows over the batch)")
    kept_steps: EvalSearch | None = Field(
        None, description="with compute_metrics: the eval steps whose logits, kept on the device, still fit")
    eval_steps_fit: int | None = Field(None, description="steps before the kept logits pass the capacity")
    eval_accumulation_steps: int | None = Field(
        None, description="to export: moves the kept logits to the host in time (null: the whole set fits)")


class Generation(Resident):
    """`model.generate` (greedy) of prompts of seq_len tokens beside the resident state: the batch, and the KV
    cache it grows."""

    batch: EvalSearch = Field(description="the generate batch searched at max_new_tokens")
    prompt_tokens: int
    max_new_tokens: int
    cache_implementation: str
    cache_tokens: int = Field(description="tokens the cache holds at the end: prompt + max_new_tokens - 1")
    cache_bytes_per_sequence: int = Field(description="the cache's bytes per sequence, read from the generate trial")
    cache_bytes_per_sequence_arithmetic: int = Field(
        description="2 × layers × kv_heads × head_dim × cache_tokens × dtype bytes")
    longest_new_tokens_at_batch_1: int = Field(description="the longest generation that fits at batch 1")
    longest_limit_reached: bool = Field(
        description="longer was not tried: past the door's max_new_tokens or the model's context")


class Facts(Section):
    """What every report starts with: the spec and what ran it.

    The spec is the request model itself, so readers take its defaults from probe/spec.py, and a stored
    report whose spec this version no longer accepts fails validation as any report of another shape does."""

    spec: ProbeSpec = Field(description="the request, every field with its value (defaults written out)")
    device: DeviceFacts
    model: dict[str, Any] = Field(description="the model as built: parameters, layers, its config's facts")
    optimizer: dict[str, Any]
    quantization: dict[str, Any] | None
    trainer: dict[str, Any] | None = Field(
        None, description="whose step ran (trainer trl, liger): its loss head, its defaults and what fitprobe followed")
    versions: dict[str, str | None]


class TrialReport(Facts):
    """`fitprobe trial`: one micro-batch, as a report."""

    trial: TrialResult


class Report(Facts):
    """A probe job's answer: the search, and with an effective batch the plan and its verification."""

    search: Search
    data: dict[str, Any] | None = Field(None, description="the user's row lengths, when the spec carried them")
    does_not_fit: DoesNotFit | None = Field(None, description="when micro-batch 1 did not fit: what would")
    headroom_shortfall: HeadroomShortfall | None = Field(
        None, description="when even micro-batch 1 (which the plan then uses) eats the headroom: what would keep it")
    created_at: str
    plan: PlanFacts | None = None
    verification: Verification | None = Field(None, description="null when not run (an estimate, or --no-verify)")
    verification_note: str | None = Field(None, description="why a cached plan's verification is null, and how "
                                          "to get one")
    search_cached_from: str | None = Field(None, description="the probe whose search this answer reuses")
    placement: dict[str, Any] | None = Field(None, description="where a Ray executor ran the job")
    evaluation: Evaluation | None = Field(None, description="with eval: the evaluation batch (probe/evaluate.py)")
    generation: Generation | None = Field(None, description="with generate: the generation batch (probe/generate.py)")
