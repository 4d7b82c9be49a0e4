"""HTTP load against the real service on loopback (`bench serve`)."""

from __future__ import annotations

import time
from typing import Any

from ..errors import UserError, counted
from ..inference.classifier import Classifier
from ..serving.app import ServeSettings, create_app
from ..serving.server import BackgroundServer
from .common import machine, test_reviews
from .load import run_load_in_process


def bench_serve(
    model: str,
    clients: int = 32,
    requests: int = 256,
    texts_per_request: int = 1,
    samples: int = 256,
    data: str | None = None,
    timeout: float = 300.0,
    device: str = "auto",
    settings: ServeSettings | None = None,
    seed: int = 0,
    max_batch_tokens: int | None = None,
) -> dict[str, Any]:
    """HTTP load: `clients` concurrent loops send `requests` POST /predict to a real uvicorn on loopback."""
    if clients > requests:  # the surplus would send nothing, yet each opened a connection (10**12: a hang)
        raise UserError(f"--clients {clients:,} is more than --requests {requests:,}; lower --clients")
    settings = (settings or ServeSettings()).admitting(texts_per_request)
    clf = Classifier.load(model, device=device, max_batch_tokens=max_batch_tokens, base_flag=False)
    reviews, source = test_reviews(clf, data, samples, seed)
    app = create_app(clf, settings)
    with BackgroundServer(app) as server:
        cpu0 = time.process_time()
        load = run_load_in_process(server.url, reviews.texts, clients, requests, texts_per_request, timeout)
        load["service_cpu_seconds"] = round(time.process_time() - cpu0, 2)  # model + event loop, all threads
    stats = app.state.batcher.stats
    load.update(
        model_calls=stats.calls,
        mean_texts_per_call=stats.texts / max(1, stats.calls),
        largest_call=stats.largest,
        model_seconds=round(stats.model_seconds, 3),
        max_queue=settings.max_queue,
        max_batch_tokens=clf.max_batch_tokens,
    )
    load["machine"] = machine()
    load["data"], load["distinct_reviews"] = source, len(reviews)
    return load


def format_serve_report(r: dict[str, Any]) -> str:
    lat, e2e = r["latency_ms"], r["end_to_end_ms"]
    return "\n".join(
        [
            f"bench serve: {counted(r['requests'], 'request')} of {counted(r['texts_per_request'], 'review')} "
            f"from {counted(r['clients'], 'concurrent client')} on loopback; {r['distinct_reviews']} distinct {r['data']}",
            f"machine: {r['machine']}",
            f"requests/s {r['requests_per_s']:.2f} | reviews/s {r['texts_per_s']:.2f} | "
            f"admitted latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms | "
            f"with waits after 503 p50 {e2e['p50']:.0f} ms, p99 {e2e['p99']:.0f} ms",
            f"shed (503 + Retry-After, then retried) {r['shed']} | errors {r['errors']}"
            + (f" {r['error_kinds']}" if r["errors"] else ""),
            f"batching: {r['model_calls']} model calls, {r['mean_texts_per_call']:.1f} texts per call "
            f"on average, largest {r['largest_call']}; {r['model_seconds']:.1f} s in the model "
            f"(queue bound {r['max_queue']} texts, {r['max_batch_tokens']} tokens per forward pass)",
            f"CPU seconds: load generator {r['load_generator_cpu_seconds']:.1f}, "
            f"service {r['service_cpu_seconds']:.1f} (model and event loop, all threads)",
        ]
    )
