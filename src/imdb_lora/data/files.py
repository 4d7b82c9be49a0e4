"""Labeled CSV/TSV/JSONL files, and plain text inputs for prediction."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .labeled import LabeledTexts, has_content

# Label spellings accepted in labeled files (case-insensitive, surrounding spaces ignored).
LABEL_SPELLINGS = {"0": 0, "1": 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1}


def parse_label(value: object) -> int | None:
    """0/1 from 0, 1, negative/positive or neg/pos (any case); None for anything else."""
    if isinstance(value, bool):  # JSON true/false is not a label spelling anyone agreed on
        return None
    return LABEL_SPELLINGS.get(str(value).strip().lower())


def read_utf8(path: str | os.PathLike, flag: str) -> tuple[Path, str]:
    """A text file's path and content, or one line naming the flag: missing, or not UTF-8."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag}: no such file: {p}")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {p} is not UTF-8") from None


def csv_rows(content: str, p: Path, flag: str) -> tuple[list[str], list[dict]]:
    """A CSV/TSV file's header and rows; a malformed file is one line naming the flag and the line."""
    header, records = csv_records(content, p, flag)
    return header, [row for _, row in records]


def csv_records(content: str, p: Path, flag: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """A CSV/TSV file's header and (start line, row) of each row; the header is line 1.

    A quoted cell may hold line breaks, so a row's start is the reader's line count after the row
    minus the line breaks inside its cells: what an editor shows, and a spreadsheet's row number."""
    # The whole file is in memory already, so no field of it can be too large to hold: lift csv's
    # 128 KB field limit (a long review in one cell is legitimate) up to the file's own size.
    csv.field_size_limit(max(csv.field_size_limit(), len(content) + 1))
    reader = csv.DictReader(io.StringIO(content), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    records = []
    try:
        header = list(reader.fieldnames or [])
        for row in reader:
            breaks = sum(v.count("\n") for v in row.values() if isinstance(v, str))
            breaks += sum(v.count("\n") for v in row.get(None) or [])  # cells past the header's columns
            records.append((reader.line_num - breaks, row))
    except csv.Error as e:
        raise UserError(f"{flag}: {p} line {reader.line_num} is not valid CSV ({e})") from None
    return header, records


def jsonl_objects(content: str, p: Path, flag: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSONL line; a line that is not a JSON object is an error."""
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag}: {p} line {n} is not JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer past Python's digit limit, or nesting
            raise UserError(f"{flag}: {p} line {n} is not usable JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{flag}: {p} line {n} is not a JSON object")
        yield n, obj


def load_labeled_file(
    path: str | os.PathLike,
    flag: str = "--train-file",
    text_column: str = "text",
    label_column: str = "label",
) -> LabeledTexts:
    """CSV, TSV or JSONL with a text and a label column; labels 0/1, negative/positive or neg/pos."""
    p, content = read_utf8(path, flag)
    if p.suffix.lower() in (".jsonl", ".json"):
        records = list(jsonl_objects(content, p, flag))
    else:
        records = csv_records(content, p, flag)[1]
    if not records:
        raise UserError(f"{flag}: {p} has no rows")
    missing = [c for c in (text_column, label_column) if c not in records[0][1]]
    if missing:
        raise UserError(
            f"{flag}: {p} lacks column(s) {missing}; it needs {text_column!r} and {label_column!r}"
            f" (columns found: {list(records[0][1])})"
        )
    texts, labels = [], []
    for n, row in records:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not has_content(text):
            raise UserError(f"{flag}: {p} line {n} has an empty or missing text")
        if label is None:
            raise UserError(f"{flag}: {p} line {n} has no {label_column!r} value")
        y = parse_label(label)
        if y is None:
            raise UserError(
                f"{flag}: {p} line {n} has label {label!r}; labels must be 0 (negative) or 1 (positive)"
                " (also accepted: negative/positive, neg/pos, any case)"
            )
        texts.append(text)
        labels.append(y)
    return LabeledTexts(texts, labels, [n for n, _ in records])


def read_texts(file: str | None, stdin_text: str | None, text_column: str = "text") -> tuple[list[str], int]:
    """Texts from --file (one per line, or JSONL/CSV with a `text_column` column) or from stdin lines,
    and how many blank lines were skipped (plain lines only), so the caller can say so: without that
    note, outputs would silently stop lining up with input lines."""
    if file is None:
        return non_blank_lines(stdin_text or "")
    p, content = read_utf8(file, "--file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts = []
        for n, obj in jsonl_objects(content, p, "--file"):
            if not isinstance(obj.get(text_column), str):
                raise UserError(f"--file: {p} line {n} has no {text_column!r} string")
            texts.append(obj[text_column])
        return texts, 0
    if suffix in (".csv", ".tsv"):
        header, rows = csv_rows(content, p, "--file")
        if text_column not in header:
            raise UserError(
                f"--file: {p} has no {text_column!r} column (it has {', '.join(header) or 'none'})"
            )
        return [row[text_column] for row in rows], 0
    return non_blank_lines(content)


def non_blank_lines(content: str) -> tuple[list[str], int]:
    lines = content.splitlines()
    texts = [line for line in lines if line.strip()]
    return texts, len(lines) - len(texts)
