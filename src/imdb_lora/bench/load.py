"""The load generator of `bench serve`: concurrent HTTP clients, in a process of their own.

A process of its own: the clients' CPU work must not share the server's interpreter lock, as real
clients would not. One keep-alive connection per client, spoken through h11 (the HTTP/1.1 library
uvicorn and httpx are built on) over plain asyncio streams: on a small machine the load generator shares
the cores with the service, so it must cost little per request. An httpx client per connection cost
~2.6 ms of CPU per request at 32 clients and ~5.7 ms at 256, most of it building 256 clients (each with
an SSL context) inside the timed window; this one opens every connection first, then starts the clock.
The module imports no model code, so the spawned process starts quickly.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from typing import Any
from urllib.parse import urlsplit

import h11

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


class HttpError(Exception):
    """A request that got no HTTP answer: refused or dropped connection, protocol error, timeout."""


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response, then the next."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout
        )
        self._h11 = h11.Connection(h11.CLIENT)

    async def post(self, target: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """POST `body` (JSON); the status, the headers (lower-case names) and the body of the answer."""
        try:
            return await asyncio.wait_for(self._exchange(target, body), self.timeout)
        except TimeoutError as e:
            await self.close()  # the answer may still come: this connection can't be reused
            raise HttpError("Timeout") from e
        except (OSError, h11.ProtocolError) as e:
            await self.close()
            raise HttpError(type(e).__name__) from e

    async def _exchange(self, target: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None or self._h11.our_state is not h11.IDLE:
            await self.open()  # first use, or the server closed the last one
        headers = [
            ("host", self.host),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        h = self._h11
        out = h.send(h11.Request(method="POST", target=target, headers=headers))
        out += h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
        self._writer.write(out)  # type: ignore[union-attr]
        await self._writer.drain()  # type: ignore[union-attr]
        status, answer_headers, chunks = 0, {}, []
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = await self._reader.read(65536)  # type: ignore[union-attr]
                h.receive_data(data)  # b"" tells h11 the server closed: it raises if mid-answer
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the server closed the connection")
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()  # keep-alive: the next request goes on the same connection
        else:
            await self.close()
        return status, answer_headers, b"".join(chunks)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None


async def run_load(
    url: str, texts: list[str], clients: int, requests: int, per_request: int, timeout: float
) -> dict[str, Any]:
    """`clients` concurrent loops share `requests` POST /predict calls; every one is timed and checked.

    Every client opens its connection before the clock starts (as a load test's warm-up would), so the
    figures are those of the service serving, not of 256 connections being set up at once.

    A 503 with Retry-After (the service shedding load) is counted as shed, not as an error: the client
    waits as told and sends the same request again, as a well-behaved client would. Latencies are those
    of the admitted attempts; `end_to_end_ms` includes the waits after 503s."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    end_to_end: list[float] = []
    errors: dict[str, int] = {}
    shed = 0
    next_request = iter(range(requests))

    def body_of(i: int) -> bytes:
        batch = [texts[(i * per_request + k) % len(texts)] for k in range(per_request)]
        return json.dumps({"texts": batch}).encode()

    async def attempt(conn: Connection, body: bytes) -> tuple[str, float | None]:
        """'ok', 'shed' or an error kind; and for a shed request, the seconds to wait."""
        try:
            status, headers, answer = await conn.post("/predict", body)
        except HttpError as e:
            return str(e), None
        if status == 503 and headers.get("retry-after", "").isdigit():
            return "shed", float(headers["retry-after"])
        try:
            ok = status == 200 and len(json.loads(answer)["predictions"]) == per_request
        except (ValueError, KeyError, TypeError):  # a body that is not the service's answer
            ok = False
        return ("ok" if ok else f"HTTP {status}"), None

    async def requests_of_one_client(conn: Connection) -> None:
        nonlocal shed
        for i in next_request:  # one shared iterator: the total is bounded, whoever is free takes the next
            body = body_of(i)
            first = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                key, wait = await attempt(conn, body)
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

    connections = [Connection(host, port, timeout) for _ in range(clients)]
    opened = await asyncio.gather(*(c.open() for c in connections), return_exceptions=True)
    # a client whose connection failed tries again on its first request (an error there if it fails)
    connect_failures = sum(isinstance(o, BaseException) for o in opened)
    t0 = time.perf_counter()
    await asyncio.gather(*(requests_of_one_client(c) for c in connections))
    seconds = time.perf_counter() - t0
    await asyncio.gather(*(c.close() for c in connections))
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
        "connect_failures_before_start": connect_failures,
    }
