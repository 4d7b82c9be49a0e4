"""HTTP service: one Classifier, loaded once; requests that arrive together are batched into one model call.

    POST /predict  {"texts": [...]} -> per text: label, label_id, confidence, probabilities
    GET  /health   liveness
    GET  /info     base model, method, format, metrics from the run, limits
    GET  /         a small page to try the model; /docs and /openapi.json describe the API

Every input is bounded (body bytes, texts per request, characters per text), and errors are JSON
`{"error", "message", "details"}` that never carry tracebacks, paths or the submitted text back.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time,
and the request model is built per app from its limits. FastAPI, pydantic and the model are imported
inside functions, so the CLI (which registers `serve` from here) starts fast and works without them.
"""

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from . import __version__
from .errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    from .predict import Classifier, Prediction

log = logging.getLogger("imdb_lora.serve")


@dataclass
class ServeSettings:
    max_body_bytes: int = 2_000_000  # 64 reviews of 20,000 characters, with room for JSON escapes
    max_texts: int = 64  # texts in one request
    max_chars: int = 20_000  # characters in one text (the longest IMDB review has about 14,000)
    max_batch: int = 64  # texts in one model call, summed over the requests it gathers
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    model_batch_size: int = 32  # rows per forward pass inside a model call (length-sorted)

    def validate(self) -> "ServeSettings":
        for name, value in asdict(self).items():
            if value < (0 if name == "max_wait_ms" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {value})")
        return self


# ---------------------------------------------------------------- batching


class ModelError(Exception):
    """The model failed on a batch; the client gets a generic 500, the log gets the traceback."""


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


@dataclass
class BatchStats:
    calls: int = 0
    texts: int = 0
    requests: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list, repr=False)

    def add(self, requests: int, texts: int) -> None:
        self.calls += 1
        self.requests += requests
        self.texts += texts
        self.largest = max(self.largest, texts)
        self.sizes = (self.sizes + [texts])[-1000:]  # recent sizes, bounded


