"""HTTP bodies: the library's spec plus what only the service needs, with its bounds, and the error bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitprobe.probe.recommend import Candidate
from fitprobe.probe.report import PlanFacts, Report, Verification
from fitprobe.probe.whatif_table import WhatIf
from fitprobe.probe.spec import MAX_EFFECTIVE_BATCH, MAX_MICRO_BATCH, ProbeSpec


REUSE = "answer from a finished probe with the same fingerprint when there is one"
MAX_PREFLIGHT_WAIT_S = 3600


class ProbeRequest(ProbeSpec):
    """A probe job. `device` is chosen by the service (the next free worker), not by the request."""

    reuse: bool = Field(True, description=REUSE)
    verify_cached: bool = Field(
        False, description="when the cached probe's plan for this effective_batch was never trained: queue a "
        "verification-only job (the search comes from the cache, only the plan is trained) instead of answering "
        "at once with verification null",
    )


class PreflightRequest(ProbeSpec):
    """POST /v1/preflight: a probe spec that names its model, and how long to wait for the verdict."""

    model: str | dict[str, Any] = Field(
        ..., description=f"{ProbeSpec.model_fields['model'].description}; required: pre-flight never picks a model",
    )
    reuse: bool = Field(True, description=REUSE)
    timeout_s: float = Field(
        1800, gt=0, le=MAX_PREFLIGHT_WAIT_S,
        description=f"seconds to wait for the verdict (at most {MAX_PREFLIGHT_WAIT_S}); past it the answer is 504 "
        "and the probe keeps running, so a later request may find it cached",
    )

    accept_estimate: bool = Field(
        False, description='pass an estimate ("mode": "estimate": nothing trains) when its plan keeps the headroom '
        "(micro-batch within the safe micro-batch): 200 `PASS (estimated): …`; false: an estimate is 409 "
        "`FAIL: plan not verified`",
    )

    @model_validator(mode="after")
    def _has_a_batch_to_plan(self) -> PreflightRequest:
        """A verdict is about a plan, and a plan needs the batch to reach: without one the probe ran to its
        end and every answer was 409 `FAIL: the probe made no plan`, so say it now instead."""
        if self.effective_batch is None and self.effective_batch_tokens is None:
            raise ValueError("pre-flight checks the plan for a batch: give effective_batch (examples per "
                             "optimizer step) or effective_batch_tokens")
        return self

    def probe_request(self) -> ProbeRequest:
        """The probe to submit: what was sent (unset fields stay unset), verifying a cached plan."""
        return ProbeRequest(**self.model_dump(exclude_unset=True, exclude={"timeout_s", "accept_estimate"}),
                            verify_cached=True)


class Attempt(BaseModel):
    attempt: int
    trials: list[dict[str, Any]] = Field(description="that run's trial events")


class ProbeJob(BaseModel):
    """A probe job as GET /v1/probes/{id} shows it: its state, its trials so far and, once done, its report."""

    id: str
    kind: str = Field(description="probe (what-if tables live under /v1/whatif)")
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    phase: str | None = Field(None, description="the latest phase event: building_model, probing, planning, …")
    spec: dict[str, Any] | None = Field(None, description="the request, as stored; null if the record is unreadable")
    fingerprint: str | None = Field(None, description="what a cached answer must share with this request")
    device: str | None = Field(None, description="the worker that ran it")
    attempts: int = Field(0, description="runs started; a job interrupted by a restart runs again once")
    worker_pid: int | None = None
    owner: str | None = Field(None, description="the replica running it")
    lease_until: str | None = None
    cached: bool = Field(False, description="answered from an earlier probe with the same fingerprint")
    error: str | None = Field(None, description="why it failed, and what to change")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    trials: list[dict[str, Any]] = Field(default_factory=list, description="the final attempt's trial events")
    trying_micro_batch: int | None = Field(None, description="while running: the micro-batch of the trial in "
                                           "progress (started, no result yet); null otherwise")
    earlier_attempts: list[Attempt] = Field(default_factory=list)
    search_cached_from: str | None = Field(None, description="the probe whose search this job reuses")
    report: Report | None = Field(None, description="the whole report, once succeeded")
    plan: PlanFacts | None = Field(None, description="the report's plan (null without an effective batch)")
    verification: Verification | None = Field(None, description="the report's verification; null when not run")
    verification_note: str | None = None


class CompactProbe(BaseModel):
    """A list row with view=compact (app/watch.py): what a table shows, without trials and report."""

    id: str
    status: str
    phase: str | None = None
    device: str | None = None
    cached: bool = False
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    model: Any = Field(description="the model reference; hf:inline for an inline config")
    spec: dict[str, Any] = Field(description="seq_len, effective_batch, num_devices, mode, precision")
    max_micro_batch: int | None = None
    safe_micro_batch: int | None = None
    does_not_fit: bool = Field(False, description="the probe succeeded and found that even micro-batch 1 does not fit")
    trial_count: int | None = None
    plan: dict[str, Any] | None = Field(None, description="micro_batch, accumulation_steps, num_devices, "
                                        "effective_batch, last_micro_batch, exact, equation (the plan's one notation) "
                                        "and tokens_equation (a token budget's, else null)")
    verified: bool | None = None


class ProbeList(BaseModel):
    items: list[ProbeJob] | list[CompactProbe] = Field(description="full jobs, or compact rows with view=compact")
    total: int
    limit: int
    offset: int


class PlanAnswer(BaseModel):
    plan: PlanFacts


class PreflightVerdict(BaseModel):
    """POST /v1/preflight with `Accept: application/json`: the verdict line and the job behind it."""

    passed: bool = Field(..., description="true only for a plan verified by training, or with accept_estimate an "
                         "estimated plan within the headroom (status 200)")
    detail: str = Field(..., description="the verdict line, `PASS: …` or `FAIL: <reason>`, as the text/plain answer")
    job: ProbeJob | None = Field(None, description="the probe job, as GET /v1/probes/{id} gives it")


class ConfigExport(BaseModel):
    """A plan as a framework's config: `config` alone is what the framework reads, provenance beside it."""

    format: str = Field(description="the framework the config is for")
    config: dict[str, Any] = Field(description="the framework's own object, unchanged: `TrainingArguments(**config)` "
                                   "for hf")
    provenance: dict[str, Any] = Field(description="the effective batch asked and given, the probe's micro-batches, "
                                       "its verdict, and notes on settings the config cannot hold")


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: JSON true is not the integer 1

    effective_batch: int = Field(..., ge=1, le=MAX_EFFECTIVE_BATCH, description="examples per optimizer step")
    max_micro_batch: int = Field(..., ge=1, le=MAX_MICRO_BATCH, description="largest micro-batch that fits (safe)")
    num_devices: int = Field(1, ge=1, le=1024, description="data-parallel devices")
    reference_lr: float | None = Field(None, gt=0, le=10, description="learning rate tuned at reference_batch")
    reference_batch: int | None = Field(None, ge=1, le=MAX_EFFECTIVE_BATCH,
                                        description="effective batch of reference_lr")


