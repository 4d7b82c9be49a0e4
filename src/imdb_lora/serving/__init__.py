"""HTTP service: one Classifier, loaded once; requests that arrive together are batched into one model call.

    POST /predict  {"texts": [...]} -> per text: label, label_id, confidence, probabilities
    GET  /health   liveness
    GET  /info     base model, method, format, metrics from the run, limits
    GET  /         a small page to try the model; /openapi.json describes the API (no CDN-loaded /docs)

Every input is bounded (body bytes, the time to send the headers and the body, texts per request,
characters per text, connections), a loopback service answers only loopback Host names, and errors are JSON
`{"error", "message", "details"}` that never carry tracebacks, paths or the submitted text back.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time,
and the request model is built per app from its limits. FastAPI, pydantic and the model are imported
inside functions, so the CLI (which registers `serve` from here) starts fast and works without them."""
