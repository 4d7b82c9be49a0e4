"""The load generator of `bench serve`: concurrent HTTP clients, in a process of their own.

A process of its own: the clients' CPU work (HTTP, JSON) must not share the server's interpreter lock,
as real clients would not; and one connection per client, since a single client object with hundreds
of pooled connections spends more CPU managing its pool than the server spends per request. This module
imports no model code, so the spawned process starts quickly.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

from .common import percentile


def run_load_in_process(
    url: str, texts: list[str], clients: int, requests: int, per_request: int, timeout: float
) -> dict[str, Any]:
    """run_load in a freshly spawned process (not forked: the parent holds torch's thread pools)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_load, (url, texts, clients, requests, per_request, timeout))


def _run_load(*args: Any) -> dict[str, Any]:
    cpu0 = time.process_time()
    out = asyncio.run(run_load(*args))
    # The load generator shares the machine's cores with the service: its CPU time is reported so
    # that a figure on a small machine can be read for what it is.
    out["load_generator_cpu_seconds"] = round(time.process_time() - cpu0, 2)
    return out


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

    async def client() -> None:
        async with httpx.AsyncClient(timeout=timeout) as http:  # one connection per client, as in life
            await requests_of_one_client(http)

    async def requests_of_one_client(http: httpx.AsyncClient) -> None:
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

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
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
