"""Inference speed of runs and exports on the same real test reviews, side by side (`bench predict`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.labeled import LabeledTexts
from ..errors import UserError, counted
from ..inference.classifier import Classifier
from ..modeling.load import position_limit
from .common import machine, percentile, test_reviews


def bench_predict(
    paths: list[str],
    samples: int = 64,
    batch_sizes: Sequence[int] | None = None,
    data: str | None = None,
    max_length: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Every model on the same real test reviews, per batch size; the first model is the baseline.
    The default batch sizes are 1 and 32, or 1 and `samples` when fewer reviews are timed."""
    if batch_sizes is None:
        batch_sizes = sorted({1, min(32, samples)})
    for size in batch_sizes:  # a larger batch ran all `samples` reviews at once, reported as `size`
        if size > samples:
            raise UserError(
                f"--batch-sizes {size} is more than the {counted(samples, 'review')} of --samples; lower it or raise --samples"
            )
    seen: dict[Path, str] = {}
    for path in paths:  # runs/x, ./runs/x and runs/x/ are one model
        where = Path(path).expanduser().resolve()
        if where in seen:
            raise UserError(f"bench predict: {path} is the same model as {seen[where]}; give each model once")
        seen[where] = path
    models = [Classifier.load(m, device=device, base_flag=False) for m in paths]
    if max_length:
        for path, clf in zip(paths, models):
            override_max_length(path, clf, max_length)
    reviews, source = test_reviews(models[0], data, samples, seed)
    tokens = [len(ids) for ids in models[0].encode(reviews.texts)]
    results = [r for bs in batch_sizes for r in time_paths(paths, models, reviews, bs)]
    report = {
        "machine": machine(),
        "reviews": len(reviews),
        "data": source,
        "tokens": {"mean": sum(tokens) / len(tokens), "max": max(tokens)},
        "results": [r.row(next(b for b in results if b.batch_size == r.batch_size)) for r in results],
    }
    return report


def override_max_length(path: str, clf: Classifier, max_length: int) -> None:
    """--max-length for one model, if it can read that many tokens as it was trained to read them."""
    marker = clf.info.get("export") or {}
    limit = marker.get("max_positions")
    if limit is None and hasattr(clf.model, "config"):  # a run or merged export (ONNX: the marker's)
        limit = position_limit(clf.model.config)
    if isinstance(limit, int) and max_length > limit:
        raise UserError(
            f"--max-length {max_length} exceeds what {path} can read ({limit} tokens per sequence)"
        )
    d = clf.config.data
    if d.truncation == "head_tail" and not d.head_tokens < max_length - 2:
        # encode() would keep the head_tokens first tokens whole: longer sequences than asked for
        raise UserError(
            f"--max-length {max_length} leaves no room for the end of a review: {path} keeps its first "
            f"{d.head_tokens} tokens (head_tail truncation); pass more than {d.head_tokens + 2}"
        )
    d.max_length = max_length


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
        f"bench predict: {report['reviews']} {report['data']}, "
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
