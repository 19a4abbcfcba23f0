"""The request body's limits: its size, counted on the bytes that arrive rather than on what the client
declares, and the time it may take to arrive.

A Content-Length header is a promise, and a chunked upload (Transfer-Encoding: chunked) makes none:
checking the header alone let a client stream hundreds of MB into a request and have it stored. This
pure-ASGI middleware refuses an over-long declared length before the app runs, and otherwise counts
the `http.request` body bytes the app pulls; the moment the count passes the limit it stops reading
and answers 413, so no route ever sees (or stores) a body larger than the limit.

A body must also arrive within `body_timeout_s` of the request's head: a client that sends a few
bytes and then nothing (or one byte a second) would otherwise hold a connection and a request task
for as long as it likes. Past the deadline the read stops with a 408 that closes the connection.
The head's own deadline is the protocol's (app/http_protocol.py): until the head is in, no app runs.
A route that answers without reading a declared body closes the connection with its answer, so the
unread rest is never waited for.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit.

    An HTTPException, so FastAPI lets it through body parsing unchanged and the app's own error
    handler answers it like any other error (JSON `{"detail": ...}`).
    """

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, body_limit_message(max_body_bytes))


class BodyTooSlow(HTTPException):
    """Raised from `receive` once the body's deadline passes; answered like BodyTooLarge, and the connection
    is closed (a client that is still sending must not have its late bytes read as the next request)."""

    def __init__(self, body_timeout_s: float) -> None:
        super().__init__(408, f"the request body must arrive within {body_timeout_s:g} s of its headers "
                              "(FITPROBE_BODY_TIMEOUT_S); send the whole body at once", headers={"Connection": "close"})


def body_limit_message(max_body_bytes: int) -> str:
    return (f"request body must be ≤ {max_body_bytes} bytes ({max_body_bytes // 1024} KiB); "
            "send a smaller body (an inline model config needs only its architecture fields)")


class BodyLimit:
    """Answers 413 when a request body passes `max_body_bytes`, whether declared or streamed, and 408 when
    it is not in within `body_timeout_s`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _refuse(send, BodyTooLarge(self.max_body_bytes))
            return

        received_bytes = 0
        response_started = body_complete = False
        deadline_s = asyncio.get_running_loop().time() + self.body_timeout_s

        async def counted_receive() -> Message:
            nonlocal received_bytes, body_complete
            if body_complete:  # what follows the body (a disconnect) is waited for as long as the app likes
                return await receive()
            try:
                message = await _before(deadline_s, receive())
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.body_timeout_s) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        headers = dict(scope["headers"])
        body_declared = (declared not in (None, b"0")) or b"transfer-encoding" in headers

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if body_declared and not body_complete:
                    # the route answered without reading the body: the server would go on reading it, a byte at
                    # a time if the client dribbles it, before the connection could carry another request
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except (BodyTooLarge, BodyTooSlow) as exc:
            # only reached when no handler inside the app answered it (a route reading the raw stream)
            if response_started:
                raise
            await _refuse(send, exc)


async def _refuse(send: Send, exc: HTTPException) -> None:
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _before(deadline_s: float, awaitable: Awaitable[Message]) -> Message:
    """`awaitable`'s result, or TimeoutError once the loop's clock passes `deadline_s`. A message that is
    already there is returned even past the deadline: only waiting is bounded."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline_s):
            return await awaitable
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(awaitable, max(deadline_s - loop.time(), 0.001))
