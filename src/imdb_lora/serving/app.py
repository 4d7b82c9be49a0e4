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

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from .. import __version__
from ..data.labeled import LABEL_NAMES
from ..errors import UserError
from .batcher import Batcher, ModelError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    from ..inference.classifier import Classifier, Prediction

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
    return resources.files("imdb_lora.serving").joinpath("static/index.html").read_text(encoding="utf-8")


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
