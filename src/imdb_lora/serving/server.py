"""Running the app: a bound socket (clear errors), uvicorn, and a background server for tests and benches."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the app until SIGTERM or Ctrl-C, then drain (see draining_server) and return."""
    import uvicorn

    sock = bind(host, port)
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{url_host}:{sock.getsockname()[1]}  (page: /, API docs: /docs)", flush=True)
    # after the drain only idle keep-alive connections are left, so uvicorn's own wait can be short
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
    draining_server(config, app.state.service, app.state.settings.shutdown_timeout).run(sockets=[sock])


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
    """A real uvicorn on a free loopback port in a thread: for tests and `bench serve`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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
