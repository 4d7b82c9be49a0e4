"""HTTP service: one Classifier, loaded once; requests that arrive together are batched into one model call.

    POST /predict  {"texts": [...]} -> per text: label, label_id, confidence, probabilities
    GET  /health   liveness: 200 {"status": "ok"}, or 503 {"status": "draining"} while shutting down
    GET  /info     base model, method, format, temperature (and --raw), metrics from the run, limits
    GET  /metrics  Prometheus text format: requests, latency, model calls, queue depth, shed requests
    GET  /         a small page to try the model; /openapi.json describes the API (no /docs or /redoc:
                   FastAPI's pages load scripts from a CDN, blank offline and foreign code on this origin)

Every input is bounded (body bytes, the time to send the headers and the body, texts per request,
characters per text, fields in the body), and errors are JSON `{"error", "message", "details"}` that
never carry tracebacks, paths or the submitted text back (at most MAX_DETAILS details; field names cut
to MAX_FIELD_CHARS). Connections and the time to send request headers are bounded by the server
(server.py), and a loopback service answers only loopback Host names (HostCheck: a web page cannot reach
it by DNS rebinding).

Under load the service sheds rather than queues without end: texts waiting for the model are bounded
(max_queue), and beyond that /predict answers 503 at once with Retry-After; an admitted request waits at
most request_timeout seconds (then 504), and a request whose client has gone is withdrawn before the
model computes it.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time,
and the request model is built per app from its limits. FastAPI, pydantic and the model are imported
inside functions, so the CLI (which registers `serve` from here) starts fast and works without them.
"""

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from .. import __version__
from ..data.files import RepeatedKey, unique_keys
from ..data.labeled import LABEL_NAMES, has_content
from ..errors import UserError
from .batcher import Batcher, Job, ModelError
from .metrics import RequestMetrics, ServiceMetrics

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from ..inference.classifier import Classifier, Prediction

log = logging.getLogger("imdb_lora.serve")

MAX_DETAILS = 10  # validation errors listed in one response; the rest are only counted
MAX_FIELD_CHARS = 64  # a client's field name is cut to this in errors (never echoed whole)
MAX_UNKNOWN_FIELDS = 4  # unknown body fields named one by one; a body with more is refused as a whole
# a request's line and headers, in bytes: h11 refuses a longer head only when it arrives in pieces (one
# that comes in a single read, up to 256 KiB, went through), so RequestChecks refuses it whatever way
MAX_HEAD_BYTES = 16 * 1024
PATHS = "the service answers POST /predict and GET /, /health, /info, /metrics and /openapi.json"


# the smallest body /predict answers, {"texts":["x"]}: a lower --max-body-bytes refuses every request
SMALLEST_BODY = 15


@dataclass
class ServeSettings:
    max_body_bytes: int = 2_000_000  # 64 reviews of 20,000 characters, with room for JSON escapes
    max_texts: int = 64  # texts in one request
    max_chars: int = 20_000  # characters in one text (the longest IMDB review has about 14,000)
    max_batch: int = 64  # texts in one model call, summed over the requests it gathers
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    model_batch_size: int = 32  # rows per forward pass inside a model call (length-sorted)
    max_queue: int = 256  # texts admitted and waiting for a model call; beyond it: 503 + Retry-After
    request_timeout: float = 30.0  # seconds an admitted request may wait for its answer; then 504
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for admitted requests before exiting anyway
    body_timeout: float = 10.0  # seconds to receive a whole request body (a slow sender holds a slot); 408
    header_timeout: float = 10.0  # seconds to receive a request's line and headers (server.py); 408, closed
    max_connections: int = 1000  # open connections, idle ones included (uvicorn's limit_concurrency); 503
    # open connections from one client address (protocol.py); 503. 0: no cap, the default, because
    # behind a reverse proxy every connection comes from the proxy's one address
    max_connections_per_client: int = 0

    def validate(self) -> "ServeSettings":
        for name, value in asdict(self).items():
            flag = f"--{name.replace('_', '-')}"
            if name == "header_timeout":  # any positive time, fractions of a second too
                if not (math.isfinite(value) and value > 0):
                    raise UserError(f"{flag} must be a number > 0 (got {value})")
                continue
            lowest = 0 if name in ("max_wait_ms", "max_connections_per_client") else 1
            if not math.isfinite(value) or value < lowest:
                raise UserError(f"{flag} must be a number >= {lowest} (got {value})")
        # else the service started and answered every /predict 413
        if self.max_body_bytes < SMALLEST_BODY:
            raise UserError(
                f"--max-body-bytes ({self.max_body_bytes}) must be at least {SMALLEST_BODY}: the smallest "
                'request, {"texts":["x"]}, would not fit'
            )
        if self.max_queue < self.max_texts:  # else a full-size request could never be admitted
            raise UserError(f"--max-queue ({self.max_queue}) must be at least --max-texts ({self.max_texts})")
        if self.max_wait_ms >= 1000 * self.request_timeout:  # else a request without company gets 504
            raise UserError(
                f"--max-wait-ms ({self.max_wait_ms:g}) must be below --request-timeout "
                f"({self.request_timeout:g} s): a request waiting that long for company times out"
            )
        return self

    def admitting(self, texts_per_request: int) -> "ServeSettings":
        """A copy widened so that requests of this many texts are admitted (`bench serve`'s load)."""
        max_texts = max(self.max_texts, texts_per_request)
        return replace(self, max_texts=max_texts, max_queue=max(self.max_queue, max_texts))


