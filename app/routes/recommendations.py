"""Recommendation jobs: which settings to run on a card, every candidate estimated, ranked by what it costs.

A recommendation is many estimated probes (probe/recommend.py: one per combination of the settings that
save memory), minutes of work, so it is a job on the same queue and store as probes (`kind` = recommend),
never work in the request. Its cost is bounded at the door before anything is built: the request is a
probe's (checked as one: its model's size, its seq_len, the capacity its weights need) estimated for a
card, and its candidates, counted by arithmetic on the request, are at most FITPROBE_MAX_RECOMMEND_CANDIDATES.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from fitprobe.app.config import Settings
from fitprobe.app.deps import ClientDep, ExecutorDep, SettingsDep, SizerDep, StoreDep
from fitprobe.app.door import check_model
from fitprobe.app.routes.jobs import EVENTS_RESPONSES, LastEventId, cancel_job, job_events, job_or_404
from fitprobe.app.routes.probes import pinned, within_quota
from fitprobe.app.schemas import RecommendJob, RecommendList, error_responses
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import RECOMMEND, STATUSES, ClientLimits, QueueFull
from fitprobe.probe.events import EventType
from fitprobe.probe.recommend import RecommendSpec
from fitprobe.probe.spec import validation_message

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"])


def _refuse_at_the_door(request: RecommendSpec, settings: Settings, sizer: Sizer, client: str) -> RecommendSpec:
    """422 now for a request this service will not estimate (as a probe's), or one with too many candidates."""
    try:  # every candidate is estimated: the request must be one an estimate can run
        spec = RecommendSpec(**{**request.model_dump(mode="json", exclude_unset=True), "mode": "estimate"})
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, validation_message(exc)) from exc
    assert spec.capacity_bytes is not None, "ProbeSpec refuses estimate mode without a capacity"
    count = spec.candidate_count()
    if count > settings.max_recommend_candidates:
        raise HTTPException(422, f"this request has {count} candidates, more than this service's "
                                 f"{settings.max_recommend_candidates} (FITPROBE_MAX_RECOMMEND_CANDIDATES): leave out "
                                 "allow_method_change, or lower num_devices")
    if spec.seq_len > settings.max_seq_len:
        raise HTTPException(422, f"seq_len must be ≤ {settings.max_seq_len} on this service (got {spec.seq_len})")
    check_model(spec.probe_spec(), settings, sizer, spec.capacity_bytes, client=client)
    return spec


def _fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"recommend": spec}, sort_keys=True).encode()).hexdigest()


def public(job: dict[str, Any], store: Any) -> RecommendJob:
    """A recommendation job as the API shows it: its progress from the latest candidate event, the answer once done."""
    answered = [data for _, data in store.events_after(job["id"], 0, 10_000)
                if data.get("type") == EventType.RECOMMEND_CANDIDATE]
    spec = {key: value for key, value in (job["spec"] or {}).items() if key != "kind"}
    shown = {**{key: job[key] for key in ("id", "status", "phase", "device", "attempts", "error", "created_at",
                                          "started_at", "finished_at")},
             "spec": spec,
             "progress": {"done": answered[-1]["done"], "total": answered[-1]["total"]} if answered else None}
    try:
        return RecommendJob(**shown, recommendation=job["result"])
    except ValidationError as exc:  # an answer an older fitprobe stored in another shape
        return RecommendJob(**{**shown, "error": f"this job's stored recommendation does not match this version's "
                                                 f"({exc.error_count()} fields differ); submit it again"})


@router.post("", status_code=202, response_model=RecommendJob, summary="Submit a recommendation (estimated)",
             responses=error_responses(400, 413, 422, 429, 507))
def submit(request: RecommendSpec, response: Response, store: StoreDep, settings: SettingsDep, sizer: SizerDep,
           client: ClientDep) -> RecommendJob:
    """Queue it: every combination of the settings that save memory while keeping the request's method, each
    estimated on the card (fake tensors, no device) and ranked by extra compute and numerics changed."""
    limits = ClientLimits(settings.max_jobs_per_client, settings.max_submits_per_client_per_minute)
    within_quota(store.check_quota, client, limits, False)  # before any work: the model may be built on meta
    spec = _refuse_at_the_door(pinned(request, settings), settings, sizer, client)
    stored = {"kind": RECOMMEND, **spec.model_dump(mode="json")}
    try:
        job = within_quota(store.create, stored, _fingerprint(stored), settings.max_queued_jobs, client=client,
                           limits=limits, kind=RECOMMEND)
    except QueueFull as exc:
        raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "30"}) from exc
    response.headers["Location"] = f"/v1/recommendations/{job['id']}"
    return public(job, store)


@router.get("", response_model=RecommendList, summary="List recommendation jobs, newest first",
            responses=error_responses(422))
def list_recommendations(store: StoreDep,
                         status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
                         limit: Annotated[int, Query(ge=1, le=200)] = 50,
                         offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> RecommendList:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)} (got {status!r})")
    items, total = store.list(status, limit, offset, kind=RECOMMEND)
    return RecommendList(items=[public(job, store) for job in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=RecommendJob, summary="A recommendation's status, progress and answer",
            responses=error_responses(404, 422))
def get_recommendation(job_id: str, store: StoreDep) -> RecommendJob:
    return public(job_or_404(store, job_id, RECOMMEND), store)


@router.delete("/{job_id}", response_model=RecommendJob, summary="Cancel a queued or running recommendation",
               responses=error_responses(404, 409, 422, 507))
def cancel_recommendation(job_id: str, store: StoreDep, executor: ExecutorDep) -> RecommendJob:
    return public(cancel_job(store, executor, job_id, RECOMMEND), store)


@router.get("/{job_id}/events", summary="Server-Sent Events: one recommend_candidate per candidate; resumable",
            response_class=Response, responses=EVENTS_RESPONSES)
async def recommendation_events(job_id: str, store: StoreDep, request: Request, client: ClientDep,
                                last_event_id: LastEventId = None) -> StreamingResponse:
    """As a probe's events (GET /v1/probes/{id}/events): the same limits on open streams, the same end."""
    return job_events(store, request, client, job_id, RECOMMEND, last_event_id)
