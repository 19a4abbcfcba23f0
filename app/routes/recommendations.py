"""Recommendation jobs: which settings to run on a card, every candidate estimated, ranked by what it costs.

A recommendation is many estimated probes (probe/recommend.py: one per combination of the settings that
save memory), minutes of work, so it is a job on the same queue and store as probes (`kind` = recommend),
never work in the request. Its cost is bounded at the door before anything is built: the request is a
probe's (checked as one: its model's size, its seq_len, the capacity its weights need) estimated for a
card, and its candidates, counted by arithmetic on the request, are at most FITPROBE_MAX_RECOMMEND_CANDIDATES.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError

from fitprobe.app.config import Settings
from fitprobe.app.door import check_model, lightest_weights
from fitprobe.app.routes.estimate_jobs import Summaries, estimate_job_router
from fitprobe.app.schemas import RecommendJob, RecommendList
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import RECOMMEND
from fitprobe.probe.events import EventType
from fitprobe.probe.recommend import RecommendSpec, candidate_settings
from fitprobe.probe.spec import validation_message


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
    asked = spec.probe_spec()
    candidates = (asked.model_copy(update=update) for update in candidate_settings(asked, spec.allow_method_change))
    check_model(lightest_weights(candidates), settings, sizer, spec.capacity_bytes, client=client)
    return spec


def _admitted(request: RecommendSpec, settings: Settings, sizer: Sizer, client: str) -> dict[str, Any]:
    """What the job stores, once the door lets the request in: the request, as an estimate."""
    return _refuse_at_the_door(request, settings, sizer, client).model_dump(mode="json")


router = estimate_job_router(
    kind=RECOMMEND, prefix="/v1/recommendations", noun="recommendation", spec_model=RecommendSpec,
    admit=_admitted, job_model=RecommendJob, list_model=RecommendList, answer="recommendation",
    progress=EventType.RECOMMEND_CANDIDATE,
    summaries=Summaries(
        submit="Submit a recommendation (estimated)",
        list="List recommendation jobs, newest first",
        get="A recommendation's status, progress and answer",
        cancel="Cancel a queued or running recommendation",
        events="Server-Sent Events: one recommend_candidate per candidate; resumable"),
    submit_description="Queue it: every combination of the settings that save memory while keeping the "
                       "request's method, each estimated on the card (fake tensors, no device) and ranked by "
                       "extra compute and numerics changed.")