class WhatIfProgress(BaseModel):
    done: int = Field(..., description="cells estimated so far (each row's longest-sequence search counts as one)")
    total: int = Field(..., description="cells in all: settings × (seq_lens + 1)")


class EstimateJob(BaseModel):
    """What every estimate job (a what-if table, a recommendation) shows of itself; each kind adds its
    progress, from its own event, and its answer."""

    id: str
    status: str = Field(..., description="queued, running, succeeded, failed or cancelled")
    phase: str | None = None
    spec: dict[str, Any] | None = Field(None, description="the request, capacity_bytes resolved from gpu")
    device: str | None = Field(None, description="the worker that ran it (an estimate uses none of its memory)")
    attempts: int = 0
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None


class WhatIfJob(EstimateJob):
    """A what-if job (POST /v1/whatif) as GET /v1/whatif/{id} shows it."""

    progress: WhatIfProgress | None = Field(None, description="from the latest whatif_cell event")
    table: WhatIf | None = Field(None, description="the table once succeeded, as `fitprobe whatif --json` prints it: "
                                 "rows of settings, a cell per seq_len, the longest seq_len")


class WhatIfList(BaseModel):
    items: list[WhatIfJob]
    total: int
    limit: int
    offset: int


class Recommended(BaseModel):
    """A recommendation as `fitprobe recommend --json` prints it (probe/recommend.py), ranked cheapest fitting first."""

    model: str
    seq_len: int
    capacity_bytes: int
    candidates: list[Candidate] = Field(..., description="ranked: keeps the headroom, fits, keeps the method, "
                                        "fewest numerics changes, least extra compute, larger micro-batch")
    not_modelled: str = Field(..., description="what the ranking leaves out")
    wall_s: float
    first_fitting: int | None = Field(None, description="the index in candidates of the first that fits (null: none)")


class RecommendJob(EstimateJob):
    """A recommendation job (POST /v1/recommendations) as GET /v1/recommendations/{id} shows it."""

    progress: WhatIfProgress | None = Field(None, description="from the latest recommend_candidate event: "
                                            "candidates estimated of all")
    recommendation: Recommended | None = Field(None, description="once succeeded")


class RecommendList(BaseModel):
    items: list[RecommendJob]
    total: int
    limit: int
    offset: int


class ErrorBody(BaseModel):
    """Every error the service answers (4xx, 5xx) has this body."""

    detail: str = Field(..., description="what went wrong and what to change")


class FieldError(BaseModel):
    field: str = Field(..., description="dotted path of the field in the request, e.g. lora.rank")
    message: str = Field(..., description="what is wrong with it")


class ValidationErrorBody(ErrorBody):
    """A 422: `detail` joins the messages of up to ten fields, `errors` gives them one by one."""

    errors: list[FieldError] = Field(default_factory=list, description="one entry per invalid field (at most 10)")


_ERRORS: dict[int, tuple[type[ErrorBody], str]] = {
    400: (ErrorBody, "The body is not JSON of the expected shape"),
    401: (ErrorBody, "Missing or wrong bearer token (only when the service has FITPROBE_API_TOKENS)"),
    404: (ErrorBody, "No probe (or, under /v1/whatif, no what-if job) with this id"),
    409: (ErrorBody, "The probe is not in a state that allows this (e.g. cancelling a finished probe)"),
    413: (ErrorBody, "The request body is larger than FITPROBE_MAX_BODY_BYTES"),
    422: (ValidationErrorBody, "A field is invalid or out of this service's bounds; the message names it"),
    429: (ErrorBody, "Too many probes are queued, or this client is at one of its limits (the detail names the "
                     "setting); retry after the Retry-After header's seconds"),
    503: (ErrorBody, "Not ready: the store does not answer or no device worker runs"),
    507: (ErrorBody, "The service's database is out of disk space; nothing was stored: retry after the "
                     "Retry-After header's seconds"),
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these status codes, each with the body the service really sends."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model, description = _ERRORS[code]
        responses[code] = {"model": model, "description": description}
        if code in (429, 507):
            responses[code]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                          "schema": {"type": "integer"}}}
    return responses
