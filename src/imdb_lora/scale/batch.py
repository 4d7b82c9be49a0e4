"""ScoreBatch: one loaded Classifier that turns an Arrow batch of reviews into scored rows.

The same callable runs in-process (`--engine local`) and as a Ray Data actor (`--engine ray`: Ray
constructs it once per actor and calls it for every batch the actor receives), so the model is loaded
once per worker, never per batch. Probabilities are Classifier.predict's, so whatever it applies
(a calibration temperature, window averaging) applies here too.

A row that cannot be scored gets a message in `error` and nulls in the prediction columns: a null,
empty or non-text value, a text longer than max_chars (never cut: a review that long is not one, and
tokenizing it costs seconds and gigabytes), an unreadable JSONL line, or a text the model fails on (the
batch is then scored row by row, so one bad row costs only itself).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from ..data.labeled import has_content
from .sources import carried_name

ERROR_CHARS = 300  # an error message is a hint, not a copy of the review
MAX_CHARS = 100_000  # --max-chars default: IMDB's longest review is about 14k characters


class ScoreBatch:
    def __init__(
        self,
        model: str,
        text_column: str = "text",
        batch_size: int = 32,
        device: str = "auto",
        keep_text: bool = False,
        window_stride: int | None = None,
        threads: int | None = None,
        raw: bool = False,
        max_chars: int = MAX_CHARS,
        max_batch_tokens: int | None = None,
        base_model: str | None = None,
    ):
        # As the CLI does: transformers' deprecation notices are not the user's to fix (a Ray actor's
        # process never went through the CLI's filter, and printed them in every job's log).
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
        if threads:  # a Ray actor's share of the machine: its torch and onnxruntime threads
            import torch

            torch.set_num_threads(threads)
            os.environ["IMDB_LORA_ORT_THREADS"] = str(threads)
        from ..inference.classifier import Classifier

        self.clf = Classifier.load(
            model, device=device, raw=raw, max_batch_tokens=max_batch_tokens, base_model=base_model
        )
        # where the model loads (score's process, or each Ray worker, whose stderr Ray shows), as serve and
        # predict say it; on stderr: stdout holds score's summary alone
        print(f"loaded {model}: {self.clf.describe()}", file=sys.stderr, flush=True)
        self.text_key = carried_name(text_column)
        self.batch_size = batch_size
        self.keep_text = keep_text
        self.window_stride = window_stride
        self.max_chars = max_chars

    def __call__(self, table):
        import pyarrow as pa

        n = table.num_rows
        texts = table.column(self.text_key).to_pylist() if self.text_key in table.column_names else [None] * n
        errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
        for i, t in enumerate(texts):
            if errors[i] is None:
                errors[i] = text_problem(t, self.text_key, self.max_chars)
        probs = self._score([i for i in range(n) if errors[i] is None], texts, errors)
        label_ids = [None if p is None else int(p[1] > p[0]) for p in probs]
        drop = {"error"} | (set() if self.keep_text else {self.text_key})
        out = table.select([c for c in table.column_names if c not in drop])
        from ..data.labeled import LABEL_NAMES

        columns = {
            "label": pa.array([None if y is None else LABEL_NAMES[y] for y in label_ids], pa.string()),
            "label_id": pa.array(label_ids, pa.int8()),
            "confidence": pa.array(
                [None if p is None else p[y] for p, y in zip(probs, label_ids)], pa.float64()
            ),
            "prob_negative": pa.array([None if p is None else p[0] for p in probs], pa.float64()),
            "prob_positive": pa.array([None if p is None else p[1] for p in probs], pa.float64()),
            "error": pa.array(errors, pa.string()),
        }
        for name, values in columns.items():
            out = out.append_column(name, values)
        return out

    def _score(self, ok: list[int], texts: list, errors: list) -> list[list[float] | None]:
        """Probabilities per row (None where not scored); a failing batch is retried row by row."""
        probs: list[list[float] | None] = [None] * len(texts)
        try:
            for i, p in zip(ok, self._predict([texts[i] for i in ok])):
                probs[i] = p
            return probs
        except Exception:  # noqa: BLE001 - find the row(s) to blame, score the others
            pass
        for i in ok:
            try:
                probs[i] = self._predict([texts[i]])[0]
            except Exception as e:  # noqa: BLE001 - a row the model cannot score is that row's error
                errors[i] = f"{type(e).__name__}: {e}"[:ERROR_CHARS]
        return probs

    def _predict(self, texts: list[str]) -> list[list[float]]:
        preds = self.clf.predict(texts, self.batch_size, window_stride=self.window_stride)
        return [[p.negative, p.positive] for p in preds]


def text_problem(value: Any, column: str, max_chars: int = MAX_CHARS) -> str | None:
    """Why a value cannot be scored as a review, or None if it can."""
    if value is None:
        return f"no {column!r} value"
    if not isinstance(value, str):
        return f"{column!r} is {type(value).__name__}, not text"
    if len(value) > max_chars:  # before strip(): a huge text is refused without another pass over it
        return f"text longer than {max_chars:,} characters ({len(value):,}; --max-chars)"
    if not has_content(value):
        return "empty text"  # or only whitespace or control characters
    return None
