"""serve's guards against hostile clients (audit23): slow headers and bodies (408), the connection cap
and the file descriptor limit, error responses that stay small, aborted uploads in /metrics, and the
Host check against DNS rebinding. Real uvicorn on loopback where the server's own behaviour is tested."""

import json
import math
import resource
import socket
import time
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imdb_lora.cli import build_parser, main
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier
from imdb_lora.serving import server as server_module
from imdb_lora.serving.app import MAX_DETAILS, MAX_FIELD_CHARS, ServeSettings, create_app
from imdb_lora.serving.protocol import HeaderTimeoutProtocol, serve_protocol
from imdb_lora.serving.server import LOOPBACK_NAMES, BackgroundServer, allowed_hosts

BIG = ServeSettings(max_body_bytes=2_000_000, max_texts=64, max_chars=200, body_timeout=1)
QUICK = replace(BIG, header_timeout=0.5)  # request heads due within half a second


@pytest.fixture(scope="module")
def clf(trained_run):
    return Classifier.load(str(trained_run), device="cpu")


@pytest.fixture(scope="module")
def client(clf):
    with TestClient(create_app(clf, BIG)) as c:
        yield c


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """What comes back until the server closes. A server that answers and closes while bytes it never
    read are still arriving (a trickling client's) closes with a reset, which can end the read after
    its answer: that is a close too (seen once in a loaded fast-suite run: ConnectionResetError here)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def trickle(sock: socket.socket, start: bytes, every: float = 0.2, limit: float = 6) -> tuple[bytes, float]:
    """Send `start`, then one more byte every `every` s (never idle, never done) until the server
    answers or closes, for at most `limit` s; (what came back until the close, seconds it took)."""
    sock.sendall(start)
    sock.settimeout(every)
    t0, answer = time.monotonic(), b""
    while not answer and time.monotonic() - t0 < limit:
        try:
            answer = sock.recv(65536)
            if not answer:  # closed without an answer
                break
        except TimeoutError:
            sock.sendall(b"x")
    took = time.monotonic() - t0
    sock.settimeout(5)
    try:
        answer += read_all(sock)  # returns once the server has closed the connection
    except TimeoutError:
        pytest.fail(f"the connection was still open after {time.monotonic() - t0:.1f} s: {answer[:200]!r}")
    return answer, took


def send_slowly(sock: socket.socket, data: bytes, seconds: float, pieces: int = 5) -> None:
    step = math.ceil(len(data) / pieces)
    for i in range(0, len(data), step):
        sock.sendall(data[i : i + step])
        if i + step < len(data):
            time.sleep(seconds / (pieces - 1))


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line, body) of one response with a Content-Length, leaving the connection open."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail(f"closed mid-body: {data!r}")
    return head.split(b"\r\n")[0], body


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def requests_by_status(text: str, endpoint: str) -> dict[str, float]:
    return {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "imdb_lora_http_requests_total" and s.labels["endpoint"] == endpoint
    }


POST_HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


# ---------------------------------------------------------------- M3: slow bodies, connections, fds


def test_a_body_trickling_past_its_deadline_gets_408_and_the_connection_closes(clf):
    with BackgroundServer(create_app(clf, QUICK)) as server:  # headers due in 0.5 s, the body in 1 s
        sock = connect(server.url)
        answer, took = trickle(sock, POST_HEAD + b'{"te', every=0.25)
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(body)["error"] == "request_timeout" and "body" in json.loads(body)["message"]
    assert 0.9 < took < 4  # the whole body's deadline (1 s): not an idle timeout, nor the header one


def test_a_body_refused_before_it_was_read_does_not_reset_the_answer(clf):
    """413 for a declared Content-Length over the limit goes before the body is read. The server closed
    at once, and body bytes arriving after (or unread at) the close were answered with a reset, which
    could overtake the 413: test_real_uvicorn_on_a_free_loopback_port's httpx read then failed with
    ReadError (4 of 180 runs with frequent thread switches). Now it lingers: FIN after the answer, the
    rest of the body read and dropped until the client closes, for at most LINGER_SECONDS."""
    from imdb_lora.serving.protocol import LINGER_SECONDS

    with BackgroundServer(create_app(clf, replace(BIG, max_body_bytes=4000))) as server:
        sock = connect(server.url)
        sock.sendall(POST_HEAD.replace(b"Length: 100", b"Length: 100000"))  # the body comes after the 413
        answer = read_all(sock)  # until the server's FIN: it has answered and closed its side
        t0 = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer, answer[:200]
        for _ in range(3):  # the server still reads: no reset (before: the second send failed, EPIPE)
            sock.sendall(b"x" * 30000)
            time.sleep(0.05)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - t0 < LINGER_SECONDS + 8:  # closed for good after the linger
                sock.sendall(b"x" * 1000)
                time.sleep(0.05)
        assert time.monotonic() - t0 > LINGER_SECONDS - 0.5
        sock.close()


# ---------------------------------------------------------------- slow request heads (slowloris)


def test_headers_trickling_past_their_deadline_get_408_and_the_connection_closes(clf):
    with BackgroundServer(create_app(clf, QUICK)) as server:
        sock = connect(server.url)
        answer, took = trickle(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {
        "error": "request_timeout",
        "message": "the request headers did not arrive within 0.5 s",
        "details": [],
    }
    assert 0.4 < took < 3  # from the connection's opening, however often a byte came


def test_a_connection_that_sends_nothing_is_closed_quietly_at_the_deadline(clf):
    with BackgroundServer(create_app(clf, QUICK)) as server:
        sock = connect(server.url)
        sock.settimeout(5)
        t0 = time.monotonic()
        try:
            answer = read_all(sock)
        except TimeoutError:
            pytest.fail("a silent connection was still open after 5 s")
        took = time.monotonic() - t0
        sock.close()
    assert answer == b"" and 0.4 < took < 3  # nothing asked, nothing answered (as a keep-alive timeout)


def test_half_sent_requests_hold_the_connection_cap_only_until_their_deadline(clf):
    # 2 s, not QUICK's 0.5 s: the 503 must be seen before the deadline frees the connections, and a
    # loaded 2-core machine once took over 0.4 s to answer (a flaky failure in make test)
    with BackgroundServer(create_app(clf, replace(BIG, header_timeout=2.0)), max_connections=4) as server:
        held = [connect(server.url) for _ in range(4)]
        for s in held:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing, never closed
        with httpx.Client(base_url=server.url, timeout=10) as http:
            wait_until(lambda: http.get("/health").status_code == 503, seconds=1.5)  # the cap is reached...
            wait_until(
                lambda: http.get("/health").status_code == 200, seconds=6
            )  # ...and freed by the server
        for s in held:
            s.settimeout(5)
            assert read_all(s).startswith(b"HTTP/1.1 408")
            s.close()


def test_slow_but_complete_heads_and_keep_alive_requests_are_answered(clf):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with BackgroundServer(create_app(clf, replace(BIG, header_timeout=1.5))) as server:
        sock = connect(server.url)
        t0 = time.monotonic()
        send_slowly(sock, request, seconds=1.0)  # within 1.5 s of connecting
        assert read_response(sock) == (b"HTTP/1.1 200 OK", b'{"status":"ok"}')
        time.sleep(0.4)
        send_slowly(sock, request, seconds=0.6)  # 1 s after the first answer, over 1.5 s after connecting:
        assert read_response(sock) == (b"HTTP/1.1 200 OK", b'{"status":"ok"}')  # the deadline restarted
        assert time.monotonic() - t0 > 1.5
        t1 = time.monotonic()
        sock.settimeout(5)
        assert read_all(sock) == b""  # idle after an answer: closed at the deadline, before uvicorn's 5 s
        assert 1.2 < time.monotonic() - t1 < 3.5
        sock.close()


def json_error(answer: bytes) -> tuple[bytes, str]:
    """(status line, "error") of a JSON error answer that closed its connection."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert b"content-type: application/json" in lines and b"connection: close" in lines, answer
    return head.split(b"\r\n")[0], json.loads(body)["error"]