class Batcher:
    """An asyncio queue drained by one worker: requests arriving within `max_wait_s` of each other share
    one model call of at most `max_batch` texts (a single larger request runs alone). The model runs in
    a thread, so the event loop keeps accepting requests while it computes."""

    def __init__(self, run: Callable[[list[str]], list["Prediction"]], max_batch: int, max_wait_s: float):
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # A queue.get() that outlived a timed wait is kept, not cancelled: cancelling one that has just
        # taken a job would drop that job (asyncio.wait_for can lose the result on Python < 3.12).
        self._getter: asyncio.Future | None = None

    async def submit(self, texts: list[str]) -> list["Prediction"]:
        if self._task is None or self._task.done():  # started lazily, inside the serving event loop
            self._queue, self._getter = asyncio.Queue(), None
            self._task = asyncio.create_task(self._worker())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(texts, future))  # type: ignore[union-attr]
        return await future

    async def stop(self) -> None:
        for task in (self._task, self._getter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._getter = None

    async def _worker(self) -> None:
        held: _Job | None = None  # a job that did not fit the last batch opens the next one
        while True:
            first = held or await self._next(None)
            if first is None:
                continue
            jobs, held = await self._gather(first)
            await self._run_jobs(jobs)

    async def _next(self, timeout: float | None) -> _Job | None:
        """The next queued job, waiting at most `timeout` seconds (None: for ever); None if none came."""
        if self._getter is None:
            try:
                return self._queue.get_nowait()  # type: ignore[union-attr]
            except asyncio.QueueEmpty:
                self._getter = asyncio.ensure_future(self._queue.get())  # type: ignore[union-attr]
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        job, self._getter = self._getter.result(), None
        return job

    async def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        loop = asyncio.get_running_loop()
        jobs, n = [first], len(first.texts)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            job = await self._next(max(0.0, deadline - loop.time()))
            if job is None:
                break
            if n + len(job.texts) > self.max_batch:
                return jobs, job
            jobs.append(job)
            n += len(job.texts)
        return jobs, None

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # clients that gave up need no answer
        texts = [t for j in jobs for t in j.texts]
        if not texts:
            return
        try:
            preds = await asyncio.to_thread(self._run, texts)
        except Exception:
            log.exception("model call failed on a batch of %d texts", len(texts))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(ModelError())
            return
        self.stats.add(len(jobs), len(texts))
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(preds[start : start + len(j.texts)])
            start += len(j.texts)


# ---------------------------------------------------------------- request and response models


def _has_content(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be empty or only whitespace")
    return text


def request_model(settings: ServeSettings):
    """The /predict body, with this server's limits in its schema (and so in the OpenAPI docs)."""
    from pydantic import AfterValidator, ConfigDict, Field, create_model

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
        "PredictRequest", __config__=ConfigDict(strict=True, extra="forbid"), texts=(texts, ...)
    )


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


def prediction_out(p: "Prediction") -> dict[str, Any]:
    """Prediction.to_dict (the numbers `predict --json` prints) without echoing the text back."""
    d = p.to_dict()
    d.pop("text")
    return d


# ---------------------------------------------------------------- body size limit


class BodyLimit:
    """Reject bodies over `max_bytes` with 413 before they are parsed, whether or not Content-Length is
    sent (chunked bodies are counted as they arrive, and buffering stops at the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope, receive, send) -> None:
        response = error_json(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)


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
    from .data import LABEL_NAMES

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
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "labels": list(LABEL_NAMES),
        "metrics": {k: info[k] for k in metric_keys if info.get(k) is not None},
        "examples": info.get("examples"),
        "limits": asdict(settings),
        "version": __version__,
    }


def display_name(name: str) -> str:
    """A hub id as is; a local folder by its name only, so /info shows no paths of this machine."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    return Path(name).name if looks_local else name


def page_html() -> str:
    return resources.files("imdb_lora").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(clf: "Classifier", settings: ServeSettings | None = None) -> "FastAPI":
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    settings = (settings or ServeSettings()).validate()
    batcher = Batcher(
        lambda texts: clf.predict(texts, settings.model_batch_size),
        settings.max_batch,
        settings.max_wait_ms / 1000,
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
        description="Sentiment (NEGATIVE/POSITIVE) of English movie reviews. Requests arriving together are batched.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    PredictRequest = request_model(settings)
    models = response_models()
    errors = {code: {"model": models["error"]} for code in (413, 422, 500)}

    @app.post("/predict", response_model=models["predict"], responses=errors)
    async def predict(body: PredictRequest):  # type: ignore[valid-type]
        """Label, confidence and both probabilities per text, in the order given."""
        try:
            preds = await batcher.submit(body.texts)  # type: ignore[attr-defined]
        except ModelError:
            return error_json(500, "internal_error", "the model failed on this request; try again")
        return {"predictions": [prediction_out(p) for p in preds]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        """The model behind the service: base model, method, format, run metrics and request limits."""
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    return app


def _add_error_handlers(app: "FastAPI") -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        details = [_detail(e) for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_json(422, "invalid_json", "the request body is not valid JSON")
        return error_json(
            422, "invalid_request", details[0]["message"] if details else "invalid request", details
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        names = {404: "not_found", 405: "method_not_allowed"}
        return error_json(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return error_json(500, "internal_error", "internal server error")


def _detail(e: dict[str, Any]) -> dict[str, str]:
    """A validation error as field + message; pydantic's `input` (the client's own data) is left out."""
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    where = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(loc))
    return {"field": where or "body", "message": f"{where or 'body'}: {e.get('msg', 'invalid')}"}


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


def serve(app: "FastAPI", host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    sock = bind(host, port)
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{url_host}:{sock.getsockname()[1]}  (page: /, API docs: /docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


class BackgroundServer:
    """A real uvicorn on a free loopback port in a thread: for tests and `bench serve`."""

    def __init__(self, app: "FastAPI", host: str = "127.0.0.1"):
        import uvicorn

        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
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


# ---------------------------------------------------------------- CLI


def add_serve_parser(sub) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="HTTP service with request batching, a web page and API docs")
    p.add_argument("model", help="run directory or export folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-model", help="base model folder, if it moved since training")
    p.add_argument("--max-texts", type=int, default=d.max_texts, help="texts per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="texts per model call across requests")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="wait for more requests to batch")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def settings_from_args(ns) -> ServeSettings:
    return ServeSettings(
        max_body_bytes=ns.max_body_bytes,
        max_texts=ns.max_texts,
        max_chars=ns.max_chars,
        max_batch=ns.max_batch,
        max_wait_ms=ns.max_wait_ms,
    ).validate()


def cmd_serve(ns) -> int:
    from .predict import Classifier

    settings = settings_from_args(ns)
    if not 0 <= ns.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (got {ns.port})")
    clf = Classifier.load(ns.model, device=ns.device, base_model=ns.base_model)
    if not is_loopback(ns.host):
        print(f"warning: --host {ns.host} makes the service reachable from other machines", flush=True)
    serve(create_app(clf, settings), ns.host, ns.port, ns.log_level)
    return 0
