"""The service's Prometheus metrics: job gauges read from the store, durations the executors observe.

Its own module, below the routes and the executors: the executors record into it and
app/routes/health.py serves it at /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from fitprobe.app.store import Store
from fitprobe_client.status import JobStatus


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
