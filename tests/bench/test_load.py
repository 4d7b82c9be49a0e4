"""The load generator of `bench serve` against a scripted service on loopback: it counts admitted
requests, 503 + Retry-After as shed (then retried), other statuses and dropped connections as errors,
and keeps one connection per client."""

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from imdb_lora.bench.load import run_load
from imdb_lora.serving.server import BackgroundServer


def scripted_app(answers: list[str]) -> tuple[FastAPI, dict]:
    """Answers POST /predict as the script says, in order, then 'ok' for ever; counts connections."""
    seen = {"requests": 0, "peers": set(), "texts": []}
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.json()
        seen["peers"].add(request.client.port)
        seen["texts"].append(body["texts"])
        i, seen["requests"] = seen["requests"], seen["requests"] + 1
        what = answers[i] if i < len(answers) else "ok"
        if what == "shed":
            return JSONResponse({"detail": "busy"}, status_code=503, headers={"Retry-After": "0"})
        if what == "500":
            return JSONResponse({"detail": "boom"}, status_code=500)
        if what == "short":  # a 200 with the wrong number of predictions is an error too
            return {"predictions": []}
        if what == "garbage":  # so is a 200 whose body is not the service's JSON
            return Response(b"<html>", media_type="text/html")
        if what == "drop":  # the service answers with a body shorter than it announced, then closes
            return Response(b"{", headers={"content-length": "99"})
        return {"predictions": [{"label": "positive"}] * len(body["texts"])}

    return app, seen


def load(app: FastAPI, **kw) -> dict:
    args = {"texts": ["a", "b", "c"], "clients": 2, "requests": 10, "per_request": 2, "timeout": 10.0}
    with BackgroundServer(app) as server:
        return asyncio.run(run_load(server.url, **(args | kw)))


def test_counts_admitted_shed_and_errors():
    app, seen = scripted_app(["ok", "shed", "shed", "500", "short", "drop", "garbage"])
    r = load(app, clients=1)  # one client: the service sees the requests in the client's order
    # 10 requests: 2 shed attempts are retried (not errors), 4 fail in 4 ways, 6 are admitted
    assert r["shed"] == 2 and seen["requests"] == 12
    assert r["errors"] == 4 and r["error_kinds"] == {"HTTP 500": 1, "HTTP 200": 2, "RemoteProtocolError": 1}
    assert r["requests_per_s"] == pytest.approx(6 / r["seconds"], rel=0.01)
    # texts cycle through the list, per_request at a time; a retried request sends the same texts
    assert all(len(t) == 2 for t in seen["texts"]) and seen["texts"][1] == seen["texts"][2]
    assert r["connect_failures_before_start"] == 0


def test_one_keep_alive_connection_per_client():
    app, seen = scripted_app([])
    r = load(app, clients=3, requests=30)
    assert r["errors"] == 0 and r["shed"] == 0 and seen["requests"] == 30
    assert len(seen["peers"]) == 3  # three clients, three connections, each reused


def test_a_refused_connection_is_an_error_not_a_hang():
    r = asyncio.run(run_load("http://127.0.0.1:9", ["a"], 1, 2, 1, 2.0))  # nothing listens on port 9
    assert r["connect_failures_before_start"] == 1
    assert r["errors"] == 2 and r["requests_per_s"] == 0
