"""Non-ASCII texts under narrow locales: standard output that cannot hold a character shows it escaped
(it was a traceback after the work was done)."""

from __future__ import annotations

import io
import json
import sys

from imdb_lora.cli import main


def run_with_stdout(monkeypatch, encoding: str, *args: str) -> tuple[int, bytes]:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding)  # errors="strict", as Python's own stdout under C
    monkeypatch.setattr(sys, "stdout", out)
    code = main(list(args))
    out.flush()
    return code, raw.getvalue()


def test_text_output_in_a_narrow_encoding_is_escaped_not_a_traceback(trained_run, monkeypatch):
    code, out = run_with_stdout(
        monkeypatch, "ascii", "predict", str(trained_run), "Ça 😀 great", "--device", "cpu"
    )
    assert code == 0
    assert out.decode("ascii").startswith("Text: \\xc7a \\U0001f600 great\nPrediction: ")
    code, out = run_with_stdout(
        monkeypatch, "latin-1", "predict", str(trained_run), "Ça 😀", "--json", "--device", "cpu"
    )
    assert code == 0 and json.loads(out)["text"] == "Ça 😀"  # JSON is ASCII (\u escapes) in any encoding
