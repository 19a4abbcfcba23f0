"""What-if jobs: a settings × seq_len table of estimates, submitted, polled, streamed and cancelled as a probe is.

A table is many estimated probes (one search per cell, a bisection per row), minutes of work, so it
is a job on the same queue and store as probes (`kind` = whatif), never work in the request. Its
cost is bounded at the door by arithmetic on the request: at most FITPROBE_MAX_WHATIF_SEQ_LENS
columns and FITPROBE_MAX_WHATIF_CELLS cells, every seq_len within FITPROBE_MAX_SEQ_LEN, and the
model checked as a probe's is (its size, the capacity its weights need).
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
from fitprobe.app.sizer import Sizer
from fitprobe.app.schemas import WhatIfJob, WhatIfList, error_responses
from fitprobe.app.store import STATUSES, WHATIF, ClientLimits, QueueFull
from fitprobe.probe.spec import ProbeSpec, validation_message
from fitprobe.probe.whatif_spec import WhatIfSpec

router = APIRouter(prefix="/v1/whatif", tags=["whatif"])


def _refuse_at_the_door(request: WhatIfSpec, settings: Settings, sizer: Sizer, client: str) -> ProbeSpec:
    """422 now for a table too large for this service, or one whose every cell would fail; else its base spec."""
    columns, cells = len(request.seq_lens), request.cell_count
    if columns > settings.max_whatif_seq_lens:
        raise HTTPException(422, f"seq_lens: at most {settings.max_whatif_seq_lens} on this service (got {columns}, "
                                 "FITPROBE_MAX_WHATIF_SEQ_LENS); drop some, or submit the rest as another table")
    too_long = [s for s in request.seq_lens if s > settings.max_seq_len]
    if too_long:
        raise HTTPException(422, f"seq_lens must each be ≤ {settings.max_seq_len} on this service (got "
                                 f"{', '.join(map(str, too_long))})")
    if cells > settings.max_whatif_cells:
        rows = cells // columns
        raise HTTPException(422, f"the table has {rows} settings × {columns} seq_lens = {cells} cells, more than "
                                 f"this service's {settings.max_whatif_cells} (FITPROBE_MAX_WHATIF_CELLS); drop "
                                 "seq_lens, or narrow finetuning, checkpointing, optimizers or precisions")
    try:
        base = request.base()
    except ValueError as exc:  # SpecError and pydantic's ValidationError both are
        raise HTTPException(422, validation_message(exc)) from exc
    # what every row shares; a row that cannot apply (QLoRA on a builtin model) is a cell marked n/a
    check_model(base, settings, sizer, base.capacity_bytes, seq_lens=tuple(request.seq_lens), client=client)
    return base


def _fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"whatif": spec}, sort_keys=True).encode()).hexdigest()


def public(job: dict[str, Any], store: Any) -> WhatIfJob:
    """A what-if job as the API shows it: its progress from the latest cell event, the table once done."""
    cells = [data for _, data in store.events_after(job["id"], 0, 10_000) if data.get("type") == "whatif_cell"]
    spec = {key: value for key, value in (job["spec"] or {}).items() if key != "kind"}
    shown = {**{key: job[key] for key in ("id", "status", "phase", "device", "attempts", "error", "created_at",
                                          "started_at", "finished_at")},
             "spec": spec, "progress": {"done": cells[-1]["done"], "total": cells[-1]["total"]} if cells else None}
    try:
        return WhatIfJob(**shown, table=job["result"])
    except ValidationError as exc:  # a table an older fitprobe stored in another shape
        return WhatIfJob(**{**shown, "error": f"this job's stored table does not match this version's "
                                              f"({exc.error_count()} fields differ); submit the table again"})


@router.post("", status_code=202, response_model=WhatIfJob, summary="Submit a what-if table (estimated)",
             responses=error_responses(400, 413, 422, 429, 507))
def submit(request: WhatIfSpec, response: Response, store: StoreDep, settings: SettingsDep, sizer: SizerDep,
           client: ClientDep) -> WhatIfJob:
    """Queue the table: which settings fit on the card, at which seq_len and micro-batch (fake tensors, no device)."""
    limits = ClientLimits(settings.max_jobs_per_client, settings.max_submits_per_client_per_minute)
    within_quota(store.check_quota, client, limits, False)  # before any work: the model may be built on meta
    request = pinned(request, settings)
    base = _refuse_at_the_door(request, settings, sizer, client)
    # the card's memory is stored with its name: the job needs no card table, and a worker adds no capacity;
    # the longest-sequence search stops at this service's largest seq_len, as a request's seq_lens do
    longest = min(request.longest_up_to or settings.max_seq_len, settings.max_seq_len)
    spec = {"kind": WHATIF, **request.model_dump(mode="json"), "capacity_bytes": base.capacity_bytes,
            "longest_up_to": longest}
    try:
        job = within_quota(store.create, spec, _fingerprint(spec), settings.max_queued_jobs, client=client,
                           limits=limits, kind=WHATIF)
    except QueueFull as exc:
        raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "30"}) from exc
    response.headers["Location"] = f"/v1/whatif/{job['id']}"
    return public(job, store)


@router.get("", response_model=WhatIfList, summary="List what-if jobs, newest first", responses=error_responses(422))
def list_whatif(store: StoreDep,
                status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> WhatIfList:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)} (got {status!r})")
    items, total = store.list(status, limit, offset, kind=WHATIF)
    return WhatIfList(items=[public(job, store) for job in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=WhatIfJob, summary="A what-if job's status, progress and, once done, table",
            responses=error_responses(404, 422))
def get_whatif(job_id: str, store: StoreDep) -> WhatIfJob:
    return public(job_or_404(store, job_id, WHATIF), store)


@router.delete("/{job_id}", response_model=WhatIfJob, summary="Cancel a queued or running what-if job",
               responses=error_responses(404, 409, 422, 507))
def cancel_whatif(job_id: str, store: StoreDep, executor: ExecutorDep) -> WhatIfJob:
    return public(cancel_job(store, executor, job_id, WHATIF), store)


@router.get("/{job_id}/events", summary="Server-Sent Events: one whatif_cell per cell; resumable with Last-Event-ID",
            response_class=Response, responses=EVENTS_RESPONSES)
async def whatif_events(job_id: str, store: StoreDep, request: Request, client: ClientDep,
                        last_event_id: LastEventId = None) -> StreamingResponse:
    """As a probe's events (GET /v1/probes/{id}/events): the same limits on open streams, the same end."""
    return job_events(store, request, client, job_id, WHATIF, last_event_id)
