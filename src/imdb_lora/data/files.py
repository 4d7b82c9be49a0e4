"""Labeled CSV/TSV/JSONL files, and plain text inputs for prediction."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
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


# The suffixes read as JSON Lines (any case); every other file is CSV (TSV as .tsv) or, for predict, plain
# lines. .ndjson is another common name for the same format (score takes it too): predict read its lines
# as texts, braces and all.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def is_jsonl(p: Path) -> bool:
    return p.suffix.lower() in JSONL_SUFFIXES


def is_tabular(p: Path) -> bool:
    """A file read by columns (JSONL, CSV, TSV), not as one text per line."""
    return is_jsonl(p) or p.suffix.lower() in (".csv", ".tsv")


def repeated_names(names: list[str]) -> list[str]:
    """The column names given more than once, sorted (csv and pyarrow keep one of them without a word)."""
    return sorted({n for n in names if names.count(n) > 1})


def readable_file(path: str | os.PathLike, flag: str) -> Path:
    """A file (or a pipe) to read, or one line naming the flag: missing, or a folder or a device."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag}: no such file: {p}")
    if not (p.is_file() or stat.S_ISFIFO(p.stat().st_mode)):
        raise UserError(f"{flag}: {p} is not a file (a folder or a device?)")
    return p


def utf8_pieces(stream: Iterable[bytes], what: str) -> Iterator[str]:
    """A byte stream's b"\\n"-ended pieces decoded one at a time: the text decode_text gives for the
    whole (a byte order mark dropped) and its one-line errors, never holding more than one line."""
    for n, raw in enumerate(stream, 1):
        if n == 1 and binary_kind(raw):  # no magic number holds a line break: all of it is in line 1
            raise UserError(f"{what} is {binary_kind(raw)}, not text: decompress or convert it first")
        try:
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{what} is not UTF-8 (byte 0x{raw[e.start]:02x} on line {n})") from None


def file_pieces(p: Path, flag: str) -> Iterator[str]:
    """A file's lines (each with its b"\\n"), decoded as decode_text decodes the whole; a file that starts
    with UTF-16's byte order mark (Excel's "Unicode Text", PowerShell 5's `>` and Out-File) as UTF-16,
    which is no UTF-8: it was refused at its first byte."""
    what = f"{flag}: {p}"
    with open(p, "rb") as f:
        if f.peek(2)[:2] not in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            yield from utf8_pieces(f, what)
            return
        # newline="": lines end as they do in the file (csv wants them so), at "\n", "\r\n" or "\r"
        text = io.TextIOWrapper(f, encoding="utf-16", newline="")
        lines = 0
        try:
            for line in text:
                yield line
                lines += 1
        except UnicodeDecodeError:  # a lone surrogate, or an odd number of bytes
            raise UserError(f"{what} starts as UTF-16 but is not UTF-16 after line {lines}") from None


def split_lines(pieces: Iterable[str]) -> Iterator[str]:
    """str.splitlines() of the pieces' concatenation, piece by piece: a piece ends with its "\\n", which
    always ends a line, so no line break ("\\r\\n" included) spans two pieces."""
    for piece in pieces:
        yield from piece.splitlines()


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
    """A CSV/TSV file's header and (start line, row) of each row (CsvRows over a whole content)."""
    rows = CsvRows(io.StringIO(content), p, flag, len(content))
    return rows.header, list(rows)


