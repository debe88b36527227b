"""Prometheus metrics on ``GET /metrics``, in a registry of the app's own (no global state)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from leuk_fhir.service.runtime import LeukFhirService

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServiceMetrics:
    """HTTP request counts and latency, analyses by outcome, queue and outbox depth."""

    def __init__(self, service: LeukFhirService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "leuk_fhir_http_requests", "HTTP requests by endpoint and status",
            ["method", "endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "leuk_fhir_http_request_duration_seconds", "Time to answer an HTTP request",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.analyses = Counter(
            "leuk_fhir_analyses", "Finished analyses by outcome (or 'failed')",
            ["outcome"], registry=self.registry,
        )
        self.analysis_seconds = Histogram(
            "leuk_fhir_analysis_duration_seconds", "Pipeline time per analysis",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        queue_depth = Gauge(
            "leuk_fhir_queue_pending", "Analyses waiting or running", registry=self.registry
        )
        queue_depth.set_function(lambda: service.queue.pending)
        running = Gauge("leuk_fhir_queue_running", "Analyses running", registry=self.registry)
        running.set_function(lambda: service.queue.running)
        subscribers = Gauge(
            "leuk_fhir_event_subscribers", "Open event streams", registry=self.registry
        )
        subscribers.set_function(lambda: service.broker.subscriber_count)
        outbox = Gauge(
            "leuk_fhir_outbox_deliveries", "Outbox deliveries by status (dead = dead letters)",
            ["status"], registry=self.registry,
        )
        def outbox_count(status: str) -> Callable[[], float]:
            return lambda: float(service.outbox.stats().get(status, 0))

        for status in ("pending", "sending", "delivered", "dead"):
            outbox.labels(status).set_function(outbox_count(status))

    def analysis_finished(self, outcome: str, seconds: float | None) -> None:
        self.analyses.labels(outcome=outcome).inc()
        if seconds is not None:
            self.analysis_seconds.observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)

    def init_app(self, app: Flask) -> None:
        def start_timer() -> None:
            g.request_started = time.perf_counter()

        def record(response: Any) -> Any:
            started = g.pop("request_started", None)
            endpoint = request.endpoint or "unmatched"
            self.requests.labels(request.method, endpoint, str(response.status_code)).inc()
            if started is not None:
                self.latency.labels(endpoint).observe(time.perf_counter() - started)
            return response

        # Runs before authentication, so refused requests are timed and counted too.
        app.before_request_funcs.setdefault(None, []).insert(0, start_timer)
        app.after_request(record)
