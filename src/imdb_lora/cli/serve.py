"""`imdb-lora serve`: the HTTP service on a run directory or an export."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..extras import require
from ..serving.app import ServeSettings
from .common import (
    add_base_model_flag,
    add_device_flag,
    add_max_batch_tokens_flag,
    add_raw_flag,
    path_arg,
    require_directories,
)

# (flag, type, ServeSettings field, help): the service's input and batching limits.
SERVE_LIMITS = [
    ("--max-texts", int, "max_texts", "texts per request"),
    ("--max-chars", int, "max_chars", "characters per text"),
    ("--max-body-bytes", int, "max_body_bytes", "request body bytes"),
    ("--max-batch", int, "max_batch", "texts per model call across requests"),
    ("--max-wait-ms", float, "max_wait_ms", "ms to wait for more requests to batch"),
    ("--body-timeout", float, "body_timeout", "seconds to receive a whole request body, then 408"),
    (
        "--header-timeout",
        float,
        "header_timeout",
        "seconds to receive a request's line and headers, from connecting or the previous response; "
        "then 408 and the connection closes",
    ),
    ("--max-connections", int, "max_connections", "open connections, idle ones included; beyond: 503"),
    (
        "--max-connections-per-client",
        int,
        "max_connections_per_client",
        "open connections from one client address; beyond: 503 (0: no cap; behind a proxy, all "
        "connections share its address)",
    ),
]


def add_serve_parser(sub) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="HTTP service with request batching, a web page and an OpenAPI schema")
    p.add_argument("model", type=path_arg, help="run directory or export folder")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1: this machine only) [default: 127.0.0.1]",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on [default: 8000]")
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="Host header names to answer, comma separated, any port ('*': any) [default: localhost, "
        "127.0.0.1 and ::1 on a loopback --host (against DNS rebinding), else any]",
    )
    add_device_flag(p)
    add_base_model_flag(p)
    add_raw_flag(p)
    for flag, *_ in SERVE_LIMITS:
        add_limit_flag(p, d, flag)
    add_max_batch_tokens_flag(p)
    add_load_flags(p, d)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level [default: info]",
    )
    p.set_defaults(func=cmd_serve)


def add_limit_flag(p: argparse.ArgumentParser, d: ServeSettings, flag: str) -> None:
    """One of SERVE_LIMITS (`bench serve` passes some on to its server, in the same words)."""
    _, kind, field, what = next(limit for limit in SERVE_LIMITS if limit[0] == flag)
    default = getattr(d, field)
    shown = f"{default:,}" if isinstance(default, int) else f"{default:g}"
    metavar = "N" if kind is int else "MS" if flag.endswith("-ms") else "SECONDS"
    p.add_argument(flag, type=kind, default=default, metavar=metavar, help=f"{what} [default: {shown}]")


def add_load_flags(p: argparse.ArgumentParser, d: ServeSettings, shutdown: bool = True) -> None:
    """Overload and shutdown behaviour (shared with `bench serve`, which stops its server itself)."""
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        metavar="N",
        help=f"texts waiting for the model; beyond it /predict answers 503 + Retry-After [default: {d.max_queue}]",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        metavar="SECONDS",
        help=f"an admitted request unanswered after this long gets 504 [default: {d.request_timeout:g}]",
    )
    if not shutdown:
        return
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        metavar="SECONDS",
        help=f"on SIGTERM, wait at most this long for admitted requests [default: {d.shutdown_timeout:g}]",
    )


def settings_from_args(ns: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        max_body_bytes=ns.max_body_bytes,
        max_texts=ns.max_texts,
        max_chars=ns.max_chars,
        max_batch=ns.max_batch,
        max_wait_ms=ns.max_wait_ms,
        max_queue=ns.max_queue,
        request_timeout=ns.request_timeout,
        shutdown_timeout=ns.shutdown_timeout,
        body_timeout=ns.body_timeout,
        header_timeout=ns.header_timeout,
        max_connections=ns.max_connections,
        max_connections_per_client=ns.max_connections_per_client,
    ).validate()


def cmd_serve(ns: argparse.Namespace) -> int:
    require("serve", "serve")
    settings = settings_from_args(ns)
    if not 0 <= ns.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (got {ns.port})")
    from ..serving.server import allowed_hosts, bind_address, is_loopback, serve

    host = bind_address(ns.host)
    hosts = allowed_hosts(host, ns.allowed_hosts)  # a flag mistake fails before the model loads
    require_directories(ns.model)
    from ..inference.classifier import Classifier
    from ..serving.app import create_app

    clf = Classifier.load(
        ns.model, device=ns.device, base_model=ns.base_model, raw=ns.raw, max_batch_tokens=ns.max_batch_tokens
    )
    if not is_loopback(host):  # stderr: stdout's first line stays the URL, which scripts read
        print(
            f"warning: --host {host} makes the service reachable from other machines",
            file=sys.stderr,
            flush=True,
        )
    # said after the line with the URL, which stays the first (scripts read it)
    about = f"loaded {ns.model}: {clf.describe()}"
    serve(create_app(clf, settings, hosts), host, ns.port, ns.log_level, about)
    return 0
