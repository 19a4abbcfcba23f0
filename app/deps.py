"""FastAPI dependencies as `Annotated` aliases: what a route needs, taken from the app's state."""

from __future__ import annotations

import hashlib
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
    token itself is never stored), else their address."""
    if request.app.state.settings.api_tokens:
        token = request.headers.get("authorization", "").partition(" ")[2]
        return "token:" + hashlib.sha256(token.encode("latin-1")).hexdigest()[:32]
    return "address:" + (request.client.host if request.client else "unknown")


StoreDep = Annotated[Store, Depends(get_store)]
ClientDep = Annotated[str, Depends(get_client)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SizerDep = Annotated[Sizer, Depends(get_sizer)]
