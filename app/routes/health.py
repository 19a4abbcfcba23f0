"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import generate_latest

from fitprobe.app.schemas import error_responses

router = APIRouter(tags=["health"])
# the text format every Prometheus version parses; prometheus_client >= 0.22 labels the same text (for
# names like ours, without UTF-8) "version=1.0.0", which older scrapers do not know
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", summary="The process answers")
async def healthz() -> dict[str, str]:
    # on the event loop: liveness must not wait for a thread of the pool that busy routes share
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers and the workers run", responses=error_responses(503))
def readyz(request: Request) -> dict[str, object]:
    state = request.app.state
    try:
        state.store.counts_by_status()
    except Exception as exc:  # any store failure means not ready
        raise HTTPException(503, f"store unavailable: {type(exc).__name__}") from exc
    problems = state.executor.not_ready()
    if problems:
        raise HTTPException(503, "; ".join(problems))
    return {"status": "ready", "devices": state.executor.devices}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={
    200: {"description": "Prometheus text format", "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=PROMETHEUS_TEXT)
