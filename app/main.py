"""`create_app(settings)`: the FastAPI app, its store, its executor and its error handling."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import migrate
from app.body_limit import BodyLimit
from app.config import Settings
from app.deps import require_token
from app.executor import make_executor
from app.routes import devices, exports, health, limits, models, plans, preflight, probes
from app.routes.health import Metrics
from app.schemas import error_responses
from app.store import Store

log = logging.getLogger("fitprobe")
STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc assets from a package, served by the app: /docs must work on a closed cluster
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/docs-assets"


def _printable(text: str) -> str:
    """`text` with lone UTF-16 surrogates escaped: an error message quoting a bad key must still encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field_message(error: dict) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return _printable(f"{'.'.join(location) or 'request'}: {message}")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.resolved_database_url, lease_s=settings.lease_s)
        migrate.upgrade(store.engine)  # raises SchemaAhead on a database a newer fitprobe migrated
        log.info("replica %s on %s", store.owner, store.engine.url.render_as_string(hide_password=True))
        requeued, failed = store.recover()
        if requeued or failed:
            log.warning("recovered after a crash: %d job(s) re-queued, %d failed as interrupted", requeued, failed)
        metrics = Metrics(store)
        executor = make_executor(store, settings, metrics)
        app.state.settings, app.state.store, app.state.executor, app.state.metrics = settings, store, executor, metrics
        executor.start()
        yield
        executor.stop()

    app = FastAPI(
        title="fitprobe",
        summary="How many examples fit in one training step on this GPU, and how to reach the batch you want.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.event_streams = probes.EventStreams(settings.max_event_streams)  # `serve` closes it on SIGTERM
    auth = [Depends(require_token)]
    auth_errors = error_responses(401)
    app.include_router(probes.router, dependencies=auth, responses=auth_errors)
    app.include_router(preflight.router, dependencies=auth, responses=auth_errors)
    app.include_router(exports.router, dependencies=auth, responses=auth_errors)
    app.include_router(plans.router, dependencies=auth, responses=auth_errors)
    app.include_router(devices.router, dependencies=auth, responses=auth_errors)
    app.include_router(models.router, dependencies=auth, responses=auth_errors)
    app.include_router(limits.router, dependencies=auth, responses=auth_errors)
    app.include_router(health.router)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API reference",
                              redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return JSONResponse({"detail": "; ".join(_field_message(e) for e in errors[:10]),
                             "errors": [{"field": _field_message(e).split(":")[0],
                                         "message": _printable(str(e.get("msg")))} for e in errors[:10]]}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = _printable(exc.detail) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error; the service log has the details"}, 500)

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
    return app
