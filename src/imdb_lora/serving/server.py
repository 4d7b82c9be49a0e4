"""Running the app: a bound socket (clear errors), uvicorn, and a background server for tests and benches.

Connections are bounded here: at most `max_connections` open (uvicorn's limit_concurrency, which counts
every open connection, idle keep-alive ones and half-sent requests included, and answers a request
beyond it with a plain-text 503 and Connection: close), and the process's soft file-descriptor limit is
raised to its hard limit, so that the cap, not "Too many open files", is what a flood of connections
meets. A connection must deliver each request's line and headers within `header_timeout` seconds of
opening or of its previous response, else it is closed (408 if part of a request had come): uvicorn has
no such setting, so serve runs its own h11 protocol class (protocol.py), and a client that opens
connections and dribbles header bytes (slowloris) holds each slot only that long. Bodies are timed by
the app (BodyLimit). With `max_connections_per_client`, a connection from an address that already has
that many open is answered 503 on its first request and closed (protocol.py), so one client cannot
take every slot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI


# ---------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error (port taken, unknown host) before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_address(host: str) -> str:
    """--host as bind() takes it: an IPv6 address written as in a URL, [::1], loses its brackets (bound
    as given, it was "Name or service not known", after a warning that [::1] is not loopback)."""
    if not (host.startswith("[") and host.endswith("]")):
        return host
    try:
        return str(ipaddress.IPv6Address(host[1:-1]))
    except ValueError:
        raise UserError(f"--host {host}: only an IPv6 address goes in brackets (e.g. [::1])") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(bind_host: str, listed: str | None) -> list[str] | None:
    """The Host names the service answers (any port), None for any: `listed` (--allowed-hosts, comma
    separated, "*" for any) if given; else the loopback names when bound to loopback, against DNS
    rebinding (a page whose name points at 127.0.0.1 sends that name as Host); else any."""
    if listed is not None:
        names = [_bracketed(n.strip().lower()) for n in listed.split(",")]
        if not all(names) or any(c.isspace() or c in "/@?#" for n in names for c in n):
            raise UserError(f"--allowed-hosts must be host names separated by commas (got {listed!r})")
        return None if "*" in names else names
    if not is_loopback(bind_host):
        return None
    return list(dict.fromkeys([*LOOPBACK_NAMES, _bracketed(bind_host.lower())]))


def _bracketed(name: str) -> str:
    """An IPv6 address as a Host header writes it: [::1]."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def raise_fd_limit() -> int | None:
    """Raise the soft limit on open files to the hard one (each connection is a file descriptor); the
    soft limit after it, or None where there is no such limit. Not permitted: left as it was."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", about: str | None = None) -> None:
    """Run the app until SIGTERM or Ctrl-C, then drain (see draining_server) and return. `about`: what is
    served, printed after the line with the URL."""
    settings = app.state.settings
    fd_limit = raise_fd_limit()
    if fd_limit is not None and fd_limit < settings.max_connections + 64:  # 64: the model, logs, ...
        print(  # stderr: stdout's first line stays the URL, which scripts read
            f"warning: at most {fd_limit} open files allowed (ulimit -n), fewer than --max-connections "
            f"{settings.max_connections} needs; lower --max-connections or raise the limit",
            file=sys.stderr,
            flush=True,
        )
    sock = bind(host, port)
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{url_host}:{sock.getsockname()[1]}  (page: /, API: /openapi.json)", flush=True)
    if about:
        print(about, flush=True)
    config = uvicorn_config(
        app,
        settings.max_connections,
        log_level=log_level,
        # after the drain only idle keep-alive connections are left, so uvicorn's own wait can be short
        timeout_graceful_shutdown=2,
    )
    draining_server(config, app.state.service, settings.shutdown_timeout).run(sockets=[sock])


def uvicorn_config(app: FastAPI, max_connections: int | None, **kwargs):
    """uvicorn.Config for serve and BackgroundServer alike: the connection cap (None: none), and the
    header deadline and per-client cap from the app's settings (the default for an app without them, e.g. a test's own).
    `http` is a protocol class, so h11 even where httptools is installed (uvicorn's "auto" would take
    it): the deadline is built on h11 (protocol.py)."""
    import uvicorn

    from .app import ServeSettings
    from .protocol import serve_protocol

    settings = getattr(app.state, "settings", None) or ServeSettings()
    http = serve_protocol(settings.header_timeout, settings.max_connections_per_client)
    return uvicorn.Config(app, http=http, limit_concurrency=max_connections, **kwargs)


def draining_server(config, service, timeout: float):
    """A uvicorn.Server whose first SIGTERM or SIGINT drains instead of stopping at once.

    Draining: /health answers 503 {"status": "draining"} (a load balancer stops sending), /predict sheds
    new requests with 503, and admitted requests are still answered; once none is left, or after
    `timeout` seconds, uvicorn shuts down as usual and run() returns (the process exits 0). A second
    signal is uvicorn's own: stop now.
    """
    import uvicorn

    log = logging.getLogger("uvicorn.error")

    class DrainingServer(uvicorn.Server):
        deadline = 0.0

        def handle_exit(self, sig: int, frame) -> None:
            if service.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            # not recorded in uvicorn's captured signals: it would re-raise it after shutdown and the
            # process would end by the signal, not with exit status 0
            service.draining = True
            self.deadline = time.monotonic() + timeout
            log.info("draining: %d admitted request(s) to answer, at most %g s", service.in_flight, timeout)

        async def on_tick(self, counter: int) -> bool:  # every 0.1 s in uvicorn's main loop
            if service.draining and not self.should_exit:
                if service.in_flight == 0 or time.monotonic() >= self.deadline:
                    if service.in_flight:
                        log.warning("drain timeout: %d request(s) still unanswered", service.in_flight)
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


class BackgroundServer:
    """A real uvicorn on a free loopback port in a thread: for tests and `bench serve`, with serve's
    protocol and header deadline. No connection cap unless `max_connections` is given: `bench serve`
    holds one connection per client, as many as asked."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", max_connections: int | None = None):
        import uvicorn

        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, max_connections, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        for _ in range(500):  # up to 10 s to start
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.02)
        if not self.server.started:
            raise RuntimeError("the background server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
