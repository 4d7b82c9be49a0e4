"""Labeled CSV/TSV/JSONL files, and plain text inputs for prediction."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .labeled import LabeledTexts, has_content

# Label spellings accepted in labeled files (case-insensitive, surrounding spaces ignored). 0.0 and 1.0
# too: pandas stores a label column that has a gap as floats and writes them so (CSV "1.0", JSON 1.0).
LABEL_SPELLINGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1}


def parse_label(value: object) -> int | None:
    """0/1 from 0, 1, 0.0, 1.0, negative/positive or neg/pos (any case); None for anything else."""
    if isinstance(value, bool):  # JSON true/false is not a label spelling anyone agreed on
        return None
    return LABEL_SPELLINGS.get(str(value).strip().lower())


# What a file that is no text at all starts with, so its error says what it is rather than "not UTF-8".
MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PK\x03\x04": "a zip archive",
    b"PAR1": "a Parquet file",
}


def binary_kind(head: bytes) -> str | None:
    """What bytes that start so are (MAGIC: "gzip-compressed", "a Parquet file", ...), or None: text."""
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def repeated_names(names: list[str]) -> list[str]:
    """The column names given more than once, sorted (csv and pyarrow keep one of them without a word)."""
    return sorted({n for n in names if names.count(n) > 1})


def read_utf8(path: str | os.PathLike, flag: str) -> tuple[Path, str]:
    """A text file's path and content, or one line naming the flag: missing, not text, or not UTF-8.
    A pipe is read too (`--file <(zcat reviews.csv.gz)`); a folder or a device is not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag}: no such file: {p}")
    if not (p.is_file() or stat.S_ISFIFO(p.stat().st_mode)):
        raise UserError(f"{flag}: {p} is not a file (a folder or a device?)")
    return p, decode_text(p.read_bytes(), f"{flag}: {p}")


def decode_text(raw: bytes, what: str) -> str:
    """UTF-8 bytes as text, less a byte order mark (Excel and Notepad write one: it was read into the
    first column's name or the first text); anything else is one line saying what it is, or where the
    first byte that is not UTF-8 is."""
    kind = binary_kind(raw)
    if kind:
        raise UserError(f"{what} is {kind}, not text: decompress or convert it first")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{what} is not UTF-8 (byte 0x{raw[e.start]:02x} on line {line})") from None


def csv_records(content: str, p: Path, flag: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """A CSV/TSV file's header and (start line, row) of each row; the header is line 1.

    A quoted cell may hold line breaks, so a row's start is the reader's line count after the row
    minus the line breaks inside its cells: what an editor shows, and a spreadsheet's row number."""
    # The whole file is in memory already, so no field of it can be too large to hold: lift csv's
    # 128 KB field limit (a long review in one cell is legitimate) up to the file's own size.
    csv.field_size_limit(max(csv.field_size_limit(), len(content) + 1))
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(content), delimiter=delimiter)
    records = []
    try:
        header = list(reader.fieldnames or [])
        _check_header(header, p, flag)
        for row in reader:
            extra = row.get(None) or []  # cells past the header's columns
            breaks = sum(v.count("\n") for v in row.values() if isinstance(v, str))
            breaks += sum(v.count("\n") for v in extra)
            line = reader.line_num - breaks
            if any(v.strip() for v in extra):  # e.g. an unquoted comma in a text: it was cut there
                raise UserError(
                    f"{flag}: {p} line {line} has {len(header) + len(extra)} cells and the header "
                    f"{len(header)}; quote a cell that holds the delimiter"
                )
            records.append((line, row))
    except csv.Error as e:
        raise UserError(f"{flag}: {p} line {reader.line_num} is not valid CSV ({e})") from None
    _check_quotes_close(content, delimiter, records, p, flag)
    return header, records


def _check_quotes_close(
    content: str, delimiter: str, records: list[tuple[int, dict]], p: Path, flag: str
) -> None:
    """csv ends a quoted cell still open at the end of the file without a word: every line after a
    stray quote became part of that one cell (rows merged into one text). Its strict mode says so."""
    try:
        for _ in csv.reader(io.StringIO(content), delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        if "unexpected end of data" not in str(e):  # strict's other complaints ('"a" b') read fine
            return
        # the open cell holds the file's last line break too, which the start-line count took off
        start = records[-1][0] + content.endswith("\n") if records else 1
        raise UserError(
            f'{flag}: {p} line {start} opens a quoted cell that is never closed (a stray "?): every '
            "line after it was read into that cell"
        ) from None


def _check_header(header: list[str], p: Path, flag: str) -> None:
    """A column named twice: csv's DictReader kept the last one's cells without a word."""
    twice = repeated_names(header)
    if twice:
        raise UserError(f"{flag}: {p} names column(s) {twice} more than once in its header")


def jsonl_objects(content: str, p: Path, flag: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSONL line; a line that is not a JSON object is an error."""
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=unique_keys)
        except RepeatedKey as e:
            raise UserError(f"{flag}: {p} line {n} has the key {e.key!r} more than once") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{flag}: {p} line {n} is not JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer past Python's digit limit, or nesting
            raise UserError(f"{flag}: {p} line {n} is not usable JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            hint = "; JSON Lines is one object per line, not a JSON array" if isinstance(obj, list) else ""
            raise UserError(f"{flag}: {p} line {n} is not a JSON object{hint}")
        yield n, obj


class RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: a key given twice is an error (json keeps the last without a word)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


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
        if text is not None and not isinstance(text, str):
            raise UserError(
                f"{flag}: {p} line {n} has a JSON {type(text).__name__} as its text, not a string"
            )
        if text is None or not has_content(text):
            raise UserError(f"{flag}: {p} line {n} has an empty or missing text")
        if label is None:
            raise UserError(f"{flag}: {p} line {n} has no {label_column!r} value")
        y = parse_label(label)
        if y is None:
            raise UserError(
                f"{flag}: {p} line {n} has label {label!r}; labels must be 0 (negative) or 1 (positive)"
                " (also accepted: 0.0/1.0, negative/positive, neg/pos, any case)"
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
        header, records = csv_records(content, p, "--file")
        if text_column not in header:
            raise UserError(
                f"--file: {p} has no {text_column!r} column (it has {', '.join(header) or 'none'})"
            )
        for n, row in records:
            if row[text_column] is None:  # a row with fewer cells than the header
                raise UserError(f"--file: {p} line {n} has no {text_column!r} value")
        return [row[text_column] for _, row in records], 0
    return non_blank_lines(content)


def non_blank_lines(content: str) -> tuple[list[str], int]:
    lines = content.splitlines()
    texts = [line for line in lines if line.strip()]
    return texts, len(lines) - len(texts)
