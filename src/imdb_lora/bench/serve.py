"""HTTP load against the real service on loopback (`bench serve`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..inference.classifier import Classifier
from ..serving.app import ServeSettings, create_app
from ..serving.server import BackgroundServer
from .common import machine, percentile, test_reviews


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
    settings = settings or ServeSettings()
    settings.max_texts = max(settings.max_texts, texts_per_request)
    settings.max_queue = max(settings.max_queue, settings.max_texts)
    clf = Classifier.load(model, device=device, max_batch_tokens=max_batch_tokens)
    reviews = test_reviews(clf, data, samples, seed).texts
    app = create_app(clf, settings)
    with BackgroundServer(app) as server:
        load = asyncio.run(run_load(server.url, reviews, clients, requests, texts_per_request, timeout))
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
    return load


async def run_load(
    url: str, texts: list[str], clients: int, requests: int, per_request: int, timeout: float
) -> dict[str, Any]:
    """`clients` concurrent loops share `requests` POST /predict calls; every one is timed and checked.

    A 503 with Retry-After (the service shedding load) is counted as shed, not as an error: the client
    waits as told and sends the same request again, as a well-behaved client would. Latencies are those
    of the admitted attempts; `end_to_end_ms` includes the waits after 503s."""
    import httpx

    latencies: list[float] = []
    end_to_end: list[float] = []
    errors: dict[str, int] = {}
    shed = 0
    next_request = iter(range(requests))

    async def attempt(http: httpx.AsyncClient, body: dict) -> tuple[str, float | None]:
        """'ok', 'shed' or an error kind; and for a shed request, the seconds to wait."""
        try:
            r = await http.post(f"{url}/predict", json=body)
        except httpx.HTTPError as e:
            return type(e).__name__, None
        if r.status_code == 503 and r.headers.get("retry-after", "").isdigit():
            return "shed", float(r.headers["retry-after"])
        ok = r.status_code == 200 and len(r.json()["predictions"]) == per_request
        return ("ok" if ok else f"HTTP {r.status_code}"), None

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal shed
        for i in next_request:  # one shared iterator: the total is bounded, whoever is free takes the next
            body = {"texts": [texts[(i * per_request + k) % len(texts)] for k in range(per_request)]}
            first = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                key, wait = await attempt(http, body)
                if key != "shed":
                    break
                shed += 1
                await asyncio.sleep(wait)
            if key == "ok":
                now = time.perf_counter()
                latencies.append(1000 * (now - t0))
                end_to_end.append(1000 * (now - first))
            else:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    done = len(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "texts_per_request": per_request,
        "seconds": round(seconds, 3),
        "requests_per_s": round(done / seconds, 3),
        "texts_per_s": round(done * per_request / seconds, 3),
        "latency_ms": {f"p{q}": round(percentile(latencies, q), 1) for q in (50, 90, 99)},
        "end_to_end_ms": {f"p{q}": round(percentile(end_to_end, q), 1) for q in (50, 99)},
        "shed": shed,
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def format_serve_report(r: dict[str, Any]) -> str:
    lat, e2e = r["latency_ms"], r["end_to_end_ms"]
    return "\n".join(
        [
            f"bench serve: {r['requests']} requests of {r['texts_per_request']} review(s) "
            f"from {r['clients']} concurrent clients on loopback",
            f"machine: {r['machine']}",
            f"requests/s {r['requests_per_s']:.2f} | reviews/s {r['texts_per_s']:.2f} | "
            f"admitted latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms | "
            f"with waits after 503 p50 {e2e['p50']:.0f} ms, p99 {e2e['p99']:.0f} ms",
            f"shed (503 + Retry-After, then retried) {r['shed']} | errors {r['errors']}"
            + (f" {r['error_kinds']}" if r["errors"] else ""),
            f"batching: {r['model_calls']} model calls, {r['mean_texts_per_call']:.1f} texts per call "
            f"on average, largest {r['largest_call']}; {r['model_seconds']:.1f} s in the model "
            f"(queue bound {r['max_queue']} texts, {r['max_batch_tokens']} tokens per forward pass)",
        ]
    )