@dataclass
class ServiceState:
    """What graceful shutdown needs to see and set: the server flips `draining` on SIGTERM and exits
    once `in_flight` (admitted /predict requests not yet answered) reaches 0."""

    draining: bool = False
    in_flight: int = 0


# ---------------------------------------------------------------- request and response models


def _has_content(text: str) -> str:
    if not has_content(text):
        raise ValueError("text must not be empty or only whitespace or control characters")
    return text


def request_model(settings: ServeSettings):
    """The /predict body, with this server's limits in its schema (and so in the OpenAPI docs)."""
    from pydantic import AfterValidator, ConfigDict, Field, create_model, model_validator

    text = Annotated[str, Field(min_length=1, max_length=settings.max_chars), AfterValidator(_has_content)]
    texts = Annotated[
        list[text],  # type: ignore[valid-type]
        Field(
            min_length=1,
            max_length=settings.max_texts,
            description=f"1 to {settings.max_texts} texts of at most {settings.max_chars} characters",
            examples=[["A wonderful film, I loved it.", "Two hours I will never get back."]],
        ),
    ]
    # strict: a number is not a text; forbid: a misspelt field is an error, not silently ignored
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(strict=True, extra="forbid"),
        __validators__={"few_fields": model_validator(mode="before")(_few_fields)},
        texts=(texts, ...),
    )


def _few_fields(data: Any) -> Any:
    """Refuse a body with many fields in one error, before pydantic builds one error per unknown field
    (180,000 keys in 1.7 MB took seconds of the event loop and a 12 MB answer)."""
    from pydantic_core import PydanticCustomError

    if isinstance(data, dict) and len(data) > 1 + MAX_UNKNOWN_FIELDS:
        raise PydanticCustomError(
            "too_many_fields", "the body has {n} fields; it takes only texts", {"n": len(data)}
        )
    return data


@cache
def response_models() -> dict[str, type]:
    """PredictResponse and ErrorResponse, for the OpenAPI docs (built once, on first use)."""
    from pydantic import BaseModel, Field

    class Probabilities(BaseModel):
        negative: float
        positive: float

    class PredictionOut(BaseModel):
        label: Literal["NEGATIVE", "POSITIVE"]
        label_id: int
        confidence: float = Field(description="probability of the predicted label")
        probabilities: Probabilities

    class PredictResponse(BaseModel):
        predictions: list[PredictionOut]

    class ErrorDetail(BaseModel):
        field: str
        message: str

    class ErrorResponse(BaseModel):
        error: str
        message: str
        details: list[ErrorDetail] = []

    return {"predict": PredictResponse, "error": ErrorResponse}


def error_json(status: int, error: str, message: str, details: list[dict] | None = None) -> "JSONResponse":
    from starlette.responses import JSONResponse

    return JSONResponse({"error": error, "message": message, "details": details or []}, status_code=status)


