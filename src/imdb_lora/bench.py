"""`imdb-lora bench ...`: benchmarks on real IMDB test reviews.

    bench predict MODEL [MODEL ...]  inference speed of runs and exports, side by side, batch 1 and 32
    bench serve MODEL                HTTP load: concurrent clients against a real uvicorn on loopback

`bench` is a parser with its own subcommands; a new benchmark is one `add_*` function in BENCH_PARSERS.
Heavy imports (torch, onnxruntime, FastAPI) happen inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .bench_train import add_bench_train_parsers
from .errors import UserError

if TYPE_CHECKING:
    from .data import LabeledTexts
    from .predict import Classifier


# ---------------------------------------------------------------- shared helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation, so p99 of 50 values is the maximum."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least the first
    return ordered[int(rank) - 1]


def test_reviews(clf: Classifier, data: str | None, n: int, seed: int) -> LabeledTexts:
    """n real test reviews (stratified, then shuffled with `seed`): the same ones for every model."""
    from .data import load_splits, stratified_subset

    data_cfg = clf.config.data
    if data:
        data_cfg.path, data_cfg.train_file, data_cfg.test_file = data, None, None
    data_cfg.max_eval_samples = None
    test = load_splits(data_cfg, seed).test
    if n > len(test):
        raise UserError(f"--samples {n}: the test split has only {len(test)} reviews")
    idx = stratified_subset(test.labels, n, seed)
    random.Random(seed).shuffle(idx)  # mixed lengths and labels, as requests would come
    return test.take(idx)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def batch_sizes(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


# ---------------------------------------------------------------- bench predict


@dataclass
class PathResult:
    model: str
    format: str
    backend: str
    batch_size: int
    reviews: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    correct: int = 0
    agree: int = 0  # labels equal to the first model's

    @property
    def reviews_per_s(self) -> float:
        return self.reviews / self.seconds

    def row(self, baseline: PathResult) -> dict[str, Any]:
        return {
            "model": self.model,
            "format": self.format,
            "backend": self.backend,
            "batch_size": self.batch_size,
            "reviews": self.reviews,
            "reviews_per_s": round(self.reviews_per_s, 3),
            "latency_ms": {f"p{q}": round(percentile(self.latencies_ms, q), 1) for q in (50, 90, 99)},
            "accuracy": self.correct / self.reviews,
            "agreement_with_first": self.agree / self.reviews,
            "speedup": round(self.reviews_per_s / baseline.reviews_per_s, 3),
        }


def add_predict_bench_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="reviews/s and latency of runs and exports on the same real test reviews, side by side",
    )
    p.add_argument(
        "models", nargs="+", help="run directories and/or export folders; the first is the baseline"
    )
    p.add_argument(
        "--samples", type=positive_int, default=64, help="test reviews per batch size [default: 64]"
    )
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 32], help="comma-separated [default: 1,32]")
    p.add_argument("--data", help="IMDB folder/archive (default: the first model's data setting)")
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="tokens per review for every model (default: each model's own)",
    )
    p.add_argument("--device", default="cpu", help="device for torch models [default: cpu]")
    p.add_argument("--seed", type=int, default=0, help="which reviews, in which order")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_predict)


def cmd_bench_predict(ns: argparse.Namespace) -> int:
    from .predict import Classifier

    if len(set(ns.models)) != len(ns.models):
        raise UserError("bench predict: each model once, please")
    models = [Classifier.load(m, device=ns.device) for m in ns.models]
    for clf in models:
        if ns.max_length:
            clf.config.data.max_length = ns.max_length
    reviews = test_reviews(models[0], ns.data, ns.samples, ns.seed)
    tokens = [len(ids) for ids in models[0].encode(reviews.texts)]
    results = [r for bs in ns.batch_sizes for r in time_paths(ns.models, models, reviews, bs)]
    report = {
        "machine": machine(),
        "reviews": len(reviews),
        "tokens": {"mean": sum(tokens) / len(tokens), "max": max(tokens)},
        "results": [r.row(next(b for b in results if b.batch_size == r.batch_size)) for r in results],
    }
    print(json.dumps(report, indent=2) if ns.json else format_predict_report(report))
    return 0


def time_paths(
    names: list[str], models: list[Classifier], reviews: LabeledTexts, bs: int
) -> list[PathResult]:
    """Time every model on the same batches, interleaved batch by batch, so that a noisy neighbour on
    the CPU slows all of them alike and the ratios stay fair. One warm-up batch each, untimed."""
    from tqdm.auto import tqdm

    chunks = [list(range(i, min(i + bs, len(reviews)))) for i in range(0, len(reviews), bs)]
    results = [
        PathResult(name, (clf.info.get("export") or {}).get("format", "run"), clf.backend, bs, 0, 0.0, [])
        for name, clf in zip(names, models)
    ]
    for clf in models:
        clf.logits([reviews.texts[i] for i in chunks[0]], bs)
    for chunk in tqdm(chunks, desc=f"bench batch size {bs}", unit="batch", leave=False):
        texts = [reviews.texts[i] for i in chunk]
        first: list[int] | None = None
        for clf, res in zip(models, results):
            t0 = time.perf_counter()
            labels = clf.logits(texts, bs).argmax(-1).tolist()
            dt = time.perf_counter() - t0
            first = first or labels
            res.seconds += dt
            res.reviews += len(texts)
            res.latencies_ms.append(1000 * dt)
            res.correct += sum(int(p == reviews.labels[i]) for p, i in zip(labels, chunk))
            res.agree += sum(int(p == q) for p, q in zip(labels, first))
    for res, clf in zip(results, models):
        if (clf.info.get("export") or {}).get("quantize"):
            res.format += "+" + clf.info["export"]["quantize"]
    return results


def format_predict_report(report: dict[str, Any]) -> str:
    lines = [
        f"bench predict: {report['reviews']} real IMDB test reviews, "
        f"{report['tokens']['mean']:.0f} tokens on average (max {report['tokens']['max']})",
        f"machine: {report['machine']}",
        "",
        f"{'model':<34} {'format':<12} {'backend':<12} {'batch':>5} {'reviews/s':>10} "
        f"{'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'acc %':>7} {'agree %':>8} {'speed-up':>9}",
    ]
    for r in report["results"]:
        lat = r["latency_ms"]
        lines.append(
            f"{_short(r['model'], 34):<34} {r['format']:<12} {r['backend']:<12} {r['batch_size']:>5} "
            f"{r['reviews_per_s']:>10.2f} {lat['p50']:>9.1f} {lat['p90']:>9.1f} {lat['p99']:>9.1f} "
            f"{100 * r['accuracy']:>7.2f} {100 * r['agreement_with_first']:>8.2f} {r['speedup']:>8.2f}x"
        )
    lines.append(
        "\nspeed-up: reviews/s relative to the first model at the same batch size; latency is per call"
    )
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


# ---------------------------------------------------------------- bench serve


def add_serve_bench_parser(sub) -> None:
    from .serve import ServeSettings

    d = ServeSettings()
    p = sub.add_parser("serve", help="HTTP load check: concurrent clients against a real server on loopback")
    p.add_argument("model", help="run directory or export folder")
    p.add_argument("--clients", type=positive_int, default=32, help="concurrent clients [default: 32]")
    p.add_argument("--requests", type=positive_int, default=256, help="requests in all [default: 256]")
    p.add_argument("--texts-per-request", type=positive_int, default=1, help="[default: 1]")
    p.add_argument(
        "--samples", type=positive_int, default=256, help="distinct test reviews to send [default: 256]"
    )
    p.add_argument("--data", help="IMDB folder/archive (default: the model's data setting)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take [default: 300]")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="server: texts per model call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="server: batching wait")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from .predict import Classifier
    from .serve import BackgroundServer, ServeSettings, create_app

    settings = ServeSettings(max_batch=ns.max_batch, max_wait_ms=ns.max_wait_ms)
    settings.max_texts = max(settings.max_texts, ns.texts_per_request)
    clf = Classifier.load(ns.model, device=ns.device)
    reviews = test_reviews(clf, ns.data, ns.samples, ns.seed).texts
    app = create_app(clf, settings)
    with BackgroundServer(app) as server:
        load = asyncio.run(
            run_load(server.url, reviews, ns.clients, ns.requests, ns.texts_per_request, ns.timeout)
        )
    stats = app.state.batcher.stats
    load.update(
        model_calls=stats.calls,
        mean_texts_per_call=stats.texts / max(1, stats.calls),
        largest_call=stats.largest,
    )
    load["machine"] = machine()
    print(json.dumps(load, indent=2) if ns.json else format_serve_report(load))
    if load["errors"]:
        raise UserError(f"bench serve: {load['errors']} of {load['requests']} requests failed")
    return 0


async def run_load(
    url: str, texts: list[str], clients: int, requests: int, per_request: int, timeout: float
) -> dict[str, Any]:
    """`clients` concurrent loops share `requests` POST /predict calls; every one is timed and checked."""
    import asyncio

    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_request = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_request:  # one shared iterator: the total is bounded, whoever is free takes the next
            body = {"texts": [texts[(i * per_request + k) % len(texts)] for k in range(per_request)]}
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/predict", json=body)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == per_request
                key = "ok" if ok else f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            if key == "ok":
                latencies.append(1000 * (time.perf_counter() - t0))
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
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def format_serve_report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return "\n".join(
        [
            f"bench serve: {r['requests']} requests of {r['texts_per_request']} review(s) "
            f"from {r['clients']} concurrent clients on loopback",
            f"machine: {r['machine']}",
            f"requests/s {r['requests_per_s']:.2f} | reviews/s {r['texts_per_s']:.2f} | "
            f"latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms | "
            f"errors {r['errors']}" + (f" {r['error_kinds']}" if r["errors"] else ""),
            f"batching: {r['model_calls']} model calls, {r['mean_texts_per_call']:.1f} texts per call "
            f"on average, largest {r['largest_call']}",
        ]
    )


# ---------------------------------------------------------------- registration

BENCH_PARSERS: list[Callable] = [add_predict_bench_parser, add_serve_bench_parser, add_bench_train_parsers]


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: training and evaluation throughput (train, eval), inference speed (predict), HTTP load (serve)",
    )
    children = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add in BENCH_PARSERS:
        add(children)
