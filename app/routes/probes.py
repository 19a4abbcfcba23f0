"""Probe jobs: submit, read, list, cancel, and follow their events as Server-Sent Events."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from fitprobe.app.config import Settings
from fitprobe.app.deps import ClientDep, ExecutorDep, SettingsDep, SizerDep, StoreDep
from fitprobe.app.door import check_model
from fitprobe.app.executors.base import Executor
from fitprobe.app.sizer import Sizer
from fitprobe.app.routes.jobs import EVENTS_RESPONSES, LastEventId, cancel_job, job_events, job_or_404
from fitprobe.app.schemas import CompactProbe, ProbeJob, ProbeList, ProbeRequest, error_responses
from fitprobe.app.store import PROBE, ClientLimits, ClientQuota, JobRow, QueueFull, Store
from fitprobe.app.watch import compact, etag_of
from fitprobe_client.status import JobStatus
from fitprobe.probe.models.hub import HubId, fetch_config, looks_like_path, parse_hub_id
from fitprobe.probe.data import padded_width_ratio, plan_facts
from fitprobe.probe.plan import plan_for_probe
from fitprobe.probe.report import Report
from fitprobe.probe.spec import ProbeSpec, SpecError, format_bytes
from fitprobe.probe.whatif_spec import WhatIfSpec
from fitprobe.probe.versions import distribution_version

STATUSES = tuple(JobStatus)

router = APIRouter(prefix="/v1/probes", tags=["probes"])
# gpu: capacity_bytes carries the card's memory, so a card and its byte count share one cached answer
NOT_IN_FINGERPRINT = {"effective_batch", "effective_batch_tokens", "num_devices", "reuse", "verify_cached", "device", "gpu"}
# a request with a `model` field: a probe (or a pre-flight, a ProbeSpec too) or a what-if table
RequestT = TypeVar("RequestT", bound="ProbeSpec | WhatIfSpec")
T = TypeVar("T")  # what a store call within_quota wraps returns
VERIFICATION_NOT_RUN = "not run for this plan; submit with reuse=false to verify"


def fingerprint(request: ProbeRequest, device_name: str, capacity_bytes: int | None) -> str:
    """Everything a probe's answer depends on; the effective batch only changes the plan."""
    fields = request.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT)
    key = {"spec": fields, "device": device_name, "capacity_bytes": capacity_bytes,
           "torch": distribution_version("torch"), "fitprobe": distribution_version("fitprobe")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _covers(search: dict[str, Any], micro_batch_limit: int | None) -> bool:
    """Whether a cached search answers a request whose own search would stop at `micro_batch_limit`.

    A search stops at its limit (what its effective batch needed). One that reached it shows only
    that the limit fits, not how much more would: it answers requests that need no more than that.
    """
    if not search.get("limit_reached"):
        return True
    return micro_batch_limit is not None and micro_batch_limit <= search["limit"]


def _replan(cached: Report, request: ProbeRequest) -> Report:
    """A cached probe, with the plan made for this request's effective batch.

    The verification trained the cached job's plan, so it stays only when the new plan is the same.
    Otherwise `verification` is null (not run, which is not "failed") with a `verification_note`
    saying how to get one: the probe, the expensive part, still holds. A cached "does not fit" stays
    that, with no plan, so a rerun of the same gate gets the same FAIL, not a complaint about its input.
    """
    result = cached.model_copy()
    if request.effective_rows is None or result.does_not_fit:
        # a probe where nothing fits answers every effective batch the same way: does not fit, no plan
        result.plan = result.verification = None
        return result
    plan = plan_facts(plan_for_probe(result.search, request.effective_rows, request.num_devices,
                                     request.micro_steps_per_trial, padded_width_ratio(request)), request)
    if plan != result.plan:
        result.verification = None
        if request.mode == "measure":
            result.verification_note = VERIFICATION_NOT_RUN
    result.plan = plan
    return result


def _refuse_at_the_door(request: ProbeRequest, settings: Settings, executor: Executor, sizer: Sizer,
                        capacity_bytes: int | None, client: str) -> None:
    """422 now for a request that would only fail later in its job, or run on a device it did not ask for."""
    if request.seq_len > settings.max_seq_len:
        raise HTTPException(422, f"seq_len must be ≤ {settings.max_seq_len} on this service (got {request.seq_len})")
    if request.effective_batch and request.effective_batch > settings.max_effective_batch:
        raise HTTPException(422, f"effective_batch must be ≤ {settings.max_effective_batch} on this service "
                                 f"(got {request.effective_batch})")
    if request.effective_batch_tokens and (request.effective_rows or 0) > settings.max_effective_batch:
        raise HTTPException(422, f"effective_batch_tokens is {request.effective_rows} rows of seq_len "
                                 f"{request.seq_len}; at most {settings.max_effective_batch} rows on this service "
                                 "(FITPROBE_MAX_EFFECTIVE_BATCH)")
    devices = executor.devices
    if "device" in request.model_fields_set and request.device not in devices:
        raise HTTPException(422, f"device: this service has no {request.device}; it runs probes on "
                                 f"{', '.join(devices)}: leave device out and the service picks a free one")
    cpu = executor.device_kind == "cpu"
    if cpu and request.mode == "measure" and capacity_bytes and capacity_bytes > settings.cpu_capacity_bytes:
        raise HTTPException(422, f"capacity_bytes must be ≤ {format_bytes(settings.cpu_capacity_bytes)} on this "
                                 f"service's CPU device (got {format_bytes(capacity_bytes)}; "
                                 'FITPROBE_CPU_CAPACITY_BYTES); to plan for a bigger device send "mode": "estimate"')
    most, where = executor.job_devices_limit()
    if request.device_processes() > most:
        work = "a sharded trial" if request.sharding == "fsdp" else "the verification"
        raise HTTPException(422, f"num_devices must be ≤ {most} here (got {request.num_devices}): {work} "
                                 f"runs one process per device, {where}; lower num_devices, or send "
                                 '"mode": "estimate", which measures one device of a simulated group')
    check_model(request, settings, sizer, capacity_bytes, client=client)


def pinned(request: RequestT, settings: Any) -> RequestT:
    """hf:org/name -> hf:org/name@<commit>, its config.json read now (checked at the door).

    The job then builds exactly the snapshot checked here, from the cache, and the result cache keys on
    the commit, so a repo updated since is probed again. Paths are refused without asking the disk.
    """
    if not (isinstance(request.model, str) and request.model.startswith("hf:")):
        return request
    text = request.model.removeprefix("hf:")
    if looks_like_path(text):
        raise HTTPException(422, "model: hf:<path> reads the server's files; send the config object inline, "
                                 "or a Hub id (hf:org/name)")
    try:
        hub_id = parse_hub_id(text)
        _, commit = fetch_config(hub_id, local_files_only=settings.hub_access == "offline")
    except SpecError as exc:
        raise HTTPException(422, f"model: {exc}") from exc
    # model_copy keeps the request's own class; mypy cannot see that through the union bound
    return cast(RequestT, request.model_copy(update={"model": f"hf:{HubId(hub_id.repo_id, commit or hub_id.revision)}"}))


def public(job: JobRow, store: Store) -> ProbeJob:
    """A job as the API shows it. `trials` are the final attempt's: a job re-run after a restart shows its
    earlier runs' trials apart, in `earlier_attempts`, not mixed into the curve its report describes."""
    shown: dict[str, Any] = dict(job)  # the row, reshaped into what ProbeJob shows
    spec = job["spec"] or {}
    if "search_from" in spec:  # the cached report travels to the job in its spec: shown as the probe's id
        shown["spec"] = {key: value for key, value in spec.items() if key != "search_from"}
    shown.pop("client", None)  # a hash of a token is still nobody else's business
    final = max(job["attempts"], 1)
    events = store.trial_events(job["id"])
    trials = [event for event in events if event["type"] == "trial"]
    started = events[-1] if events and events[-1]["type"] == "trial_started" else None
    running = job["status"] == "running" and started is not None and started.get("attempt", 1) == final
    shown["trying_micro_batch"] = started.get("micro_batch") if running and started else None
    # events stored before attempts were stamped belong to the first run
    shown["trials"] = [trial for trial in trials if trial.get("attempt", 1) == final]
    shown["earlier_attempts"] = [{"attempt": attempt, "trials": [t for t in trials if t.get("attempt", 1) == attempt]}
                               for attempt in range(1, final)]
    result = shown.pop("result")
    report = None
    if result is not None:
        try:
            report = Report.model_validate(result)
        except ValidationError as exc:  # a record an older fitprobe stored, in a shape this one does not read
            shown["error"] = (f"this job's stored report does not match this version's ({exc.error_count()} fields "
                            "differ); submit the probe again with reuse=false")
    shown["search_cached_from"] = (spec.get("search_from") or {}).get("probe_id") or (
        report.search_cached_from if report else None)
    shown["report"] = report
    if report is not None:
        shown.update(plan=report.plan, verification=report.verification, verification_note=report.verification_note)
    return ProbeJob(**shown)


def submit_probe(request: ProbeRequest, store: Any, settings: Settings, executor: Executor, sizer: Sizer,
                 client: str) -> JobRow:
    """Queue a probe, or answer it from the newest finished probe with the same fingerprint.

    A cached probe answers only when its search did not stop below what this request needs
    (`_covers`). Its plan is remade for this effective batch, and a verification of another plan
    is not passed off as this one's: `verification` is then null, with a `verification_note` — or,
    with `verify_cached`, a verification-only job is queued that takes the cached search and trains
    the new plan.

    Every stored row counts against `client`: a queued job against its share of the queue
    (FITPROBE_MAX_JOBS_PER_CLIENT), and any row, cached answers too, against its submits per minute.
    """
    limits = ClientLimits(settings.max_jobs_per_client, settings.max_submits_per_client_per_minute)
    # a client past its submits per minute hears so before any work (a Hub read, a model built on meta)
    within_quota(store.check_quota, client, limits, True)
    request = pinned(request, settings)
    capacity = request.capacity_bytes or (settings.cpu_capacity_bytes if executor.device_kind == "cpu" else None)
    _refuse_at_the_door(request, settings, executor, sizer, capacity, client)
    key = fingerprint(request, executor.device_name, capacity)
    spec = request.model_dump(mode="json")
    cached = store.cached_result(key) if request.reuse else None
    # a client at its limits hears so before its cached answer is re-planned (the plan costs CPU)
    within_quota(store.check_quota, client, limits, cached is not None)
    if cached is not None and _covers(cached[1]["search"], request.micro_batch_limit):
        source_id, stored = cached
        try:
            report = Report.model_validate(stored)
            replanned = _replan(report, request)
        except ValidationError:  # stored by an older fitprobe in another shape: probe again
            replanned = None
        except SpecError as exc:
            raise HTTPException(422, str(exc)) from exc
        if replanned is not None and not (request.verify_cached and replanned.verification_note):
            return within_quota(store.create_cached, spec, key, replanned.as_json(), client=client, limits=limits)
        if replanned is not None:
            # a verification-only job's result carries the search too: name the probe that ran it
            spec["search_from"] = {"probe_id": report.search_cached_from or source_id, "report": stored}
    try:
        return within_quota(store.create, spec, key, settings.max_queued_jobs, client=client, limits=limits)
    except QueueFull as exc:
        raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "30"}) from exc