def closing(response: "JSONResponse") -> "JSONResponse":
    """The response with Connection: close, for answers sent before the request body was read: the
    connection ends with it instead of waiting for (or reading) the rest of a body nobody wants."""
    response.headers["Connection"] = "close"
    return response


def prediction_out(p: "Prediction") -> dict[str, Any]:
    """Prediction.to_dict (the numbers `predict --json` prints) without echoing the text back."""
    d = p.to_dict()
    d.pop("text")
    return d


# ---------------------------------------------------------------- body limits, Host check


class BodyLimit:
    """Reject bodies over `max_bytes` with 413 before they are parsed, whether or not Content-Length is
    sent (chunked bodies are counted as they arrive, and buffering stops at the limit); and bodies not
    received whole within `timeout` seconds with 408, so a slow sender cannot hold a connection for ever."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except _TooLarge:
            return await self._too_large(scope, receive, send)
        except asyncio.TimeoutError:
            message = f"the request body did not arrive within {self.timeout:g} s"
            return await closing(error_json(408, "request_timeout", message))(scope, receive, send)
        if body is None:  # the client left before sending it all: nobody to answer (/metrics: 499)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                raise _TooLarge
        return body

    async def _too_large(self, scope, receive, send) -> None:
        response = error_json(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        await closing(response)(scope, receive, send)


class _TooLarge(Exception):
    pass


class RequestChecks:
    """Refuse from its head alone (once BodyLimit has bounded the body) a request that cannot be answered
    well: a head over MAX_HEAD_BYTES (431); both Content-Length and Transfer-Encoding (400: two framings
    of one body, which a proxy in front and this server could read as different requests); a POST
    /predict body that is not JSON, compressed (Content-Encoding) or declared in a charset other than
    UTF-8 (415: a gzip body was read as bytes and answered "not valid JSON"). HEAD is routed as GET
    (uvicorn sends the headers alone), as Starlette's own routes do: a HEAD health check got 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = head_problem(scope)
        if problem is not None:
            return await closing(error_json(*problem))(scope, receive, send)
        if scope["method"] == "HEAD":  # a copy: uvicorn keeps its own scope's HEAD and sends no body
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def head_problem(scope) -> tuple[int, str, str] | None:
    """(status, error, message) for a request RequestChecks refuses, None for one it lets through."""
    headers = scope["headers"]
    size = len(scope.get("raw_path") or b"") + len(scope["query_string"])
    if size + sum(len(name) + len(value) + 4 for name, value in headers) > MAX_HEAD_BYTES:
        return 431, "headers_too_large", f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
    first: dict[bytes, bytes] = {}
    for name, value in headers:
        first.setdefault(name, value)
    if b"content-length" in first and b"transfer-encoding" in first:
        return 400, "bad_request", "the request has both Content-Length and Transfer-Encoding; send one"
    if scope["method"] != "POST" or scope["path"] != "/predict":
        return None
    encoding = first.get(b"content-encoding", b"").decode("latin-1").strip().lower()
    if encoding not in ("", "identity"):
        message = f"Content-Encoding {_cut(encoding)} is not supported: send the body uncompressed"
        return 415, "unsupported_media_type", message
    kind, *params = first.get(b"content-type", b"").decode("latin-1").split(";")
    if not _is_json(kind):
        return 415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)"
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            message = "send the body as JSON in UTF-8 (charset=utf-8, or no charset)"
            return 415, "unsupported_media_type", message
    return None


