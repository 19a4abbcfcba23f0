"""The progress events every long step of the library announces itself through, typed.

A caller (the CLI's progress line, the service's event stream) passes `emit`; a caller that wants no
progress passes nothing and gets `ignore`. An event is a plain JSON object (a TypedDict below), so it
crosses the job's pipe, the store and the SSE wire as it is. The names (`EventType`, `Phase`) are str-valued
enums, and an event holds their values as plain str: a reader compares them with either (`event["phase"] ==
Phase.PROBING`), and no serializer meets an Enum (database drivers differ on whether they write an Enum's
name or its value). Build events with the constructors here, not dict literals, so a name cannot drift
between the module that emits it and the readers (probe/cli.py, the dashboard,
client/fitprobe_client/phases.py, which ships without this package and keeps its own copy of the names:
tests/test_events.py holds them equal).

The wire (README, "Progress events"): each event's `type` is one of `EventType`; a `phase` event names one
of `Phase` and, where the step has parts, `done`/`total`/`option`; a `trial` event is the trial's result
(probe/report.py TrialResult.to_dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Literal, TypedDict


class _Name(str, Enum):
    """A str-valued name (enum.StrEnum from Python 3.11): JSON, f-strings and str() give its value."""

    def __str__(self) -> str:
        return str(self.value)


class EventType(_Name):
    """What an event reports."""

    PHASE = "phase"  # the job entered a phase (below)
    TRIAL_STARTED = "trial_started"  # a trial at `micro_batch` began
    TRIAL = "trial"  # a trial's result: fits, peaks, breakdown, error
    VERIFY_STEP = "verify_step"  # the verification finished optimizer step `step` of `steps`
    WHATIF_CELL = "whatif_cell"  # the what-if table answered cell `done` of `total`
    RECOMMEND_CANDIDATE = "recommend_candidate"  # a recommendation answered candidate `done` of `total`
    BATCH_TRIAL = "batch_trial"  # a trial of the evaluation or generation search (`search`: which one)


class Phase(_Name):
    """Where a job is, in the order a job passes them (a probe skips those its spec does not ask for)."""

    QUEUED = "queued"  # the store: waiting for a free device
    SCHEDULING = "scheduling"  # the Ray executor: asked the cluster for `devices`
    PLACED = "placed"  # the local executor: the job's process runs on a device
    BUILDING_MODEL = "building_model"
    BUILDING_CUT = "building_cut"  # an estimate's two shallow cuts (probe/estimate/extrapolate.py)
    TRACING_SIZES = "tracing_sizes"  # the what-if table learning size laws (probe/estimate/replay.py)
    ESTIMATING = "estimating"
    PROBING = "probing"  # the search for the largest micro-batch; `trial` events follow
    SIZING_THE_STEP = "sizing_the_step"  # does not fit: what micro-batch 1 needs under each saving setting
    COUNTING_FLOPS = "counting_flops"  # a recommendation counting each build's step FLOPs (probe/estimate/flops.py)
    RECOMMENDING = "recommending"  # does not fit: the cheapest combination of settings that fits (probe/recommend.py)
    PROBED = "probed"  # the search's answer: `max_micro_batch`, `safe_micro_batch`
    EVALUATION = "evaluation"  # --eval: the largest eval batch beside the resident training state
    GENERATION = "generation"  # --generate: the largest model.generate batch with its KV cache
    SEARCH_CACHED = "search_cached"  # a cached search (`probe_id`) answers; only the plan is trained
    PLANNING = "planning"
    PLANNED = "planned"  # the plan's `micro_batch` and `accumulation_steps`
    VERIFYING = "verifying"
    VERIFIED = "verified"  # whether the verification `passed`
    DONE = "done"  # the store: a cached answer, finished on arrival


class _PhaseNamed(TypedDict):
    type: Literal["phase"]
    phase: str  # a Phase's value


class PhaseEvent(_PhaseNamed, total=False):
    """The job entered `phase`; a step with parts says which (`done` of `total`, on `option`)."""

    done: int
    total: int
    option: str


class TrialStartedEvent(TypedDict):
    type: Literal["trial_started"]
    micro_batch: int


class VerifyStepEvent(TypedDict):
    type: Literal["verify_step"]
    step: int
    steps: int


Event = Mapping[str, Any]  # any of the events above (each a JSON object with `type`)
Emit = Callable[[Event], None]


def ignore(_: Event) -> None:
    """The default `emit`: progress nobody asked for goes nowhere."""
    return None


def phase(name: Phase, **details: Any) -> PhaseEvent:
    """A phase event with the facts the phase announces (`max_micro_batch`, `passed`, `devices` …)."""
    return {"type": "phase", "phase": name.value, **details}  # type: ignore[typeddict-item]


def progress(name: Phase, done: int, total: int, option: str) -> PhaseEvent:
    """A phase event of a step with parts: part `done` of `total`, working on `option`."""
    return {"type": "phase", "phase": name.value, "done": done, "total": total, "option": option}


def trial_started(micro_batch: int) -> TrialStartedEvent:
    return {"type": "trial_started", "micro_batch": micro_batch}


def trial(result: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's result as an event: `result` is TrialResult.to_dict() (this module imports no torch)."""
    return {"type": EventType.TRIAL.value, **result}


def verify_step(step: int, steps: int) -> VerifyStepEvent:
    return {"type": "verify_step", "step": step, "steps": steps}


def whatif_cell(done: int, total: int, setting: str, **answer: Any) -> dict[str, Any]:
    """One what-if cell answered: its `seq_len` and micro-batches, or the row's longest seq_len."""
    return {"type": EventType.WHATIF_CELL.value, "done": done, "total": total, "setting": setting, **answer}


BatchSearch = Literal["evaluation", "evaluation_steps", "generation", "generation_length"]


def batch_trial(search: BatchSearch, size: int, fits: bool, peak_allocated_bytes: int | None,
                error: str | None) -> dict[str, Any]:
    """One trial of a search after the training one: its `size` is what that search grows (the eval or generate
    batch; the eval steps whose logits are kept; the new tokens at batch 1). An estimated generation trial can
    take minutes, so each is announced as it ends, as a training trial is; the report holds them all."""
    return {"type": EventType.BATCH_TRIAL.value, "search": search, "size": size, "fits": fits,
            "peak_allocated_bytes": peak_allocated_bytes, "error": error}


def recommend_candidate(done: int, total: int, candidate: str, max_micro_batch: int | None,
                        note: str | None) -> dict[str, Any]:
    """A recommendation (probe/recommend.py) answered candidate `done` of `total`: its settings and max."""
    return {"type": EventType.RECOMMEND_CANDIDATE.value, "done": done, "total": total, "candidate": candidate,
            "max_micro_batch": max_micro_batch, "note": note}
