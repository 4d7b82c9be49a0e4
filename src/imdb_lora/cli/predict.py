"""`imdb-lora predict`: label, confidence and both probabilities per text."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, counted
from .chunks import chunks
from .common import (
    add_base_model_flag,
    add_batch_size_flag,
    add_device_flag,
    add_max_batch_tokens_flag,
    add_raw_flag,
    add_window_flag,
    path_arg,
    require_directories,
)


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="sentiment of texts given as arguments, in a file, or on stdin")
    p.add_argument("run", type=path_arg, help="run directory or export folder")
    p.add_argument("texts", nargs="*", default=[], help="texts to classify (none: --file or stdin)")
    p.add_argument(
        "--file",
        type=path_arg,
        help="one text per line (blank lines skipped), or JSONL/CSV with a text column",
    )
    p.add_argument(
        "--text-column", default="text", help="the text column of a JSONL/CSV --file [default: text]"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_batch_size_flag(p, 32, token_capped=True)
    add_device_flag(p)
    add_base_model_flag(p)
    add_raw_flag(p)
    add_window_flag(p)
    add_max_batch_tokens_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(ns: argparse.Namespace) -> int:
    if ns.texts and ns.file:
        raise UserError("give texts as arguments or --file, not both")
    require_directories(ns.run)
    from ..data.files import TextLines, is_tabular
    from ..inference.classifier import Classifier, check_texts, check_window_stride_of

    check_window_stride_of(ns.run, ns.window_stride)
    tabular = ns.file is not None and is_tabular(Path(ns.file))
    if ns.text_column != "text" and not tabular:
        raise UserError("--text-column applies to a CSV, TSV or JSONL --file only")
    reader = None if ns.texts else TextLines(ns.file, _stdin(ns), ns.text_column)
    # A chunk at a time, read, computed and printed before the next is read: a long stream's texts,
    # token ids, predictions and output never all live at once, and the first results come early. The
    # first chunk is read before the model loads, so a short input's mistakes fail at once.
    rest = chunks(_argument_texts(ns.texts) if ns.texts else reader)
    first, done = next(rest, ([], True))
    if done:  # all of it read: said before the predictions, as it always was
        _note_blank(reader, ns)
    if not first:
        raise UserError("no text to classify: pass texts, --file F, or lines on stdin")
    check_texts(first)
    clf = Classifier.load(
        ns.run,
        device=ns.device,
        base_model=ns.base_model,
        raw=ns.raw,
        max_batch_tokens=ns.max_batch_tokens,
    )
    # on stderr, as serve says it: stdout holds the predictions alone (--json, pipes)
    print(f"loaded {ns.run}: {clf.describe()}", file=sys.stderr, flush=True)
    start = 0
    for texts, last in itertools.chain([(first, done)], rest):
        check_texts(texts, start)  # each text named by its place in the whole input
        preds = clf.predict(texts, ns.batch_size, window_stride=ns.window_stride)
        if ns.json:
            print("\n".join(json.dumps(p.to_dict()) for p in preds), flush=True)
        else:
            print(("\n" if start else "") + "\n\n".join(p.to_text() for p in preds), flush=True)
        start += len(texts)
        if last and not done:  # a long input: its skipped blank lines are known at its end only
            _note_blank(reader, ns)
    return 0


def _note_blank(reader, ns: argparse.Namespace) -> None:
    """Said, because outputs then no longer line up with input lines."""
    if reader is not None and reader.blank:
        source = f"--file {ns.file}" if ns.file else "stdin"
        print(f"imdb-lora: skipped {counted(reader.blank, 'blank line')} of {source}", file=sys.stderr)


def _stdin(ns: argparse.Namespace) -> Iterable[str] | None:
    """stdin's lines, read as they are asked for, when neither texts nor --file are given (else None)."""
    if ns.file:
        return None
    if sys.stdin.isatty():  # else a bare `predict RUN` waits silently
        print("reading texts from the terminal, one per line; end with Ctrl-D", file=sys.stderr, flush=True)
    if not hasattr(sys.stdin, "buffer"):  # already text (a StringIO standing in for it)
        return sys.stdin
    # Bytes, decoded here: Python's own decoding of stdin depends on the locale (under C/POSIX it turned
    # a byte that is not UTF-8 into a lone surrogate, and the tokenizer failed on it with a traceback).
    from ..data.files import utf8_pieces

    return utf8_pieces(sys.stdin.buffer, "stdin")


def _argument_texts(texts: list[str]) -> list[str]:
    """Texts as given on the command line, read as UTF-8 as files and stdin are. Bytes Python could not
    decode in the locale's encoding arrive as lone surrogates (PEP 383): any non-ASCII text under LC_ALL=C
    with PYTHONUTF8=0, or bytes that are not UTF-8 at all; the tokenizer failed on them in a traceback."""
    from ..data.files import decode_text

    out = []
    for i, text in enumerate(texts, 1):
        if any("\udc80" <= c <= "\udcff" for c in text):
            text = decode_text(os.fsencode(text), f"text {i}")
        out.append(text)
    return out