class CsvRows:
    """A CSV/TSV file's header, and (start line, row) of each row read a row at a time; the header is
    line 1. `lines` are the file's lines, each with its "\\n" (a file or io.StringIO iterated): only the
    row being read is held.

    A quoted cell may hold line breaks, so a row's start is the reader's line count after the row
    minus the line breaks inside its cells: what an editor shows, and a spreadsheet's row number."""

    def __init__(self, lines: Iterable[str], p: Path, flag: str, size: int | None = None):
        # No field can be larger than the file (`size`: its characters or bytes; None: a pipe, unknown),
        # so csv's 128 KB field limit is lifted that far: a long review in one cell is legitimate.
        limit = sys.maxsize if size is None else size + 1
        csv.field_size_limit(max(csv.field_size_limit(), limit))
        self.p, self.flag = p, flag
        self.delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
        self._tap = _Tap(csv_lines(lines))
        self.reader = csv.DictReader(self._tap, delimiter=self.delimiter)
        try:
            self.header = list(self.reader.fieldnames or [])
        except csv.Error as e:
            raise UserError(f"{flag}: {p} line {self.reader.line_num} is not valid CSV ({e})") from None
        if not self.header:  # else "lacks column(s) [...] (columns found: [])"
            blank = self._tap.take()  # the header's line, if the file has one
            raise UserError(f"{flag}: {p} " + ("line 1, the header, is blank" if blank else "is empty"))
        _check_header(self.header, p, flag)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        p, flag, reader = self.p, self.flag, self.reader
        last_lines = self._tap.take()  # those of the last record read: the header's, to begin with
        pending: tuple[int, dict] | None = None  # a row is handed on once the next one (or the end) is read
        try:
            for row in reader:
                last_lines = self._tap.take()
                extra = row.get(None) or []  # cells past the header's columns
                breaks = sum(line_breaks(v) for v in row.values() if isinstance(v, str))
                breaks += sum(line_breaks(v) for v in extra)
                line = reader.line_num - breaks
                if any(v.strip() for v in extra):  # e.g. an unquoted comma in a text: it was cut there
                    raise UserError(
                        f"{flag}: {p} line {line} has {len(self.header) + len(extra)} cells and the header "
                        f"{len(self.header)}; quote a cell that holds the delimiter"
                    )
                if pending is not None:
                    yield pending
                pending = (line, row)
        except csv.Error as e:
            raise UserError(f"{flag}: {p} line {reader.line_num} is not valid CSV ({e})") from None
        self._check_quotes_close(last_lines, pending)
        if pending is not None:
            yield pending

    def _check_quotes_close(self, last_lines: list[str], last: tuple[int, dict] | None) -> None:
        """csv ends a quoted cell still open at the end of the file without a word: every line after a
        stray quote became part of that one cell (rows merged into one text), the last record read. Its
        strict mode, over that record's lines, says so; the record is never handed on."""
        try:
            for _ in csv.reader(last_lines, delimiter=self.delimiter, strict=True):
                pass
        except csv.Error as e:
            if "unexpected end of data" not in str(e):  # strict's other complaints ('"a" b') read fine
                return
            # the open cell holds the file's last line break too, which the start-line count took off
            start = last[0] + self._tap.ends_with_newline if last is not None else 1
            raise UserError(
                f'{self.flag}: {self.p} line {start} opens a quoted cell that is never closed (a stray "?): '
                "every line after it was read into that cell"
            ) from None


