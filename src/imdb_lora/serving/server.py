"""Running the app: a bound socket (clear errors), uvicorn, and a background server for tests and benches."""

from __future__ import annotations

import ipaddress
import socket
import threading
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
    import uvicorn

    sock = bind(host, port)
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{url_host}:{sock.getsockname()[1]}  (page: /, API docs: /docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


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
