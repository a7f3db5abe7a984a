"""Prometheus metrics of the gateway: request counts and latency, jobs by state, queue depth."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["install_metrics", "render_metrics"]

# Seconds; uploads of a whole study take longer than status polls, hence the long tail.
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _ServiceCollector(Collector):
    """Read at scrape time: jobs by state from the job store, task counts per Redis queue."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        jobs = GaugeMetricFamily("spectdose_jobs", "Jobs in the job store by state", labels=["state"])
        for state, n in self.ctx.store.counts_by_state().items():
            jobs.add_metric([state], n)
        yield jobs
        queues = GaugeMetricFamily("spectdose_queue_length", "Tasks waiting in each broker queue", labels=["queue"])
        try:
            for queue, n in self.ctx.enqueuer.queue_lengths().items():
                queues.add_metric([queue], n)
        except Exception:  # noqa: BLE001 - broker down: the gauge is absent, /ready says why
            pass
        yield queues


def install_metrics(app: FastAPI, ctx) -> None:
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("spectdose_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("spectdose_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                        buckets=_LATENCY_BUCKETS_S, registry=registry)
    registry.register(_ServiceCollector(ctx))
    app.state.metrics_registry = registry

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            name = getattr(route, "path", "unmatched")
            requests.labels(request.method, name, str(status)).inc()
            latency.labels(request.method, name).observe(time.perf_counter() - start)


def render_metrics(app: FastAPI) -> tuple[bytes, str]:
    return generate_latest(app.state.metrics_registry), CONTENT_TYPE_LATEST
