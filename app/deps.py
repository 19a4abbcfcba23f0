"""FastAPI dependencies as `Annotated` aliases: what a route needs, taken from the app's state."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from fitprobe.app.config import Settings
from fitprobe.app.executors.base import Executor
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import Store


# async, though nothing here awaits: FastAPI runs a sync dependency on its thread pool, and that hop
# (three per request) cost more than the whole indexed read of a probe poll

async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_executor(request: Request) -> Executor:
    return request.app.state.executor


async def get_sizer(request: Request) -> Sizer:
    return request.app.state.sizer


async def require_token(request: Request) -> None:
    """Bearer token check, when the operator configured tokens (FITPROBE_API_TOKENS)."""
    tokens = request.app.state.settings.api_tokens
    if not tokens:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare bytes: compare_digest refuses non-ASCII str, and header text is any latin-1 byte
    sent = token.encode("latin-1")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(sent, t.encode()) for t in tokens):
        raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


async def get_client(request: Request) -> str:
    """Who is asking, for per-client quotas: a hash of their bearer token when the service wants tokens (the
    token itself is never stored), else their network (`client_network`)."""
    settings = request.app.state.settings
    if settings.api_tokens:
        token = request.headers.get("authorization", "").partition(" ")[2]
        return "token:" + hashlib.sha256(token.encode("latin-1")).hexdigest()[:32]
    address = request.client.host if request.client else "unknown"
    if settings.client_header:  # set by the operator's proxy, which overwrites what the client sent
        address = request.headers.get(settings.client_header, "").split(",")[-1].strip() or address
    return "address:" + client_network(address)


def client_network(address: str) -> str:
    """The network an address belongs to, as one client: every loopback address is this machine, an IPv4
    address its /24 and an IPv6 address its /64 (a host gets a /64, and hands out any address in it).
    Keyed by the address alone, 127.0.0.2 and 127.0.0.3 each got the whole quota again."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.is_loopback:
        return "loopback"
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


StoreDep = Annotated[Store, Depends(get_store)]
ClientDep = Annotated[str, Depends(get_client)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SizerDep = Annotated[Sizer, Depends(get_sizer)]
