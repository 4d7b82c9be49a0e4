"""uvicorn's h11 protocol with a deadline for a request's line and headers (`serve --header-timeout`),
and a cap on one client address's open connections (`serve --max-connections-per-client`).

uvicorn has no such setting: its keep-alive timer is cancelled by the first byte that arrives, and a new
connection has none, so a client that opens connections and sends nothing, or dribbles header bytes
for ever (slowloris), holds them, and with --max-connections reached everyone else gets 503.

Here a timer starts when a connection opens and again when a response has finished and the connection
waits for its next request (keep-alive); it is cancelled once h11 has read the whole head of a request
(the client's h11 state leaves IDLE). When it fires the connection is closed, after a 408 if part of a
request had arrived (an idle connection is closed quietly, as uvicorn's keep-alive timeout does). The
body has its own deadline in the app (BodyLimit), which starts where this one ends.

h11, not httptools: uvicorn's "auto" takes httptools when it is installed (uvicorn[standard]), and this
timer reads h11's state, so serve always runs h11 (a declared dependency): the same behaviour on every
machine, and the service's time goes to the model, not to parsing HTTP.

The per-client cap counts the connections open from the new one's address (uvicorn's own set of them,
so nothing here can drift from what is really open). A connection past the cap is answered 503 with
Connection: close on its first request, in the service's JSON error shape, instead of reaching the app:
the client reads why rather than a reset. Behind a reverse proxy every connection comes from the
proxy's address, so the cap is off by default.

Bytes h11 cannot read as HTTP/1.1 get the same JSON error shape (400, or 431 for a head too long),
not uvicorn's plain-text 400.

A connection closed after an answer sent before its request's body was read (413 for a declared
Content-Length over the limit, 503 shed, a Host refused: app.closing) is closed lingering, as nginx and
Apache do: the answer, then our FIN (write_eof), then the rest of the body read and dropped until the
client closes, for at most LINGER_SECONDS. Closed at once, the socket still held unread body bytes (or
got them just after), and the kernel answers those with a reset (RFC 1122 4.2.2.13), which can overtake
the answer: the client's read failed with "connection reset" instead of returning the 413 (httpx's
ReadError in test_real_uvicorn_on_a_free_loopback_port: 4 of 180 runs with frequent thread switches).

Besides the asyncio Protocol methods, this relies on uvicorn internals, all present from 0.30 to 0.54
(our pin: >=0.30,<1): the h11.Connection in `self.conn`; `on_response_complete`, which a request's
cycle calls when its response is done; `send_400_response`, called inside its `except
h11.RemoteProtocolError`; `transport`; and `connections` (the server's open protocols), `client` (the
peer's address) and `app` (what a request is handed to). Their presence is checked (serve_protocol and
__init__ raise RuntimeError, failing every serving test), and tests/serving/test_serve_guards.py fails
if the hook is no longer called (a keep-alive connection would then idle past the deadline).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")

# Seconds a connection answered before its request's body was read keeps reading (and dropping) that body
# after its answer, for the client to read the answer and close: on a loaded machine a client takes a
# while to get to it; short next to the header and body deadlines, as the connection holds its slot.
LINGER_SECONDS = 2.0


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not in within `header_timeout` s,
    and answers 503 to one whose address already has `max_per_client` others open (0: no cap)."""

    header_timeout: float = 10.0
    max_per_client: int = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(getattr(self, "conn", None), h11.Connection):
            raise RuntimeError(_changed("no longer keeps its h11.Connection in .conn"))
        for name in ("connections", "client", "app", "transport"):
            if not hasattr(self, name):
                raise RuntimeError(_changed(f"has no .{name}"))
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport = LingeringTransport(transport, self)  # what uvicorn (and its request cycles) close
        super().connection_made(transport)
        self._header_transport = transport
        if self.max_per_client and self._same_client_connections() > self.max_per_client:
            self.app = _too_many_connections(self.max_per_client)
        self._watch_headers()

    def _same_client_connections(self) -> int:
        """Open connections from this one's address, this one included (0 for a Unix socket)."""
        if not self.client:
            return 0
        host = self.client[0]
        return sum(1 for c in self.connections if c.client and c.client[0] == host)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the rest of a body whose request was answered: dropped
            return
        super().data_received(data)
        self._watch_headers()  # a head completed here cancels; a cycle ended by the request's body re-arms

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next cycle when both sides are done
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self.transport.stop_lingering()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Armed while a request head is awaited, from the moment the wait began: more bytes of the same
        head do not restart it (which is what dribbling defeats uvicorn's keep-alive timer with)."""
        transport = self._header_transport
        waiting = self.conn.their_state is h11.IDLE and transport is not None and not transport.is_closing()
        if not waiting:
            self._stop_header_timer()
        elif self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._headers_late
            )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self._header_transport
        if transport is None or transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial = bool(self.conn.trailing_data[0])
        try:
            if partial and self.conn.our_state is h11.IDLE:  # h11 lets a server answer before a request
                transport.write(self._timeout_response())
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # h11 refused (some state this did not foresee): just close
            pass
        log.debug("closed a connection whose request headers took over %g s", self.header_timeout)
        transport.close()

    def _timeout_response(self) -> bytes:
        """408 in the service's JSON error shape (app.error_json), ending the connection."""
        message = f"the request headers did not arrive within {self.header_timeout:g} s"
        return self._error_response(408, b"Request Timeout", "request_timeout", message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot read as HTTP/1.1 (a bad request line, a header without a
        colon, two Content-Lengths, a head over h11's 16 KiB...), in the service's JSON error shape
        instead of plain text; 431 where h11 says the head is too long. uvicorn calls this from inside
        its `except h11.RemoteProtocolError`, so the error is the one being handled."""
        error = sys.exc_info()[1]
        if getattr(error, "error_status_hint", 400) == 431:
            status, reason, name = 431, b"Request Header Fields Too Large", "headers_too_large"
            message = "the request line and headers are too long"
        else:
            status, reason, name = 400, b"Bad Request", "bad_request"
            message = "the request is not valid HTTP/1.1"
        try:
            self.transport.write(self._error_response(status, reason, name, message))
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be said
            pass
        self.transport.close()

    def _error_response(self, status: int, reason: bytes, error: str, message: str) -> bytes:
        """A response in the service's JSON error shape (app.error_json), ending the connection."""
        text = json.dumps({"error": error, "message": message, "details": []}, separators=(",", ":"))
        body = text.encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=reason)
        return (
            self.conn.send(response)
            + self.conn.send(h11.Data(data=body))
            + self.conn.send(h11.EndOfMessage())
        )


class LingeringTransport:
    """The connection's asyncio transport as uvicorn sees it, whose close() lingers (see the module's
    docstring) when the client's request body has not all been read (h11: the client in SEND_BODY).
    Anything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: HeaderTimeoutProtocol):
        self._transport = transport
        self._protocol = protocol
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:  # closed as far as uvicorn and the header deadline are concerned
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering:  # closed already (uvicorn's shutdown, connection_lost): the timer ends it
            return
        unread_body = self._protocol.conn.their_state is h11.SEND_BODY
        if not unread_body or self._transport.is_closing() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after the answer: the client reads it whole, then closes
        self._transport.resume_reading()  # uvicorn may have paused it (flow control)
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._transport.close)

    def pause_reading(self) -> None:
        if not self.lingering:  # lingering reads until the end
            self._transport.pause_reading()

    def stop_lingering(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def serve_protocol(header_timeout: float, max_per_client: int = 0) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this deadline and per-client cap (uvicorn
    builds one per connection from the class, so the settings travel as class attributes)."""
    for hook in ("on_response_complete", "send_400_response"):  # the others are asyncio's own
        if not callable(getattr(H11Protocol, hook, None)):
            raise RuntimeError(_changed(f"has no {hook}"))
    settings = {"header_timeout": header_timeout, "max_per_client": max_per_client}
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), settings)


def _too_many_connections(cap: int):
    """The ASGI app a connection past the per-client cap gets: 503, JSON, Connection: close."""
    from .app import closing, error_json

    message = f"this address already has {cap} connections open (--max-connections-per-client)"
    return closing(error_json(503, "too_many_connections", message))


def _changed(what: str) -> str:
    import uvicorn

    version = uvicorn.__version__
    return f"uvicorn {version}'s H11Protocol {what}: serving/protocol.py needs updating"
