"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from app.schemas import error_responses
from app.store import Store
from fitprobe_client.status import JobStatus

router = APIRouter(tags=["health"])
# the text format every Prometheus version parses; prometheus_client >= 0.22 labels the same text (for
# names like ours, without UTF-8) "version=1.0.0", which older scrapers do not know
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Job gauges read from the store at scrape time; durations observed as jobs finish."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.store = store
        self.registry.register(self)
        self.job_duration_s = Histogram("fitprobe_job_duration_seconds", "wall time of finished jobs",
                                        registry=self.registry, buckets=(1, 5, 15, 60, 300, 900, 3600))
        self.trial_duration_s = Histogram("fitprobe_trial_duration_seconds", "wall time of trials",
                                          registry=self.registry, buckets=(0.1, 0.5, 1, 5, 15, 60, 300))
        self.trials_per_job = Histogram("fitprobe_trials_per_job", "trials a probe needed",
                                        registry=self.registry, buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts_by_status()
        jobs = GaugeMetricFamily("fitprobe_jobs", "jobs by status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("fitprobe_queue_depth", "queued jobs", value=counts[JobStatus.QUEUED])


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