def parse_json(body: bytes) -> Any:
    """The body's JSON, read more strictly than json.loads: UTF-8 only (a byte order mark is skipped;
    UTF-16 was read), and a key given twice (the last one won), NaN or Infinity (not JSON) refused;
    nesting too deep or a number too long for Python are said as such. Every refusal is a
    JSONDecodeError, which FastAPI turns into 422 invalid_json carrying its message."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError("not UTF-8", "", 0) from e
    if nesting_exceeds(text, MAX_NESTING):
        raise json.JSONDecodeError(f"nested too deeply (more than {MAX_NESTING} levels)", "", 0)
    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=_not_json)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except json.JSONDecodeError:
        raise
    except RepeatedKey as e:  # a ValueError too: before the next clause
        raise json.JSONDecodeError(f'key "{_cut(e.key)}" given twice', "", 0) from None
    except ValueError:  # int() of a number of more than 4,300 digits
        raise json.JSONDecodeError("a number with too many digits", "", 0) from None


# A request is 2 levels deep ({"texts": [...]}). Bounded here rather than left to json.loads's
# RecursionError, whose depth is the process's recursion limit (torch's compiler raises it to 2,000).
MAX_NESTING = 100
# A string, or an unterminated one to the end: every quote starts a match, so no try fails (a pattern
# that could fail rescans from every escaped quote: quadratic in a hostile body).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\(?:.|\Z))*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/objects in `text` open more than `limit` deep (brackets inside strings aside).
    A body with no more than `limit` opening brackets in all is passed by counting; otherwise the depth
    after each bracket is a cumulative sum (numpy: ~10 ms for a 2 MB body of brackets)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    import numpy as np  # here: the CLI imports this module and starts without numpy

    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def _not_json(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", "", 0)


def strict_json_route():
    """FastAPI's route class, with the request's JSON read by parse_json (FastAPI reads it with
    `await request.json()`: a Request subclass is its documented way to change that)."""
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    class StrictJSONRequest(Request):
        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                self._json = parse_json(await self.body())
            return self._json

    class StrictJSONRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def strict(request: Request):
                return await handler(StrictJSONRequest(request.scope, request.receive))

            return strict

    return StrictJSONRoute


class HostCheck:
    """Answer only requests whose Host header names one of `allowed` (any port), else 400. A service on
    loopback allows only loopback names: a web page that rebinds its own DNS name to 127.0.0.1 sends
    its name as Host, so the browser cannot be used to read this service (DNS rebinding)."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app = app
        self.allowed = frozenset(name.lower() for name in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] == "http"
            and host_name(dict(scope["headers"]).get(b"host", b"")) not in self.allowed
        ):
            response = error_json(400, "invalid_host", "this service does not answer for that Host header")
            return await closing(response)(scope, receive, send)
        await self.app(scope, receive, send)


def host_name(header: bytes) -> str | None:
    """The host of a Host header without its port, lowercase, IPv6 in brackets; None if malformed."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]") + 1
        name, rest = host[:end], host[end:]
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
        return None
    return name


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


# ---------------------------------------------------------------- the app


def model_info(clf: "Classifier", settings: ServeSettings) -> dict[str, Any]:
    cfg, info = clf.config, clf.info
    export = info.get("export") or {}
    metric_keys = ("val_accuracy", "test_accuracy", "test_loss", "best_epoch", "epochs_done")
    return {
        "base_model": display_name(cfg.model.name),
        "model_type": info.get("model_type"),
        "method": info.get("method"),
        "random_init": bool(info.get("random_init", False)),
        "format": export.get("format", "run"),
        "quantize": export.get("quantize"),
        "backend": clf.backend,
        "temperature": clf.temperature,  # 1: raw probabilities (an uncalibrated run, or raw)
        "raw": clf.raw,  # serve --raw: the run's fitted temperature is ignored
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "labels": list(LABEL_NAMES),
        "metrics": {k: info[k] for k in metric_keys if info.get(k) is not None},
        "examples": info.get("examples"),
        "limits": {**asdict(settings), "max_batch_tokens": clf.max_batch_tokens},
        "version": __version__,
    }


def display_name(name: str) -> str:
    """A hub id as is; a local folder by its name only, so /info shows no paths of this machine."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    return Path(name).name if looks_local else name


