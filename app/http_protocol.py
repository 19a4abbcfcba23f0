"""uvicorn's h11 protocol, with the answers and the deadline a socket open to browsers and strangers needs.

uvicorn answers a request it cannot parse with a plain-text "Invalid HTTP request received." (400),
whatever was wrong, and closes the socket at once. A client still sending its oversized request
then gets a connection reset rather than that answer: closing a socket with unread input makes the
kernel send RST, which throws away the answer on its way. h11 accepts a request that carries both
Content-Length and Transfer-Encoding (it reads the chunks), the request a proxy in front that reads
Content-Length would split differently: request smuggling. And a client may take as long as it
likes over its headers: one byte a second holds a connection, a thousand such clients the service.

This subclass changes exactly that:
- a request h11 refuses, or that frames its body twice, is answered with a status that says why
  (431 head too large, 414 when the request line alone is, 400 otherwise) and a JSON `detail`;
- every such answer ends in a lingering close: the write side is shut and the client's remaining
  input read and dropped for up to LINGER_S, so the client reads the answer before the socket goes;
- a request head must arrive within `header_timeout_s` of its first byte (of the connection, for
  a connection that sends nothing), else 408 and that close.
The body's deadline is app/body_limit.py's: once the head is in, the app runs and answers the 408.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fitprobe.app.http_hygiene import SECURITY_HEADERS

MAX_HEAD_BYTES = 16 * 1024  # request line and headers together (h11's default, now stated)
LINGER_S = 2.0
STATUS_LINES = {400: b"400 Bad Request", 408: b"408 Request Timeout", 414: b"414 URI Too Long",
                431: b"431 Request Header Fields Too Large"}


HEAD_TOO_LARGE = {
    414: f"the request line (method and URL) must be at most {MAX_HEAD_BYTES} bytes; send long input in a POST body",
    431: f"the request line and headers must be at most {MAX_HEAD_BYTES} bytes together; send fewer or shorter headers",
}


class _CheckedConnection(h11.Connection):
    """h11's server connection, also refusing a large head that came in one read and a body framed twice,
    and keeping the status and message of why it refused."""

    refusal: tuple[int, str] | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self._check_head(event)
        except h11.RemoteProtocolError as exc:
            if self.refusal is None:
                self.refusal = self._explain(exc)
            raise
        return event

    def _check_head(self, request: h11.Request) -> None:
        """What h11 lets through: a head that arrived whole in one read is not held to h11's limit
        (h11 measures only a head still incomplete), and a body framed twice."""
        head_bytes = len(request.method) + len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if len(request.target) > MAX_HEAD_BYTES:
            self._refuse(414)
        if head_bytes > MAX_HEAD_BYTES:
            self._refuse(431)
        names = {name.lower() for name, _ in request.headers}
        if {b"content-length", b"transfer-encoding"} <= names:
            self._refuse(400, "a request must not carry both Content-Length and Transfer-Encoding: send one of them")

    def _refuse(self, status: int, detail: str = "") -> None:
        self.refusal = (status, detail or HEAD_TOO_LARGE[status])
        raise h11.RemoteProtocolError(self.refusal[1], error_status_hint=status)

    def _explain(self, exc: h11.RemoteProtocolError) -> tuple[int, str]:
        if exc.error_status_hint == 431:
            # h11 counts the head still buffered: no line end in it means the request line alone is too long
            # (`_receive_buffer` is h11's own, the unparsed input of the current request)
            status = 414 if b"\n" not in bytes(self._receive_buffer) else 431
            return status, HEAD_TOO_LARGE[status]
        return 400, f"malformed HTTP request ({exc}); send a valid HTTP/1.1 request"


class FitprobeH11Protocol(H11Protocol):
    """See the module docstring. Built per connection by uvicorn; `header_timeout_s` comes from `protocol`."""

    conn: _CheckedConnection  # replaces uvicorn's plain h11.Connection in __init__

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _CheckedConnection(h11.SERVER, self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)
        self.header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the answer is out; what the client still sends is read only so that it can read the answer
        if self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the first bytes of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_deadline()

    def send_400_response(self, msg: str) -> None:
        status, detail = self.conn.refusal or (400, "malformed HTTP request; send a valid HTTP/1.1 request")
        self._refuse(status, detail)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is not h11.IDLE:  # still answering the previous request: no room for another answer
            self.transport.close()
            return
        self._refuse(408, f"the request line and headers must arrive within {self.header_timeout_s:g} s "
                          "(FITPROBE_HEADER_TIMEOUT_S); send the whole request head at once")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` with a JSON detail, then close without resetting (see the module docstring)."""
        if self.transport.is_closing():
            return
        self._refused = True
        self._disarm_head_deadline()
        self._unset_keepalive_if_required()
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *SECURITY_HEADERS]
        head = b"HTTP/1.1 " + STATUS_LINES[status] + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        self.logger.warning("refused a request from %s with %d: %s", self.client, status, detail)
        self.transport.write(head + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol(header_timeout_s: float) -> Any:
    """The `http=` argument for uvicorn.Config."""
    return functools.partial(FitprobeH11Protocol, header_timeout_s=header_timeout_s)