def test_odd_http_gets_json_errors_and_head_is_get_without_a_body(clf):
    host = b"Host: 127.0.0.1\r\n"
    long_head = b"GET /health HTTP/1.1\r\n" + host + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
    with BackgroundServer(create_app(clf, BIG)) as server:
        sock = connect(server.url)  # HEAD (a load balancer's health check) was 405
        sock.sendall(b"HEAD /health HTTP/1.1\r\n" + host + b"\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        sock.sendall(
            b"GET /health HTTP/1.1\r\n" + host + b"\r\n"
        )  # a body after HEAD's head would come first
        assert read_response(sock) == (b"HTTP/1.1 200 OK", b'{"status":"ok"}')
        sock.close()
        for request, status, error in [
            # plain text from uvicorn, not the service's JSON error shape
            (b"GARBAGE\r\n\r\n", b"400 Bad Request", "bad_request"),
            # went through when it arrived in one read (h11 bounds only a head that comes in pieces)
            (long_head, b"431 Request Header Fields Too Large", "headers_too_large"),
            # two framings of one body: h11 read the chunked one, a proxy may read the other
            (
                b"POST /predict HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"400 Bad Request",
                "bad_request",
            ),
        ]:
            sock = connect(server.url)
            sock.sendall(request)
            assert json_error(read_all(sock)) == (b"HTTP/1.1 " + status, error)
            sock.close()
        sock = connect(server.url)  # the same head in pieces: h11's own refusal, in the same shape
        for i in range(0, len(long_head), 4096):
            sock.sendall(long_head[i : i + 4096])
            time.sleep(0.01)
        assert json_error(read_all(sock)) == (
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "headers_too_large",
        )
        sock.close()


