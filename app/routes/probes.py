"""Probe jobs: submit, read, list, cancel, and follow their events as Server-Sent Events."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.deps import ExecutorDep, SettingsDep, StoreDep
from app.schemas import ProbeRequest
from app.store import STATUSES, TERMINAL, Conflict, QueueFull
from app.watch import compact, etag_of
from probe.plan import plan_for_probe
from probe.spec import SpecError

router = APIRouter(prefix="/v1/probes", tags=["probes"])
SSE_HEARTBEAT_S = 10.0
SSE_POLL_S = 0.25
NOT_IN_FINGERPRINT = {"effective_batch", "num_devices", "reuse", "device"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(request: ProbeRequest, device_name: str, capacity_bytes: int | None) -> str:
    """Everything a probe's answer depends on; the effective batch only changes the plan."""
    fields = request.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT)
    key = {"spec": fields, "device": device_name, "capacity_bytes": capacity_bytes,
           "torch": _version("torch"), "fitprobe": _version("fitprobe")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _replan(result: dict[str, Any], request: ProbeRequest) -> dict[str, Any]:
    """A cached probe, with the plan made for this request's effective batch."""
    result = dict(result)
    search = result["search"]
    if request.effective_batch is None:
        result["plan"] = result["verification"] = None
        return result
    plan = plan_for_probe(search, request.effective_batch, request.num_devices,
                          request.micro_steps_per_trial).to_dict()
    if plan != result.get("plan"):
        result["verification"] = None  # the verification ran another plan: it is not this one's
    result["plan"] = plan
    return result


def _bounded(request: ProbeRequest, settings: Any) -> None:
    if request.seq_len > settings.max_seq_len:
        raise HTTPException(422, f"seq_len must be ≤ {settings.max_seq_len} on this service (got {request.seq_len})")
    if request.effective_batch and request.effective_batch > settings.max_effective_batch:
        raise HTTPException(422, f"effective_batch must be ≤ {settings.max_effective_batch} on this service "
                                 f"(got {request.effective_batch})")
    if isinstance(request.model, str) and request.model.startswith("hf:"):
        raise HTTPException(422, "model: hf:<path> reads the server's files; send the config object inline instead")
    if isinstance(request.model, str) and request.model.startswith("factory:") and \
            request.model.removeprefix("factory:") not in settings.allowed_factories:
        raise HTTPException(422, f"model: factory {request.model.removeprefix('factory:')!r} is not allow-listed "
                                 "on this service (FITPROBE_ALLOWED_FACTORIES)")


def public(job: dict[str, Any], store: Any) -> dict[str, Any]:
    job = dict(job)
    job["trials"] = store.trials(job["id"])
    result = job.pop("result")
    job["report"] = result
    job["plan"] = result.get("plan") if result else None
    job["verification"] = result.get("verification") if result else None
    return job


@router.post("", status_code=202, summary="Submit a probe (probe → plan → verify)")
def submit(request: ProbeRequest, response: Response, store: StoreDep, settings: SettingsDep,
           executor: ExecutorDep) -> dict[str, Any]:
    _bounded(request, settings)
    capacity = request.capacity_bytes or (settings.cpu_capacity_bytes if executor.device_kind == "cpu" else None)
    key = fingerprint(request, executor.device_name, capacity)
    spec = request.model_dump(mode="json")
    cached = store.cached_result(key) if request.reuse else None
    if cached is not None:
        try:
            job = store.create_cached(spec, key, _replan(cached, request))
        except SpecError as exc:
            raise HTTPException(422, str(exc)) from exc
    else:
        try:
            job = store.create(spec, key, settings.max_queued_jobs)
        except QueueFull as exc:
            raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "30"}) from exc
    response.headers["Location"] = f"/v1/probes/{job['id']}"
    return public(job, store)


@router.get("", summary="List probes, newest first")
def list_probes(store: StoreDep,
                status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                view: Annotated[Literal["full", "compact"],
                                Query(description="compact: rows without trials and report, for tables")] = "full",
                ) -> dict[str, Any]:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)} (got {status!r})")
    items, total = store.list(status, limit, offset)
    rows = [compact(job) if view == "compact" else public(job, store) for job in items]
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


def _job_or_404(store: Any, job_id: str) -> dict[str, Any]:
    try:
        return store.get(job_id)
    except KeyError:
        raise HTTPException(404, f"no probe with id {job_id!r}") from None


@router.get("/{job_id}", summary="A probe's status, phase, trials so far, plan and verification",
            responses={304: {"description": "unchanged since the ETag sent in If-None-Match"},
                       404: {"description": "no probe with this id"}})
async def get_probe(job_id: str, store: StoreDep, response: Response,
                    if_none_match: Annotated[str | None, Header()] = None) -> Any:
    # the hottest route (dashboards and pipelines poll it): indexed reads run on the event loop,
    # because a hop through the 40-thread pool cost 3x the throughput under 200 pollers. A poller
    # that sends back the ETag costs one read and gets an empty 304 until something changes; the
    # version is read before the body, so a change in between makes the ETag older, never newer.
    version = store.version(job_id)
    if version is None:
        raise HTTPException(404, f"no probe with id {job_id!r}")
    etag = etag_of(version)
    if if_none_match and etag in (tag.strip().removeprefix("W/") for tag in if_none_match.split(",")):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return public(_job_or_404(store, job_id), store)


@router.delete("/{job_id}", summary="Cancel a queued or running probe (kills its process)")
def cancel_probe(job_id: str, store: StoreDep, executor: ExecutorDep) -> dict[str, Any]:
    _job_or_404(store, job_id)
    try:
        job = store.cancel(job_id)
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    executor.kill(job_id)
    return public(job, store)


@router.get("/{job_id}/events", summary="Server-Sent Events: phases and trials; resumable with Last-Event-ID")
def probe_events(job_id: str, store: StoreDep, request: Request,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    _job_or_404(store, job_id)
    try:
        after = int(last_event_id) if last_event_id else 0
    except ValueError:
        raise HTTPException(422, f"Last-Event-ID must be an event id number (got {last_event_id!r})") from None

    def stream() -> Iterator[str]:
        nonlocal after
        last_sent_s = time.monotonic()
        while True:
            rows = store.events_after(job_id, after)
            for event_id, data in rows:
                after = event_id
                yield f"id: {event_id}\nevent: {data.get('type', 'message')}\ndata: {json.dumps(data)}\n\n"
                last_sent_s = time.monotonic()
            if not rows:
                status = store.get(job_id)["status"]
                if status in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if time.monotonic() - last_sent_s > SSE_HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                    last_sent_s = time.monotonic()
                time.sleep(SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