def within_quota(create: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`create(...)`, a client at its limits answered 429 with when to retry."""
    try:
        return create(*args, **kwargs)
    except ClientQuota as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc


@router.post("", status_code=202, response_model=ProbeJob, summary="Submit a probe (probe → plan → verify)",
             responses=error_responses(400, 413, 422, 429, 507))
def submit(request: ProbeRequest, response: Response, store: StoreDep, settings: SettingsDep,
           executor: ExecutorDep, sizer: SizerDep, client: ClientDep) -> ProbeJob:
    """Queue a probe, or answer it from the cache (see `submit_probe`)."""
    job = submit_probe(request, store, settings, executor, sizer, client)
    response.headers["Location"] = f"/v1/probes/{job['id']}"
    return public(job, store)


@router.get("", response_model=ProbeList, summary="List probes, newest first", responses=error_responses(422))
def list_probes(store: StoreDep,
                status: Annotated[str | None, Query(description=f"one of {', '.join(JobStatus)}")] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                view: Annotated[Literal["full", "compact"],
                                Query(description="compact: rows without trials and report, for tables")] = "full",
                ) -> ProbeList:
    if status is not None and status not in tuple(JobStatus):
        raise HTTPException(422, f"status must be one of {', '.join(JobStatus)} (got {status!r})")
    items, total = store.list(status, limit, offset)
    rows = [CompactProbe(**compact(job)) for job in items] if view == "compact" else [public(job, store) for job in items]
    return ProbeList(items=rows, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=ProbeJob, summary="A probe's status, phase, trials so far, plan and verification",
            responses={304: {"description": "unchanged since the ETag sent in If-None-Match"},
                       **error_responses(404, 422)})
async def get_probe(job_id: str, store: StoreDep, response: Response,
                    if_none_match: Annotated[str | None, Header()] = None) -> Any:
    # the hottest route (dashboards and pipelines poll it): indexed reads run on the event loop,
    # because a hop through the 40-thread pool cost 3x the throughput under 200 pollers. A poller
    # that sends back the ETag costs one read and gets an empty 304 until something changes; the
    # version is read before the body, so a change in between makes the ETag older, never newer.
    version = store.version(job_id, PROBE)
    if version is None:
        raise HTTPException(404, f"no probe with id {job_id!r}")
    etag = etag_of(version)
    if if_none_match and etag in (tag.strip().removeprefix("W/") for tag in if_none_match.split(",")):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return public(job_or_404(store, job_id), store)


@router.delete("/{job_id}", response_model=ProbeJob, summary="Cancel a queued or running probe (kills its process)",
               responses=error_responses(404, 409, 422, 507))
def cancel_probe(job_id: str, store: StoreDep, executor: ExecutorDep) -> ProbeJob:
    return public(cancel_job(store, executor, job_id, PROBE), store)


@router.get("/{job_id}/events", summary="Server-Sent Events: phases and trials; resumable with Last-Event-ID",
            response_class=Response, responses=EVENTS_RESPONSES)
async def probe_events(job_id: str, store: StoreDep, request: Request, client: ClientDep,
                       last_event_id: LastEventId = None) -> StreamingResponse:
    """Polls the store in a worker thread until the job ends; the event loop only sleeps between polls.

    At most FITPROBE_MAX_EVENT_STREAMS are open at once, FITPROBE_MAX_STREAMS_PER_CLIENT of them one
    client's (429 beyond). Each event carries its job's `attempt`. When the server stops, every
    stream ends with a `shutdown` event, and the client reconnects with Last-Event-ID.
    """
    return job_events(store, request, client, job_id, PROBE, last_event_id)