def test_the_header_deadline_fails_loudly_if_uvicorn_changes(monkeypatch):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert serve_protocol(2).header_timeout == 2
    monkeypatch.setattr(H11Protocol, "__init__", lambda self, *a, **k: None)  # no h11 connection in .conn
    with pytest.raises(RuntimeError, match=r"\.conn: serving/protocol.py needs updating"):
        serve_protocol(2)()
    monkeypatch.delattr(H11Protocol, "on_response_complete")
    with pytest.raises(RuntimeError, match="has no on_response_complete"):
        serve_protocol(2)
    monkeypatch.undo()
    monkeypatch.delattr(H11Protocol, "send_400_response")  # else plain-text 400s again, without a word
    with pytest.raises(RuntimeError, match="has no send_400_response"):
        serve_protocol(2)


def test_header_timeout_flag_help_and_errors(capsys):
    assert build_parser().parse_args(["serve", "run"]).header_timeout == 10
    assert main(["serve", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--header-timeout SECONDS seconds to receive a request's line and headers" in help_text
    assert "then 408 and the connection closes [default: 10]" in help_text
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["serve", "somewhere", "--header-timeout", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"imdb-lora: error: --header-timeout must be a number > 0 (got {float(bad)})\n"


def test_connections_beyond_the_cap_get_503_until_they_close(clf):
    with BackgroundServer(create_app(clf, BIG), max_connections=4) as server:
        held = [connect(server.url) for _ in range(4)]
        for s in held:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        with httpx.Client(base_url=server.url, timeout=10) as http:
            wait_until(lambda: http.get("/health").status_code == 503)
            for s in held:
                s.close()
            wait_until(lambda: http.get("/health").status_code == 200)


def get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock.recv(65536)


def test_one_address_past_its_cap_gets_503_and_others_are_served(clf):
    """Two connections from 127.0.0.1 are all it may hold: a third is answered 503 in the service's
    JSON shape and closed, while 127.0.0.2 (another client) and, once one closes, 127.0.0.1 get in."""
    with BackgroundServer(create_app(clf, replace(BIG, max_connections_per_client=2))) as server:
        held = [connect(server.url) for _ in range(2)]
        assert get_health(held[0]).startswith(b"HTTP/1.1 200")  # under the cap, served (kept alive)
        third = connect(server.url)
        answer = get_health(third) + read_all(third)  # then the server closes it
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "too_many_connections"
        assert "--max-connections-per-client" in json.loads(body)["message"]
        host, port = server.url.removeprefix("http://").split(":")
        other = socket.create_connection((host, int(port)), timeout=10, source_address=("127.0.0.2", 0))
        assert get_health(other).startswith(b"HTTP/1.1 200")
        other.close()
        held.pop().close()
        wait_until(lambda: healthy_on_a_new_connection(server.url))
        held[0].close()


def healthy_on_a_new_connection(url: str) -> bool:
    sock = connect(url)
    try:
        return get_health(sock).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()


def test_max_connections_per_client_flag(capsys):
    assert build_parser().parse_args(["serve", "run"]).max_connections_per_client == 0
    assert main(["serve", "somewhere", "--max-connections-per-client", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "imdb-lora: error: --max-connections-per-client must be a number >= 0 (got -1)\n"
    assert serve_protocol(10, 3).max_per_client == 3 and serve_protocol(10).max_per_client == 0


def test_serve_caps_connections_and_raises_the_open_files_limit_warning_on_stderr(clf, monkeypatch, capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2 * 64:
        pytest.skip("needs a finite hard limit on open files")
    configs = []

    class Fake:
        def __init__(self, config, *_):
            configs.append(config)

        def run(self, sockets):
            for s in sockets:
                s.close()

    monkeypatch.setattr(server_module, "draining_server", Fake)
    app = create_app(clf, ServeSettings(max_connections=hard + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        server_module.serve(app, "127.0.0.1", 0, "warning")
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised == hard
    assert configs[0].limit_concurrency == hard + 1
    assert issubclass(configs[0].http, HeaderTimeoutProtocol) and configs[0].http.header_timeout == 10
    said = capsys.readouterr()
    # on stderr, as the exposed-host warning: stdout's first line stays the URL, which scripts read (the
    # warning came first on stdout, met on a real run under `ulimit -Hn 512`)
    assert said.out.splitlines()[0].startswith("serving on http://127.0.0.1:")
    assert "lower --max-connections or raise the limit" in said.err and "warning" not in said.out


# ---------------------------------------------------------------- M4: small errors, no echoes


def test_a_body_with_many_unknown_fields_gets_one_short_422(client):
    body = {"texts": ["ok"], **{f"{i:x}": 0 for i in range(20_000)}}
    r = client.post("/predict", json=body)
    assert r.status_code == 422 and len(r.content) < 500
    data = r.json()
    assert data["error"] == "invalid_request" and [d["field"] for d in data["details"]] == ["body"]
    assert data["message"] == "body: the body has 20001 fields; it takes only texts"


def test_a_few_unknown_fields_are_still_named(client):
    data = client.post("/predict", json={"texts": ["ok"], "a": 1, "b": 2, "c": 3, "d": 4}).json()
    assert [d["field"] for d in data["details"]] == ["a", "b", "c", "d"]


def test_errors_list_at_most_ten_details_and_count_the_rest(client):
    data = client.post("/predict", json={"texts": list(range(30))}).json()
    assert [d["field"] for d in data["details"]] == [f"texts[{i}]" for i in range(MAX_DETAILS)]
    assert data["message"].startswith("texts[0]: ") and data["message"].endswith("(and 20 more errors)")


def test_a_long_field_name_is_cut_and_never_echoed_whole(client):
    name = "k" * 100_000
    r = client.post("/predict", json={"texts": ["ok"], name: 1})
    assert r.status_code == 422 and len(r.content) < 500
    assert r.json()["details"][0]["field"] == "k" * MAX_FIELD_CHARS + "..."


def test_a_digit_key_is_a_field_not_a_list_index(client):
    data = client.post("/predict", json={"texts": ["ok"], "0": 1}).json()
    assert data["details"][0]["field"] == "0" and data["message"].startswith("0: ")


# ---------------------------------------------------------------- L6: aborted uploads in /metrics


def test_aborted_uploads_count_as_499_never_500(clf):
    with BackgroundServer(create_app(clf, BIG)) as server:
        for _ in range(3):
            s = connect(server.url)
            s.sendall(POST_HEAD + b'{"te')
            s.close()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            counts: dict[str, float] = {}

            def counted() -> bool:
                counts.update(requests_by_status(http.get("/metrics").text, "/predict"))
                return sum(counts.values()) >= 3

            wait_until(counted)
    assert counts == {"499": 3}


# ---------------------------------------------------------------- Host check (DNS rebinding)


@pytest.mark.parametrize(
    "base, status",
    [
        ("http://localhost:8000", 200),
        ("http://127.0.0.1:1234", 200),
        ("http://[::1]:8000", 200),
        ("http://LOCALHOST", 200),
        ("http://rebind.example:8000", 400),
        ("http://127.0.0.1.rebind.example", 400),
    ],
)
def test_a_loopback_service_answers_only_loopback_host_names(clf, base, status):
    with TestClient(create_app(clf, BIG, list(LOOPBACK_NAMES)), base_url=base) as c:
        r = c.get("/info")
    assert r.status_code == status
    if status == 400:
        assert r.json()["error"] == "invalid_host" and "rebind" not in r.text


def test_allowed_hosts_follow_the_bind_address_and_the_flag():
    assert set(allowed_hosts("127.0.0.1", None)) == {"localhost", "127.0.0.1", "[::1]"}
    assert "[::1]" in allowed_hosts("::1", None) and "127.0.0.2" in allowed_hosts("127.0.0.2", None)
    assert allowed_hosts("0.0.0.0", None) is None  # exposed on purpose: any Host unless listed
    assert allowed_hosts("0.0.0.0", "API.example.com, localhost") == ["api.example.com", "localhost"]
    assert allowed_hosts("127.0.0.1", "*") is None and allowed_hosts("127.0.0.1", "::1") == ["[::1]"]
    for bad in ("", "a,,b", "http://x.example", "a b"):
        with pytest.raises(UserError, match="--allowed-hosts"):
            allowed_hosts("0.0.0.0", bad)


def test_an_ipv6_host_in_brackets_is_bound_as_the_address(trained_run, monkeypatch, capsys):
    """--host [::1], as a URL writes it: bound as ::1, loopback (no 'reachable' warning, the loopback Host
    names); it was a false warning, then 'cannot listen on [::1]' (Name or service not known)."""
    calls = []
    monkeypatch.setattr(server_module, "serve", lambda app, host, *a: calls.append((app, host)))
    assert main(["serve", str(trained_run), "--device", "cpu", "--host", "[::1]"]) == 0
    (app, host), said = calls[0], capsys.readouterr()
    assert host == "::1" and "warning" not in said.out + said.err
    with TestClient(app, base_url="http://rebind.example") as c:
        assert c.get("/health").status_code == 400  # loopback: only loopback Host names
    assert main(["serve", str(trained_run), "--host", "[localhost]"]) == 2
    assert "--host [localhost]: only an IPv6 address goes in brackets" in capsys.readouterr().err


def test_the_exposed_host_warning_goes_to_stderr_so_the_url_stays_stdouts_first_line(
    trained_run, monkeypatch, capsys
):
    """Scripts read serve's first stdout line for the URL: the warning for a non-loopback --host came first."""
    monkeypatch.setattr(server_module, "serve", lambda *a: print("serving on http://x"))
    assert main(["serve", str(trained_run), "--device", "cpu", "--host", "0.0.0.0"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines()[0] == "serving on http://x"
    assert "warning: --host 0.0.0.0 makes the service reachable from other machines" in said.err


def test_serve_cli_wires_the_host_check_and_the_new_limits(trained_run, monkeypatch):
    ns = build_parser().parse_args(["serve", "run"])
    assert ns.body_timeout == 10 and ns.max_connections == 1000 and ns.allowed_hosts is None
    apps = []
    monkeypatch.setattr(server_module, "serve", lambda app, *a: apps.append(app))
    base = ["serve", str(trained_run), "--device", "cpu", "--body-timeout", "3", "--max-connections", "50"]
    assert main([*base, "--header-timeout", "0.25"]) == 0
    assert main([*base, "--host", "0.0.0.0", "--allowed-hosts", "api.example.com"]) == 0
    assert apps[0].state.settings.body_timeout == 3 and apps[0].state.settings.max_connections == 50
    assert apps[0].state.settings.header_timeout == 0.25 and apps[1].state.settings.header_timeout == 10
    for app, ok, refused in zip(apps, ("localhost:8000", "api.example.com"), ("rebind.example", "localhost")):
        with TestClient(app, base_url=f"http://{ok}") as c:
            assert c.get("/health").status_code == 200
        with TestClient(app, base_url=f"http://{refused}") as c:
            assert c.get("/health").status_code == 400