def page_html() -> str:
    return resources.files("imdb_lora.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(
    clf: "Classifier", settings: ServeSettings | None = None, allowed_hosts: Sequence[str] | None = None
) -> "FastAPI":
    """The service; `allowed_hosts`: the Host names it answers (None: any; see server.allowed_hosts)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse
    from starlette.responses import JSONResponse, Response

    settings = (settings or ServeSettings()).validate()
    service = ServiceState()
    metrics = ServiceMetrics(lambda: batcher.queued, lambda: service.in_flight, lambda: service.draining)
    batcher = Batcher(
        lambda texts: clf.predict(texts, settings.model_batch_size),
        settings.max_batch,
        settings.max_wait_ms / 1000,
        on_call=metrics.model_call,
    )
    info = model_info(clf, settings)
    page = page_html()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await batcher.stop()

    app = FastAPI(
        title="imdb-lora sentiment service",
        version=__version__,
        description="Sentiment (NEGATIVE/POSITIVE) of English movie reviews. Requests arriving together are "
        "batched; under overload the service answers 503 with Retry-After rather than queueing without end.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs and /redoc pull scripts and styles from a CDN; /openapi.json stays
        redoc_url=None,
        # /predict/ was a 307 to a Location built from the Host header: one path per route, else 404
        redirect_slashes=False,
    )
    app.router.route_class = strict_json_route()
    app.state.batcher, app.state.service, app.state.metrics = batcher, service, metrics
    app.state.settings = settings
    app.add_middleware(RequestChecks)  # inside the body limit: a body is bounded before anything else
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    if allowed_hosts is not None:  # outside the body limit: a foreign Host's body is never read
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees the 413s too
    _add_error_handlers(app)
    PredictRequest = request_model(settings)
    models = response_models()
    errors = {code: {"model": models["error"]} for code in (408, 413, 422, 500, 503, 504)}

    @app.post("/predict", response_model=models["predict"], responses=errors)
    async def predict(body: PredictRequest, request: Request):  # type: ignore[valid-type]
        """Label, confidence and both probabilities per text, in the order given. 503 with Retry-After
        when the service is full or shutting down; 504 when no answer came within the request timeout."""
        if request.scope["query_string"]:  # a misspelt option is an error, as an unknown body field is
            message = "query: /predict takes no query parameters; send its input as the JSON body"
            return error_json(422, "invalid_request", message, [{"field": "query", "message": message}])
        texts = body.texts  # type: ignore[attr-defined]
        refusal = _refusal(batcher, service, settings, len(texts))
        if refusal is not None:
            metrics.shed.labels(refusal[0]).inc()
            return refusal[1]
        job = batcher.enqueue(texts)
        service.in_flight += 1
        try:
            preds = await _answer(batcher, job, request, settings.request_timeout)
        except Unanswered as e:
            if e.never_computed:
                metrics.dropped.labels(e.reason).inc(len(texts))
            return e.response(settings.request_timeout)
        except ModelError:
            return error_json(500, "internal_error", "the model failed on this request; try again")
        finally:
            service.in_flight -= 1
        # a response object: FastAPI skips re-validating it against the response model (CPU the event
        # loop would otherwise take from the model thread under load); the model still documents it
        return JSONResponse({"predictions": [prediction_out(p) for p in preds]})

    @app.get("/health", responses={503: {"description": "shutting down: send no more requests"}})
    async def health():
        """200 {"status": "ok"}, or 503 {"status": "draining"} once the service is shutting down."""
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        """The model behind the service: base model, method, format, run metrics and request limits."""
        return info

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics():
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    return app


# ---------------------------------------------------------------- admission, deadline, gone clients


def _refusal(
    batcher: Batcher, service: ServiceState, settings: ServeSettings, n_texts: int
) -> "tuple[str, JSONResponse] | None":
    """(reason, 503 response) if this request is not admitted, None if it is. Refusing costs the server
    almost nothing, and Retry-After tells a well-behaved client when to come back."""
    if service.draining:
        response = error_json(
            503, "shutting_down", "the service is shutting down; send the request elsewhere"
        )
        response.headers["Retry-After"] = "1"
        return "draining", response
    waiting = batcher.queued + n_texts
    rate = batcher.stats.texts_per_second()
    # Shed when the queue is full, and also when at the measured model speed the request could not be
    # answered within its timeout anyway (a slow model on a small machine): a 503 now beats a 504 later.
    if waiting <= settings.max_queue and (rate is None or waiting / rate <= settings.request_timeout):
        return None
    retry = 1 if rate is None else min(60, max(1, math.ceil(waiting / rate)))
    response = error_json(
        503, "overloaded", f"the service is at capacity ({batcher.queued} texts waiting); retry in {retry} s"
    )
    response.headers["Retry-After"] = str(retry)
    return "queue_full", response


class Unanswered(Exception):
    """An admitted request that gets no predictions: its client left, or its deadline passed."""

    def __init__(self, reason: str, never_computed: bool):
        self.reason = reason  # client_gone or timeout
        self.never_computed = never_computed

    def response(self, timeout: float) -> "JSONResponse":
        if self.reason == "client_gone":  # nobody reads it; 499 is the usual log mark for this case
            return error_json(499, "client_closed_request", "the client closed the connection")
        return error_json(504, "timeout", f"no answer within {timeout:g} s; try again later")


async def _answer(batcher: Batcher, job: Job, request: "Request", timeout: float) -> "list[Prediction]":
    """The job's predictions; or, if the client disconnects or the deadline passes first, the job is
    withdrawn (not computed, if no model call has taken it yet) and Unanswered is raised."""
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        never_computed = batcher.withdraw(job) if not job.future.done() else False
    if job.future in done:
        return job.future.result()
    raise Unanswered("client_gone" if gone in done else "timeout", never_computed)


async def _client_gone(request: "Request") -> None:
    """Returns when the client disconnects. The body has been read, so the server's next message on
    this connection is the disconnect (uvicorn sends it when the socket closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------- errors


def json_position(doc: Any, loc: Any) -> str:
    """Where in the body Python's JSON decoder stopped (FastAPI gives the body and the offset):
    ` at line 3, column 12`, so that a client finds a stray comma in a long body. Empty for
    parse_json's own refusals, which are about the whole body (their document is empty)."""
    pos = loc[-1] if isinstance(loc, (list, tuple)) and loc else None
    if not isinstance(doc, str) or not doc or not isinstance(pos, int) or not 0 <= pos <= len(doc):
        return ""
    line, line_start = doc.count("\n", 0, pos) + 1, doc.rfind("\n", 0, pos) + 1
    return f" at line {line}, column {pos - line_start + 1}"


def _add_error_handlers(app: "FastAPI") -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":  # parse_json's reason, or Python's ("Expecting value")
                why = ((e.get("ctx") or {}).get("error") or "").removesuffix(" at")  # "...character at"
                why += json_position(exc.body, e.get("loc")) if why else ""
                return error_json(
                    422, "invalid_json", "the request body is not valid JSON" + (f": {why}" if why else "")
                )
        details = [_detail(e) for e in errors[:MAX_DETAILS]]
        message = details[0]["message"] if details else "invalid request"
        if len(errors) > len(details):
            message += f" (and {len(errors) - len(details)} more errors)"
        return error_json(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (parse_json says why instead)
            return error_json(422, "invalid_json", "the request body is not valid JSON in UTF-8")
        if exc.status_code == 404:
            return error_json(404, "not_found", f"no such path; {PATHS}")
        if exc.status_code == 405:  # Starlette names the route's methods in Allow; HEAD goes as GET
            allowed = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
            allowed += ["HEAD"] if "GET" in allowed and "HEAD" not in allowed else []
            response = error_json(405, "method_not_allowed", f"this path takes {', '.join(allowed)}")
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return error_json(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return error_json(500, "internal_error", "internal server error")


def _is_json(content_type: str) -> bool:
    """application/json or a +json type (parameters aside); FastAPI reads any other body as no JSON."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _detail(e: dict[str, Any]) -> dict[str, str]:
    """A validation error as field + message; pydantic's `input` (the client's own data) is left out, and
    a field name (the client's own key) is cut to MAX_FIELD_CHARS. List indices are ints in pydantic's
    `loc`; a key "0" is a str and stays a field name."""
    loc = list(e.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    where = "".join(
        f"[{p}]" if isinstance(p, int) else (f".{_cut(p)}" if i else _cut(p)) for i, p in enumerate(loc)
    )
    return {"field": where or "body", "message": f"{where or 'body'}: {e.get('msg', 'invalid')}"}


def _cut(name: Any) -> str:
    name = str(name)
    return name if len(name) <= MAX_FIELD_CHARS else name[:MAX_FIELD_CHARS] + "..."
