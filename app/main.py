"""`create_app(settings)`: the FastAPI app, its store, its executor and its error handling."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.deps import require_token
from app.executor import LocalExecutor
from app.routes import devices, exports, health, models, plans, probes
from app.routes.health import Metrics
from app.store import Store

log = logging.getLogger("fitprobe")
STATIC_DIR = Path(__file__).parent / "static"


def _field_message(error: dict) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{'.'.join(location) or 'request'}: {message}"


class BodyLimit:
    """Refuses a declared body over the limit before anything reads it.

    Plain ASGI rather than `@app.middleware("http")`: that wrapper runs every request through an
    extra task and memory streams, about a fifth of the CPU of a dashboard's 304 poll.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                refusal = JSONResponse({"detail": f"request body must be ≤ {self.max_bytes} bytes"}, 413)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.resolved_database_url)
        requeued, failed = store.recover()
        if requeued or failed:
            log.warning("recovered after a crash: %d job(s) re-queued, %d failed as interrupted", requeued, failed)
        metrics = Metrics(store)
        executor = LocalExecutor(store, settings, metrics)
        app.state.settings, app.state.store, app.state.executor, app.state.metrics = settings, store, executor, metrics
        executor.start()
        yield
        executor.stop()

    app = FastAPI(
        title="fitprobe",
        summary="How many examples fit in one training step on this GPU, and how to reach the batch you want.",
        version="0.1.0",
        lifespan=lifespan,
    )
    auth = [Depends(require_token)]
    app.include_router(probes.router, dependencies=auth)
    app.include_router(exports.router, dependencies=auth)
    app.include_router(plans.router, dependencies=auth)
    app.include_router(devices.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.include_router(health.router)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return JSONResponse({"detail": "; ".join(_field_message(e) for e in errors[:10]),
                             "errors": [{"field": _field_message(e).split(":")[0], "message": e.get("msg")}
                                        for e in errors[:10]]}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error; the service log has the details"}, 500)

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
    return app
