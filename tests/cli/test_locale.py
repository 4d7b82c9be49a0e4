"""Non-ASCII texts under narrow locales: standard output that cannot hold a character shows it escaped
(it was a traceback after the work was done), and command-line texts are read as UTF-8 (as files and
stdin are), whatever bytes the locale let Python decode."""

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


def test_argument_texts_are_read_as_utf8(trained_run, capsys):
    # "Ça va" as a C locale hands it over: its UTF-8 bytes as lone surrogates (PEP 383)
    undecoded = b"\xc3\x87a va".decode("ascii", "surrogateescape")
    assert main(["predict", str(trained_run), undecoded, "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "Ça va"
    # bytes that are not UTF-8 at all: one line, not the tokenizer's TypeError
    assert main(["predict", str(trained_run), "good", b"bad \xff".decode("utf-8", "surrogateescape")]) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "imdb-lora: error: text 2 is not UTF-8 (byte 0xff on line 1)"
    )
