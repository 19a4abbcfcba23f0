"""`create_app(settings)`: the FastAPI app, its store, its executor and its error handling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
import sqlalchemy as sa
from anyio import to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from fitprobe.app import migrate
from fitprobe.app.body_limit import BodyLimit
from fitprobe.app.config import Settings
from fitprobe.app.deps import require_token
from fitprobe.app.executors import make_executor
from fitprobe.app.http_hygiene import HostCheck, SecurityHeaders, docs_policy
from fitprobe.app.metrics import Metrics
from fitprobe.app.routes import (devices, exports, health, jobs, limits, models, plans, preflight, probes,
                                  recommendations, whatif)
from fitprobe.app.schemas import error_responses
from fitprobe.app.rate import PerClientRate
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import SWEEP_BATCH, Store, is_disk_full
from fitprobe.probe.versions import fitprobe_version

log = logging.getLogger("fitprobe")
STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc assets from a package, served by the app: /docs must work on a closed cluster
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/docs-assets"
OPENAPI_URL = "/openapi.json"  # FastAPI's default, named: the offline docs pages load it
DISK_FULL_RETRY_AFTER_S = 60
DISK_FULL_DETAIL = ("the service's database is out of disk space (database or disk is full), so nothing was "
                    "stored; retry later: the service answers again as soon as space frees (its operator can "
                    "free some, or lower FITPROBE_RETENTION_DAYS or FITPROBE_MAX_STORED_JOBS)")


def _printable(text: str) -> str:
    """`text` with lone UTF-16 surrogates escaped: an error message quoting a bad key must still encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field_message(error: dict) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return _printable(f"{'.'.join(location) or 'request'}: {message}")


async def sweep_forever(store: Store, settings: Settings) -> None:
    """The retention sweep (Store.sweep), every FITPROBE_SWEEP_INTERVAL_S; sooner while it has a backlog."""
    while True:
        try:
            deleted = await to_thread.run_sync(store.sweep, settings.retention_days, settings.max_stored_jobs,
                                               SWEEP_BATCH, settings.max_stored_bytes)
        except sa.exc.OperationalError as exc:
            deleted = 0
            log.warning("retention sweep: database error: %s", str(exc.orig or exc).splitlines()[0][:200])
        if deleted:
            log.info("retention sweep: deleted %d finished job(s)", deleted)
        await asyncio.sleep(1.0 if deleted >= SWEEP_BATCH else settings.sweep_interval_s)


def _with_docs_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers["content-security-policy"] = docs_policy(bytes(page.body).decode())
    return page


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
        app.state.sizer = Sizer(settings.model_build_timeout_s)  # it imports transformers now, here and in its process
        executor.start()
        sweeper = asyncio.create_task(sweep_forever(store, settings))
        yield
        sweeper.cancel()
        executor.stop()
        app.state.sizer.stop()

    app = FastAPI(
        title="fitprobe",
        summary="How many examples fit in one training step on this GPU, and how to reach the batch you want.",
        version=fitprobe_version(),
        lifespan=lifespan,
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    app.state.plan_rate = PerClientRate(settings.max_plans_per_client_per_minute,
                                        "FITPROBE_MAX_PLANS_PER_CLIENT_PER_MINUTE")
    app.state.event_streams = jobs.EventStreams(settings.max_event_streams,
                                                 settings.max_streams_per_client)  # `serve` closes it on SIGTERM
    auth = [Depends(require_token)]
    auth_errors = error_responses(401)
    app.include_router(probes.router, dependencies=auth, responses=auth_errors)
    app.include_router(preflight.router, dependencies=auth, responses=auth_errors)
    app.include_router(exports.router, dependencies=auth, responses=auth_errors)
    app.include_router(plans.router, dependencies=auth, responses=auth_errors)
    app.include_router(devices.router, dependencies=auth, responses=auth_errors)
    app.include_router(models.router, dependencies=auth, responses=auth_errors)
    app.include_router(limits.router, dependencies=auth, responses=auth_errors)
    app.include_router(whatif.router, dependencies=auth, responses=auth_errors)
    app.include_router(recommendations.router, dependencies=auth, responses=auth_errors)
    app.include_router(health.router)
    # the last added runs first: every answer, a refused Host's too, carries the security headers
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)
    app.add_middleware(HostCheck, allowed_hosts=settings.resolved_allowed_hosts)
    app.add_middleware(SecurityHeaders)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _with_docs_policy(get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{app.title} - API docs",
                                   swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png"))

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _with_docs_policy(get_redoc_html(openapi_url=OPENAPI_URL, title=f"{app.title} - API reference",
                              redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False))

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

    @app.exception_handler(sa.exc.DBAPIError)
    async def database_error(_: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
        if not is_disk_full(exc):
            raise exc  # the 500 below
        log.error("database or disk is full: %s", str(exc.orig or exc).splitlines()[0][:200])
        return JSONResponse({"detail": DISK_FULL_DETAIL}, 507,
                            headers={"Retry-After": str(DISK_FULL_RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error; the service log has the details"}, 500)

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
    return app
