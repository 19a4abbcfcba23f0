"""The request body limit, counted on the bytes that arrive rather than on what the client declares.

A Content-Length header is a promise, and a chunked upload (Transfer-Encoding: chunked) makes none:
checking the header alone let a client stream hundreds of MB into a request and have it stored. This
pure-ASGI middleware refuses an over-long declared length before the app runs, and otherwise counts
the `http.request` body bytes the app pulls; the moment the count passes the limit it stops reading
and answers 413, so no route ever sees (or stores) a body larger than the limit.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit.

    An HTTPException, so FastAPI lets it through body parsing unchanged and the app's own error
    handler answers it like any other error (JSON `{"detail": ...}`).
    """

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, body_limit_message(max_body_bytes))


def body_limit_message(max_body_bytes: int) -> str:
    return (f"request body must be ≤ {max_body_bytes} bytes ({max_body_bytes // 1024} KiB); "
            "send a smaller body (an inline model config needs only its architecture fields)")


class BodyLimit:
    """Answers 413 when a request body passes `max_body_bytes`, whether declared or streamed."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(send)
            return

        received_bytes = 0
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received_bytes
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            # only reached when no handler inside the app answered it (a route reading the raw stream)
            if response_started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": body_limit_message(self.max_body_bytes)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
