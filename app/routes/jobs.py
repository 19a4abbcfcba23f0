"""What the routes of every kind of job share: finding a job of the route's kind, cancelling it, and
following its events as Server-Sent Events.

Probes and what-if tables are jobs on one queue and store; only what they compute and how the API
shows them differ. So a cancel is the same transition and kill for both, and an event stream the
same resumable, bounded poll of the store: kept here once, a fix to either reaches both kinds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Header, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fitprobe.app.executors.base import Executor
from fitprobe.app.schemas import error_responses
from fitprobe.app.store import PROBE, RECOMMEND, WHATIF, Conflict, JobRow, Store
from fitprobe_client.status import TERMINAL

SSE_HEARTBEAT_S = 10.0
SSE_POLL_S = 0.25
STREAMS_RETRY_AFTER_S = 10
MAX_EVENT_ID = 2**63 - 1  # the largest id the store's integer column holds
# per kind: what its 404 calls it, and where a client refused a stream polls it instead
_NOUN = {PROBE: "probe", WHATIF: "what-if job", RECOMMEND: "recommendation"}
_PREFIX = {PROBE: "/v1/probes", WHATIF: "/v1/whatif", RECOMMEND: "/v1/recommendations"}

LastEventId = Annotated[str | None, Header(
    description="resume after this event id (the `id:` of the last event received)")]
# for the events routes' decorators: with response_class=Response (no media type of its own) the
# errors stay documented as JSON while the 200 is an event stream
EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "one `id:`/`event:`/`data:` record per event, then `event: end`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(404, 422, 429)}


class EventStreams:
    """Bounds the open event streams, in all and per client, and ends them all when the server starts to stop.

    Each stream is a connection uvicorn waits for on shutdown, and each polls the store: unbounded,
    500 of them starved the API, and without a share per client, one client's 100 unread streams
    took every slot. Touched only from the event loop (the events and pre-flight routes are async),
    except `close`, which uvicorn's signal handler calls: hence the Event.
    """

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit, self.per_client, self.open = limit, per_client, 0
        self.by_client: dict[str, int] = {}
        self.closing = threading.Event()

    def enter(self, client: str) -> str | None:
        """Take a slot for `client`; None when taken, else why not (the 429's detail)."""
        if self.by_client.get(client, 0) >= self.per_client:
            return (f"this client has {self.per_client} event streams and pre-flights open, its limit "
                    f"(FITPROBE_MAX_STREAMS_PER_CLIENT={self.per_client}); close one")
        if self.open >= self.limit:
            return f"{self.limit} event streams and pre-flights are open (FITPROBE_MAX_EVENT_STREAMS)"
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def leave(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]

    def close(self) -> None:
        self.closing.set()


class _CountedStream(StreamingResponse):
    """A stream that gives its slot back however it ends: finished, disconnected or cancelled."""

    def __init__(self, content: AsyncIterator[str], streams: EventStreams, client: str, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.streams, self.client = streams, client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.streams.leave(self.client)


def job_or_404(store: Store, job_id: str, kind: str = PROBE) -> JobRow:
    """The job, if it is one of `kind`: each kind's routes answer for their own jobs only."""
    try:
        job = store.get(job_id)
    except KeyError:
        job = None
    if job is None or job["kind"] != kind:
        raise HTTPException(404, f"no {_NOUN[kind]} with id {job_id!r}")
    return job


def cancel_job(store: Store, executor: Executor, job_id: str, kind: str) -> JobRow:
    """Cancel a queued or running job of `kind` and kill its process; 409 when it had already finished.

    The store owns the transition (a finished job refuses it, and keeps its result); only then is the
    process killed. The row comes back as stored: each kind's route shows it its own way.
    """
    job_or_404(store, job_id, kind)
    try:
        job = store.cancel(job_id)
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    executor.kill(job_id)
    return job


def job_events(store: Any, request: Request, client: str, job_id: str, kind: str,
               last_event_id: str | None) -> StreamingResponse:
    """A job's events as Server-Sent Events: 404 unless it is one of `kind`, 422 for a bad Last-Event-ID,
    429 (pointing at the job's poll route) when `client` may not open another stream."""
    job_or_404(store, job_id, kind)
    try:
        after = int(last_event_id) if last_event_id else 0
        if not 0 <= after <= MAX_EVENT_ID:
            raise ValueError
    except ValueError:
        raise HTTPException(422, f"Last-Event-ID must be an event id between 0 and {MAX_EVENT_ID} "
                                 f"(got {(last_event_id or '')[:40]!r})") from None
    streams: EventStreams = request.app.state.event_streams
    refused = streams.enter(client)
    if refused:
        raise HTTPException(429, f"{refused}; poll GET {_PREFIX[kind]}/{job_id} instead, or retry later",
                            headers={"Retry-After": str(STREAMS_RETRY_AFTER_S)})

    async def stream() -> AsyncIterator[str]:
        nonlocal after
        last_sent_s = time.monotonic()
        while not streams.closing.is_set():
            rows = await to_thread.run_sync(store.events_after, job_id, after)
            for event_id, data in rows:
                after = event_id
                yield f"id: {event_id}\nevent: {data.get('type', 'message')}\ndata: {json.dumps(data)}\n\n"
                last_sent_s = time.monotonic()
            if not rows:
                status = (await to_thread.run_sync(store.get, job_id))["status"]
                if status in TERMINAL:
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if time.monotonic() - last_sent_s > SSE_HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                    last_sent_s = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)
        yield f"event: shutdown\ndata: {json.dumps({'detail': 'server stopping; reconnect with Last-Event-ID'})}\n\n"

    return _CountedStream(stream(), streams, client, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})

