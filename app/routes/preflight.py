"""Pre-flight as one request: submit (or reuse the cache), wait for the verdict, answer PASS or FAIL.

Made for `curl --fail-with-body` in a CI step: a plan verified by training answers 200 and one
`PASS: …` line (with `accept_estimate`, an estimate whose plan keeps the headroom: `PASS (estimated): …`);
a plan that cannot be met answers 409 and `FAIL: <reason>`, so curl fails the step
and prints why. Bad input stays 422 (JSON, as everywhere), and a verdict not reached within
`timeout_s` is 504 (the probe keeps running). `Accept: application/json` gets the same verdict with
the job behind it.

The wait holds no thread: it sleeps on the event loop and reads the job through the bounded thread
pool between sleeps, as the event streams do, and it counts against their limit of open streams
(FITPROBE_MAX_EVENT_STREAMS, FITPROBE_MAX_STREAMS_PER_CLIENT), since each waiting request is a
connection held open.
"""

from __future__ import annotations

import asyncio
import time

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from fitprobe.app.deps import ClientDep, ExecutorDep, SettingsDep, SizerDep, StoreDep
from fitprobe.app.routes.jobs import EventStreams
from fitprobe.app.routes.probes import public, submit_probe
from fitprobe.app.schemas import PreflightRequest, PreflightVerdict, ProbeJob, error_responses
from fitprobe_client.status import TERMINAL
from fitprobe_client.verdict import verdict

router = APIRouter(prefix="/v1/preflight", tags=["preflight"])
POLL_S = 0.5
FAILED = 409  # a 4xx other than 422, so that `curl --fail-with-body` fails the step and shows the line
_LINE = {"text/plain": {"schema": {"type": "string"},
                         "example": "PASS: 20 = 10 micro × 2 accum × 1 device (verified; peak 12.1MiB of 16.0MiB)"}}


def _answer(request: Request, status_code: int, line: str, job: ProbeJob | None) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        body = PreflightVerdict(passed=status_code == 200, detail=line, job=job)
        return JSONResponse(body.model_dump(mode="json"), status_code=status_code)
    return PlainTextResponse(line + "\n", status_code=status_code)


@router.post("", summary="Pre-flight: probe, plan and verify, then answer PASS (200) or FAIL (409)",
             response_class=Response, responses={
                 200: {"model": PreflightVerdict, "content": _LINE,
                       "description": "`PASS: …`: the plan was verified by training, or with accept_estimate "
                                      "`PASS (estimated): …` (JSON with Accept: application/json)"},
                 409: {"model": PreflightVerdict, "content": _LINE,
                       "description": "`FAIL: <reason>`: the plan cannot be met (does not fit, verification failed, "
                                      "the probe failed)"},
                 504: {"model": PreflightVerdict, "content": _LINE,
                       "description": "`FAIL: timed out …`: no verdict within timeout_s; the probe keeps running"},
                 **error_responses(400, 413, 422, 429, 507)})
async def preflight(body: PreflightRequest, request: Request, store: StoreDep, settings: SettingsDep,
                    executor: ExecutorDep, sizer: SizerDep, client: ClientDep) -> Response:
    """Submit the probe with the plan for `effective_batch` verified (a cached search is reused and only
    the new plan trained), wait up to `timeout_s`, and answer one verdict line."""
    streams: EventStreams = request.app.state.event_streams
    refused = streams.enter(client)
    if refused:
        raise HTTPException(429, f"{refused}; retry later", headers={"Retry-After": "10"})
    try:
        job = await to_thread.run_sync(submit_probe, body.probe_request(), store, settings, executor, sizer,
                                         client)
        deadline_s = time.monotonic() + body.timeout_s
        while job["status"] not in TERMINAL:
            if time.monotonic() > deadline_s:
                line = f"FAIL: timed out after {body.timeout_s:g} s: probe {job['id']} is still {job['status']}"
                return _answer(request, 504, line, await to_thread.run_sync(public, job, store))
            if streams.closing.is_set() or await request.is_disconnected():
                raise HTTPException(503, f"server stopping or client gone; probe {job['id']} keeps running")
            await asyncio.sleep(POLL_S)
            job = await to_thread.run_sync(store.get, job["id"])
        shown = await to_thread.run_sync(public, job, store)
    finally:
        streams.leave(client)
    # the torch-free client's own reading of the job
    passed, line = verdict(shown.model_dump(mode="json"), accept_estimate=body.accept_estimate)
    return _answer(request, 200 if passed else FAILED, line, shown)
