"""Prometheus metrics of one service (`GET /metrics`), in a registry of its own.

A registry per app, not prometheus-client's global one: a process may build several apps (tests, the
bench), and each must count only its own requests. Label values come from fixed sets (endpoint names,
status codes, reasons), so a client cannot grow the number of series.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ENDPOINTS = ("/predict", "/health", "/info", "/metrics", "/")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """Requests by endpoint and status, their latency, shed requests and dropped texts, model calls
    (texts per call, seconds), queue depth and admitted requests in flight."""

    def __init__(
        self, queued: Callable[[], float], in_flight: Callable[[], float], draining: Callable[[], bool]
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imdb_lora_http_requests", "HTTP requests by endpoint and status code (499: client left unanswered)",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "imdb_lora_http_request_seconds", "Time from request to response, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "imdb_lora_shed_requests",
            "Requests to /predict refused with 503 before any work (queue_full, draining)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "imdb_lora_dropped_texts", "Admitted texts never computed (client_gone, timeout)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.call_texts = Histogram(
            "imdb_lora_model_call_texts", "Texts per model call", buckets=TEXT_BUCKETS, registry=r
        )
        self.call_seconds = Histogram(
            "imdb_lora_model_call_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS, registry=r
        )
        Gauge(
            "imdb_lora_queue_texts", "Texts admitted and waiting for a model call", registry=r
        ).set_function(queued)
        Gauge(
            "imdb_lora_in_flight_requests", "Admitted /predict requests not yet answered", registry=r
        ).set_function(in_flight)
        Gauge("imdb_lora_draining", "1 while the service shuts down", registry=r).set_function(
            lambda: float(draining())
        )

    def model_call(self, texts: int, seconds: float) -> None:
        self.call_texts.observe(texts)
        self.call_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: every HTTP response counted by endpoint and status, and timed. Outside the body
    limit, so 413s count too; an exception that escapes is counted as the 500 the server will send, and
    a request that ends with no response (its client left, e.g. an aborted upload) as 499, never 500:
    a client must not be able to raise the 5xx rate that alerts watch."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status: str | None = None
        t0 = time.perf_counter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = status or "500"  # what the server answers for it
            raise
        finally:  # no response and no exception: the client left first
            self.metrics.requests.labels(endpoint, status or "499").inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