def csv_lines(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces (each ending with its "\\n") cut into lines as csv wants them, as a file opened with
    newline="" gives them: a line also ends at a lone "\\r", as Excel for Mac's "CSV (Macintosh)" ends
    every line (one piece, the whole file: csv refused it, "new-line character seen in unquoted field")."""
    for piece in pieces:
        if piece.find("\r", 0, len(piece) - 2) == -1:  # no "\r" but perhaps a last "\r\n" (or "\r")
            yield piece
        else:
            yield from _CSV_LINE.findall(piece)


_CSV_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")


def line_breaks(cell: str) -> int:
    """The line breaks in a cell, as csv_lines cuts lines: "\\n", "\\r\\n" or a lone "\\r"."""
    n = cell.count("\n")
    return n + cell.count("\r") - cell.count("\r\n") if "\r" in cell else n


class _Tap:
    """An iterator of lines that keeps those taken since the last take(), and whether the last ended
    with a line break."""

    def __init__(self, lines: Iterable[str]):
        self._lines = iter(lines)
        self._taken: list[str] = []
        self.ends_with_newline = False

    def __iter__(self) -> _Tap:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._taken.append(line)
        self.ends_with_newline = line.endswith(("\n", "\r"))
        return line

    def take(self) -> list[str]:
        taken, self._taken = self._taken, []
        return taken


def _check_header(header: list[str], p: Path, flag: str) -> None:
    """A column named twice: csv's DictReader kept the last one's cells without a word."""
    twice = repeated_names(header)
    if twice:
        raise UserError(f"{flag}: {p} names column(s) {twice} more than once in its header")


def jsonl_objects(content: str | Iterable[str], p: Path, flag: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSONL line; a line that is not a JSON object is an error.
    `content`: the whole text, or its lines (split_lines), read one at a time."""
    lines = content.splitlines() if isinstance(content, str) else content
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=unique_keys)
        except RepeatedKey as e:
            raise UserError(f"{flag}: {p} line {n} has the key {e.key!r} more than once") from None
        except json.JSONDecodeError as e:
            raise UserError(
                f"{flag}: {p} line {n} is not JSON ({e.msg} at column {e.colno}){_several(line, e)}"
            ) from None
        except (ValueError, RecursionError) as e:  # e.g. an integer past Python's digit limit, or nesting
            raise UserError(f"{flag}: {p} line {n} is not usable JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            hint = "; JSON Lines is one object per line, not a JSON array" if isinstance(obj, list) else ""
            raise UserError(f"{flag}: {p} line {n} is not a JSON object{hint}")
        yield n, obj


def _several(line: str, e: json.JSONDecodeError) -> str:
    """A hint where the line holds the start of a JSON value written over several lines (a .json file's
    array, `jq .`'s indented output): its first line failed with no word of the format."""
    head = line.lstrip()
    if head.startswith("["):
        return "; JSON Lines is one object per line, not a JSON array (jq -c '.[]' converts one)"
    if head.startswith("{") and e.pos >= len(line.rstrip()):
        return "; JSON Lines is one object per line, not one object over several lines (jq -c . converts it)"
    return ""


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
    texts, labels, lines = [], [], []
    for n, text, y in labeled_rows(path, flag, text_column, label_column):
        texts.append(text)
        labels.append(y)
        lines.append(n)
    return LabeledTexts(texts, labels, lines)


def labeled_rows(
    path: str | os.PathLike,
    flag: str = "--train-file",
    text_column: str = "text",
    label_column: str = "label",
) -> Iterator[tuple[int, str, int]]:
    """(start line, text, 0/1 label) of each row of a labeled CSV, TSV or JSONL file, checked and read a
    row at a time (load_labeled_file holds them all; evaluate only the labels)."""
    p = readable_file(path, flag)
    pieces = file_pieces(p, flag)
    if is_jsonl(p):
        records: Iterable[tuple[int, dict]] = jsonl_objects(split_lines(pieces), p, flag)
    else:
        records = CsvRows(pieces, p, flag, _size(p))
    if isinstance(records, CsvRows):  # the header names the columns even when no row follows it
        need_columns(records.header, p, flag, [text_column, label_column], records.delimiter)
    first = True
    for n, row in records:
        if first:
            need_columns(list(row), p, flag, [text_column, label_column])
            first = False
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
            shown = repr(label) if isinstance(label, str) else json.dumps(label)  # JSON's true, not True
            raise UserError(
                f"{flag}: {p} line {n} has label {shown}; labels must be 0 (negative) or 1 (positive)"
                " (also accepted: 0.0/1.0, negative/positive, neg/pos, any case)"
            )
        yield n, text, y
    if first:
        raise UserError(f"{flag}: {p} has no rows")


def need_columns(
    found: list[str], p: Path, flag: str, wanted: list[str], delimiter: str | None = None
) -> None:
    """One line naming the columns a file lacks (a CSV's header, a JSONL file's first object), with the
    columns it has, and why where it is plain: a name in another case or with spaces around it, or a
    header read as one column because another character separates its columns (`delimiter`: a CSV's)."""
    missing = [c for c in wanted if c not in found]
    if not missing:
        return
    needs = " and ".join(repr(c) for c in wanted)
    hint = ""
    near = [f for f in found if f.strip().lower() in {c.strip().lower() for c in missing}]
    if near:
        hint = f"; in another case or with spaces around: {near}"
    elif delimiter is not None and len(found) == 1:
        other = next((c for c in "\t;," if c != delimiter and c in found[0]), None)
        if other == "\t":
            hint = "; its header is one column holding tabs: a tab-separated file is read so when named .tsv"
        elif other is not None:
            hint = (
                f"; its header is one column holding {other!r}: columns are separated by {delimiter!r} here"
            )
            hint += " (a .csv by commas, a .tsv by tabs)"
    raise UserError(f"{flag}: {p} lacks column(s) {missing}; it needs {needs} (columns found: {found}){hint}")


def _size(p: Path) -> int | None:
    """A regular file's size in bytes; None for a pipe."""
    return p.stat().st_size if p.is_file() else None


def read_texts(file: str | None, stdin_text: str | None, text_column: str = "text") -> tuple[list[str], int]:
    """Texts from --file (one per line, or JSONL/CSV with a `text_column` column) or from stdin lines,
    and how many blank lines were skipped (plain lines only): TextLines, all held."""
    reader = TextLines(file, None if stdin_text is None else [stdin_text], text_column)
    texts = list(reader)
    return texts, reader.blank


class TextLines:
    """Texts from --file (one per line, or JSONL/CSV with a `text_column` column) or from stdin's lines,
    read as they are asked for: never the whole input at once. `blank` counts the blank lines skipped so
    far (plain lines only), so the caller can say so: without that note, outputs would silently stop
    lining up with input lines. The file is checked (exists, is a file or a pipe) when this is made.

    `stdin`: stdin's text in pieces that each end with a line break (a stream of lines, utf8_pieces of
    its bytes), the last perhaps without; None with a --file, or for no text at all."""

    def __init__(self, file: str | None, stdin: Iterable[str] | None, text_column: str = "text"):
        self.blank = 0
        self.path = None if file is None else readable_file(file, "--file")
        self.stdin = stdin
        self.text_column = text_column

    def __iter__(self) -> Iterator[str]:
        p = self.path
        if p is None:
            return self._plain(split_lines(self.stdin or ()))
        if is_jsonl(p):
            return self._jsonl(p)
        if is_tabular(p):
            return self._csv(p)
        return self._plain(split_lines(file_pieces(p, "--file")))

    def _plain(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            if line.strip():
                yield line
            else:
                self.blank += 1

    def _jsonl(self, p: Path) -> Iterator[str]:
        column = self.text_column
        for n, obj in jsonl_objects(split_lines(file_pieces(p, "--file")), p, "--file"):
            if not isinstance(obj.get(column), str):
                raise UserError(f"--file: {p} line {n} has no {column!r} string")
            yield self._checked(obj[column], p, n)

    def _csv(self, p: Path) -> Iterator[str]:
        column = self.text_column
        rows = CsvRows(file_pieces(p, "--file"), p, "--file", _size(p))
        need_columns(rows.header, p, "--file", [column], rows.delimiter)
        for n, row in rows:
            if row[column] is None:  # a row with fewer cells than the header
                raise UserError(f"--file: {p} line {n} has no {column!r} value")
            yield self._checked(row[column], p, n)

    def _checked(self, text: str, p: Path, n: int) -> str:
        """A cell's text, refused here where its line is known (predict's own check names only its place
        among the texts, which is no line of a CSV with a header or quoted line breaks)."""
        if not has_content(text):
            raise UserError(
                f"--file: {p} line {n} has an empty {self.text_column!r} text (or only whitespace or "
                "control characters); give a review"
            )
        return text
