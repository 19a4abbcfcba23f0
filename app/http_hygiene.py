"""What every request and every response passes at the HTTP level: the Host check and the security headers.

The Host check is against DNS rebinding. A page on evil.example can make its own name resolve to
127.0.0.1 and then call this service from the victim's browser as "same origin": the only trace of
the trick is the Host header, which still says evil.example. So a request must name a host this
service answers to (FITPROBE_ALLOWED_HOSTS; by default its bind address and the loopback names,
any port). Starlette's TrustedHostMiddleware decides; it answers in plain text, so its refusal is
replaced with the JSON error every other refusal has.

The headers keep the dashboard from being framed (clickjacking its cancel button), from running
script that did not come from this service, from having a response sniffed into another type, and
from leaking its URLs (probe ids) in a Referer.
"""

from __future__ import annotations

import base64
import hashlib
import json

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# the dashboard loads only its own files; its favicon is an empty data: URI
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def docs_policy(html: str) -> str:
    """The policy for /docs and /redoc: Swagger UI starts from one inline script (allowed by its hash, no
    other), and both draw with inline styles and ReDoc with a blob: worker."""
    scripts = html.split("<script>")[1:]
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.split("</script>")[0].encode()).digest()).decode()
                      + "'" for s in scripts)
    return (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The bind address (an IPv6 one as Host writes it, in brackets) and the loopback names."""
    bound = f"[{bind_host}]" if ":" in bind_host else bind_host
    return list(dict.fromkeys([bound.lower(), *LOOPBACK_NAMES]))


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response that does not set the header itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [h for h in SECURITY_HEADERS if h[0] not in present]}
            await send(message)

        await self.app(scope, receive, with_headers)


class HostCheck:
    """400 with a JSON detail for a Host this service does not answer to (TrustedHostMiddleware decides)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self._check = TrustedHostMiddleware(self._allowed, allowed_hosts=allowed_hosts, www_redirect=False)

    @staticmethod
    async def _allowed(scope: Scope, receive: Receive, send: Send) -> None:
        scope["fitprobe.host_allowed"] = True

    @staticmethod
    async def _drop(message: Message) -> None:
        """Starlette's plain-text refusal: answered below in JSON instead."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._check(scope, receive, self._drop)
        if scope.pop("fitprobe.host_allowed", False):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")[:100]
        body = json.dumps({"detail": f"Host {host!r} is not one this service answers to (a DNS rebinding "
                                     f"page names its own): allowed are {', '.join(self.allowed_hosts)}; add the "
                                     "name clients use to FITPROBE_ALLOWED_HOSTS (comma-separated, * for any)"}
                          ).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
