"""The routes every estimate job has: submit, list, read, cancel and follow a what-if table or a recommendation.

Both are many estimated probes, minutes of work, so both are jobs on the probes' queue and store, and
their routes differ only in names: the kind, the URL, the response models, the answer's field and the
event that counts progress. What differs for real stays in each kind's module (whatif.py,
recommendations.py): what it refuses at the door and why, and what it stores. Each declares its router
here, so a fix to a submit, a list or a progress count reaches both kinds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from fitprobe.app.config import Settings
from fitprobe.app.deps import ClientDep, ExecutorDep, SettingsDep, SizerDep, StoreDep
from fitprobe.app.routes.jobs import EVENTS_RESPONSES, LastEventId, cancel_job, job_events, job_or_404
from fitprobe.app.routes.probes import RequestT, pinned, within_quota
from fitprobe.app.schemas import EstimateJob, error_responses
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import STATUSES, ClientLimits, JobRow, QueueFull, Store
from fitprobe.probe.events import EventType

# the job row's columns the API shows as they are; the spec, the progress and the answer it reshapes
SHOWN_COLUMNS = ("id", "status", "phase", "device", "attempts", "error", "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class Summaries:
    """Each route's line in the OpenAPI document, in the kind's own words."""

    submit: str
    list: str
    get: str
    cancel: str
    events: str


def fingerprint(kind: str, spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({kind: spec}, sort_keys=True).encode()).hexdigest()


def estimate_job_router(*, kind: str, prefix: str, noun: str, spec_model: type[RequestT],
                        admit: Callable[[RequestT, Settings, Sizer, str], dict[str, Any]],
                        job_model: type[EstimateJob], list_model: type[BaseModel], answer: str,
                        progress: EventType, summaries: Summaries, submit_description: str) -> APIRouter:
    """The routes of the estimate jobs of `kind` (the store's), under `prefix`, tagged with its last part.

    `admit` is the kind's door: it raises an HTTPException for a request this service will not run, else
    gives the spec to store. `answer` is `job_model`'s field for the job's result; `progress` the event
    whose done/total is the job's progress. `noun` names the route functions (get_<noun>, <noun>_events),
    which the OpenAPI document's operation ids follow.
    """
    tag = prefix.rsplit("/", 1)[-1]
    router = APIRouter(prefix=prefix, tags=[tag])

    def public(job: JobRow, store: Store) -> EstimateJob:
        """A job as the API shows it: its progress from the latest `progress` event, its answer once done."""
        latest = store.latest_event(job["id"], progress)
        spec = {key: value for key, value in (job["spec"] or {}).items() if key != "kind"}
        row: dict[str, Any] = dict(job)
        shown = {**{key: row[key] for key in SHOWN_COLUMNS}, "spec": spec,
                 "progress": {"done": latest["done"], "total": latest["total"]} if latest is not None else None}
        try:
            return job_model(**shown, **{answer: job["result"]})
        except ValidationError as exc:  # an answer an older fitprobe stored in another shape
            return job_model(**{**shown, "error": f"this job's stored {answer} does not match this version's "
                                                  f"({exc.error_count()} fields differ); submit the {answer} again"})

    def submit(request: RequestT, response: Response, store: StoreDep, settings: SettingsDep, sizer: SizerDep,
               client: ClientDep) -> EstimateJob:
        limits = ClientLimits(settings.max_jobs_per_client, settings.max_submits_per_client_per_minute)
        within_quota(store.check_quota, client, limits, False)  # before any work: the model may be built on meta
        spec = {"kind": kind, **admit(pinned(request, settings), settings, sizer, client)}
        try:
            job = within_quota(store.create, spec, fingerprint(kind, spec), settings.max_queued_jobs, client=client,
                               limits=limits, kind=kind)
        except QueueFull as exc:
            raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "30"}) from exc
        response.headers["Location"] = f"{prefix}/{job['id']}"
        return public(job, store)

    # FastAPI reads the body's model from the annotation, which only this call knows
    submit.__annotations__["request"] = spec_model
    router.post("", status_code=202, response_model=job_model, summary=summaries.submit,
                description=submit_description, responses=error_responses(400, 413, 422, 429, 507))(submit)

    @router.get("", response_model=list_model, name=f"list_{tag}", summary=summaries.list,
                responses=error_responses(422))
    def list_jobs(store: StoreDep,
                  status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> BaseModel:
        if status is not None and status not in STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(STATUSES)} (got {status!r})")
        items, total = store.list(status, limit, offset, kind=kind)
        return list_model(items=[public(job, store) for job in items], total=total, limit=limit, offset=offset)

    @router.get("/{job_id}", response_model=job_model, name=f"get_{noun}", summary=summaries.get,
                responses=error_responses(404, 422))
    def get_job(job_id: str, store: StoreDep) -> EstimateJob:
        return public(job_or_404(store, job_id, kind), store)

    @router.delete("/{job_id}", response_model=job_model, name=f"cancel_{noun}", summary=summaries.cancel,
                   responses=error_responses(404, 409, 422, 507))
    def cancel(job_id: str, store: StoreDep, executor: ExecutorDep) -> EstimateJob:
        return public(cancel_job(store, executor, job_id, kind), store)

    @router.get("/{job_id}/events", name=f"{noun}_events", summary=summaries.events, response_class=Response,
                responses=EVENTS_RESPONSES)
    async def events(job_id: str, store: StoreDep, request: Request, client: ClientDep,
                     last_event_id: LastEventId = None) -> StreamingResponse:
        """As a probe's events (GET /v1/probes/{id}/events): the same limits on open streams, the same end."""
        return job_events(store, request, client, job_id, kind, last_event_id)

    return router
