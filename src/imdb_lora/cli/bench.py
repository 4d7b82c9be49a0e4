"""`imdb-lora bench train|eval|predict|serve`: benchmarks on real IMDB reviews.

    bench train / eval               training and evaluation throughput, epoch estimate, memory, MFU
    bench predict MODEL [MODEL ...]  inference speed of runs and exports, side by side, batch 1 and 32
    bench serve MODEL                HTTP load: concurrent clients against a real uvicorn on loopback

`bench` is a parser with its own subcommands; a new benchmark is one `add_*` function in BENCH_PARSERS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

from ..config import CHOICES
from ..errors import UserError, counted
from ..extras import require
from ..serving.app import ServeSettings
from .common import (
    add_data_flag,
    add_device_flag,
    add_max_batch_tokens_flag,
    batch_sizes,
    path_arg,
    positive_float,
    positive_int,
    require_directories,
)
from .serve import add_limit_flag, add_load_flags


def add_predict_bench_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="reviews/s and latency of runs and exports on the same real test reviews, side by side",
    )
    p.add_argument(
        "models",
        nargs="+",
        type=path_arg,
        help="run directories and/or export folders; the first is the baseline",
    )
    p.add_argument(
        "--samples", type=positive_int, default=64, help="test reviews per batch size [default: 64]"
    )
    p.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        help="comma-separated, each once, none above --samples [default: 1,32, or 1,SAMPLES under 32 samples]",
    )
    add_data_flag(p, "the first model's data setting")
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="tokens per review for every model [default: each model's own]",
    )
    add_device_flag(p, "cpu", scope="torch models: ")
    p.add_argument("--seed", type=int, default=0, help="which reviews, in which order [default: 0]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_predict)


def cmd_bench_predict(ns: argparse.Namespace) -> int:
    require_directories(*ns.models)
    from ..bench.predict import bench_predict, format_predict_report

    report = bench_predict(ns.models, ns.samples, ns.batch_sizes, ns.data, ns.max_length, ns.device, ns.seed)
    print(json.dumps(report, indent=2) if ns.json else format_predict_report(report))
    return 0


def add_serve_bench_parser(sub) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="HTTP load check: concurrent clients against a real server on loopback")
    p.add_argument("model", type=path_arg, help="run directory or export folder")
    p.add_argument("--clients", type=positive_int, default=32, help="concurrent clients [default: 32]")
    p.add_argument("--requests", type=positive_int, default=256, help="requests in all [default: 256]")
    p.add_argument(
        "--texts-per-request", type=positive_int, default=1, help="reviews in each request [default: 1]"
    )
    p.add_argument(
        "--samples", type=positive_int, default=256, help="distinct test reviews to send [default: 256]"
    )
    add_data_flag(p, "the model's data setting")
    p.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds a request may take [default: 300]"
    )
    add_device_flag(p)
    server = p.add_argument_group("the server's settings, as serve's")
    add_limit_flag(server, d, "--max-batch")
    add_limit_flag(server, d, "--max-wait-ms")
    add_load_flags(server, d, shutdown=False)
    add_max_batch_tokens_flag(server)
    p.add_argument("--seed", type=int, default=0, help="which reviews, in which order [default: 0]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    require("serve", "bench serve")
    if ns.texts_per_request > ns.samples:  # 10**12 texts per request hung building the first request
        raise UserError(
            f"--texts-per-request {ns.texts_per_request} is more than the {counted(ns.samples, 'review')} of --samples; "
            "lower it or raise --samples"
        )
    settings = (
        ServeSettings(
            max_batch=ns.max_batch,
            max_wait_ms=ns.max_wait_ms,
            max_queue=ns.max_queue,
            request_timeout=ns.request_timeout,
        )
        .admitting(ns.texts_per_request)
        .validate()
    )  # flag mistakes, then a mistyped path, fail before loading
    require_directories(ns.model)
    from ..bench.serve import bench_serve, format_serve_report

    load = bench_serve(
        ns.model,
        ns.clients,
        ns.requests,
        ns.texts_per_request,
        ns.samples,
        ns.data,
        ns.timeout,
        ns.device,
        settings,
        ns.seed,
        ns.max_batch_tokens,
    )
    print(json.dumps(load, indent=2) if ns.json else format_serve_report(load))
    if load["errors"]:
        raise UserError(f"bench serve: {load['errors']} of {counted(load['requests'], 'request')} failed")
    return 0


def add_bench_train_parsers(sub) -> None:
    for name, helptext in (
        ("train", "training throughput: tokens/s, epoch estimate, peak memory, MFU"),
        ("eval", "evaluation throughput: tokens/s, test-set seconds, peak memory, MFU"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--model",
            type=path_arg,
            default="roberta-base",
            metavar="NAME",
            help="base model: a local Hugging Face folder or a hub id [default: roberta-base]",
        )
        p.add_argument("--random-init", action="store_true", help="random weights (speed only)")
        add_data_flag(p, "$IMDB_LORA_DATA, else download")
        p.add_argument(
            "--method",
            choices=CHOICES["train.method"],
            default="lora",
            help="lora (adapters + classifier) or full (every weight trains) [default: lora]",
        )
        p.add_argument(
            "--batching",
            choices=CHOICES["train.batching"],
            default="auto",
            help="as train's --batching [default: auto]",
        )
        batch = 32 if name == "train" else 256
        p.add_argument(
            "--batch-size",
            type=positive_int,
            default=batch,
            help=f"reviews per {'step' if name == 'train' else 'batch'} [default: {batch}]",
        )
        p.add_argument("--max-length", type=int, default=512, help="tokens per review [default: 512]")
        if name == "train":  # eval times two whole passes (cold, warm) over --samples reviews instead
            p.add_argument("--steps", type=int, default=30, help="timed steps, after --warmup [default: 30]")
            p.add_argument(
                "--warmup", type=int, default=3, help="untimed steps first (allocation, kernels) [default: 3]"
            )
        p.add_argument(
            "--samples",
            type=int,
            help=(
                "train reviews each step's batch is drawn from"
                if name == "train"
                else "test reviews each pass reads"
            )
            + " [default: all of the split]",
        )
        add_device_flag(p)
        p.add_argument(
            "--peak-tflops",
            type=positive_float,
            help="device peak for MFU [default: the detected GPU's data sheet; on CPU, measured]",
        )
        p.add_argument(
            "--compile",
            action="store_true",
            help="as train's --compile: torch.compile each encoder layer (one graph serves every layer)",
        )
        if name == "train":
            p.add_argument(
                "--cuda-graphs",
                action="store_true",
                help="with --batching flat on CUDA: capture each step as a CUDA graph per length bucket",
            )
            p.add_argument(
                "--bf16-working-copies",
                action="store_true",
                help="as train's --bf16-working-copies (--batching flat, LoRA): bf16 working copies of "
                "the trainable weights and one bf16 cast of each shared input",
            )
            p.add_argument(
                "--fused-qkv",
                action="store_true",
                help="as train's --fused-qkv (--batching flat, LoRA): q, k and v as one GEMM each for the "
                "frozen weights, the LoRA A's and B's, one LoRA dropout mask shared by the three",
            )
        p.add_argument(
            "--profile",
            type=int,
            default=0,
            metavar="N",
            help="after timing, profile N more steps (batches for eval): host ops and device kernels per "
            "step, the device's busy fraction, the costliest ops",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=cmd_bench_train if name == "train" else cmd_bench_eval)


def _throughput_options(ns: argparse.Namespace):
    from ..bench.train import ThroughputOptions

    return ThroughputOptions(
        **{f.name: getattr(ns, f.name) for f in dataclasses.fields(ThroughputOptions) if hasattr(ns, f.name)}
    )


def cmd_bench_train(ns: argparse.Namespace) -> int:
    from ..bench.train import bench_train, format_report

    report = bench_train(_throughput_options(ns))
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


def cmd_bench_eval(ns: argparse.Namespace) -> int:
    from ..bench.train import bench_eval, format_report

    report = bench_eval(_throughput_options(ns))
    print(json.dumps(report) if ns.json else format_report(report))
    return 0


BENCH_PARSERS: list[Callable] = [add_bench_train_parsers, add_predict_bench_parser, add_serve_bench_parser]


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: training and evaluation throughput (train, eval), inference speed (predict), HTTP load (serve)",
    )
    children = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add in BENCH_PARSERS:
        add(children)
