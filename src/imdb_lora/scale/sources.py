"""Input files for bulk scoring: listing, format by suffix, and reading as Arrow batches with provenance.

Both engines read through `read_batches`, so they accept the same inputs and give the same rows: every
batch carries the input's columns (ids...), `source_file` and `source_row` (0-based row in that file),
so the output's order can always be recovered. Input columns whose names the output uses are carried
as `input_<name>` (a labeled file's `label` becomes `input_label`, next to the predicted `label`).

Paths go through pyarrow's filesystems: local paths, or URIs such as s3://, gs://, hdfs://, abfs://
(credentials as pyarrow reads them). Compressed JSONL/CSV (.gz, .bz2, .zst, .lz4) are decompressed by
suffix. A JSONL line that is not UTF-8, not JSON (nested too deep too), not a JSON object, whose text
is not a string, or that holds both a name the output uses and its input_<name> (`label` and
`input_label`), becomes a row with an `error`, never a failed job. CSV and Parquet are read by pyarrow:
their columns are checked once before any work (`check_columns`), and a file pyarrow cannot read stops
the job with one line naming it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
# Columns every output has; input columns of the same name are carried as input_<name>.
OUTPUT_COLUMNS = (
    "source_file",
    "source_row",
    "label",
    "label_id",
    "confidence",
    "prob_negative",
    "prob_positive",
    "error",
)


def carried_name(name: str) -> str:
    return f"input_{name}" if name in OUTPUT_COLUMNS else name


def format_of(path: str) -> str | None:
    base = path.lower()
    for c in COMPRESSIONS:
        if base.endswith(c):
            base = base[: -len(c)]
            break
    fmt = FORMATS.get(os.path.splitext(base)[1])
    return None if fmt == "parquet" and base != path.lower() else fmt  # parquet compresses inside


def filesystem(uri: str):
    """(pyarrow filesystem, path) of a local path or a URI."""
    from pyarrow import fs

    target = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
    try:
        return fs.FileSystem.from_uri(target)
    except Exception as e:  # pyarrow's errors for unknown schemes, missing credentials...
        raise UserError(f"cannot open {uri}: {e}") from None


def full_uri(uri: str, path: str) -> str:
    """How a listed file is named to other processes: a URI for remote files, an absolute local path."""
    if "://" not in uri:
        return path
    return uri.split("://", 1)[0] + "://" + path


@dataclass(frozen=True)
class Source:
    uri: str  # absolute local path or URI: what read_batches opens, and the output's source_file
    format: str  # json, csv or parquet


def list_sources(inputs: list[str]) -> list[Source]:
    """Every input file, in the given order (folders: their known files, sorted, recursively)."""
    from pyarrow import fs

    out: list[Source] = []
    for given in inputs:
        fsys, path = filesystem(given)
        info = fsys.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise UserError(f"--input: no such file or folder: {given}")
        if info.type == fs.FileType.Directory:
            found = [
                f.path
                for f in fsys.get_file_info(fs.FileSelector(path, recursive=True))
                if f.type == fs.FileType.File
                and format_of(f.path)
                and not os.path.basename(f.path).startswith((".", "_"))
            ]
            if not found:
                raise UserError(f"--input: {given} holds no .jsonl, .csv or .parquet file")
            out += [Source(full_uri(given, p), format_of(p)) for p in sorted(found)]
        elif format_of(path):
            out.append(Source(full_uri(given, path), format_of(path)))
        else:
            raise UserError(f"--input: {given}: unknown format; use .jsonl, .csv, .tsv or .parquet files")
    return out


def check_columns(sources: list[Source], text_column: str, max_chars: int) -> None:
    """Fail before any work if a CSV or Parquet input lacks the text column (JSONL is checked per row)."""
    for s in sources:
        if s.format == "json":
            continue
        names = _schema_names(s, max_chars)
        if text_column not in names:
            raise UserError(
                f"--text-column: {s.uri} has no column {text_column!r} (it has {', '.join(names) or 'none'})"
            )
        clash = {carried_name(n) for n in names if carried_name(n) != n} & set(names)
        if clash:
            raise UserError(f"{s.uri}: columns {sorted(clash)} would collide in the output; rename them")


def _schema_names(s: Source, max_chars: int) -> list[str]:
    import pyarrow.parquet as pq

    fsys, path = filesystem(s.uri)
    try:
        if s.format == "parquet":
            with fsys.open_input_file(path) as f:
                return pq.ParquetFile(f).schema_arrow.names
        return _csv_names(fsys, path, s.uri, max_chars)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--input: cannot read {s.uri} ({_cause(e, max_chars)})") from None


def _csv_names(fsys, path: str, uri: str, max_chars: int) -> list[str]:
    import pyarrow.csv as pcsv

    with fsys.open_input_stream(path) as f:
        return pcsv.open_csv(f, read_options=_csv_read(max_chars), parse_options=_csv_parse(uri)).schema.names


def _csv_parse(uri: str):
    import pyarrow.csv as pcsv

    tsv = ".tsv" in uri.lower().rsplit("/", 1)[-1]
    return pcsv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True)


def csv_block_bytes(max_chars: int) -> int:
    """pyarrow's CSV block: a row longer than one block can fail the whole file ("straddling object").

    A block holds a text of max_chars characters (up to 4 UTF-8 bytes each) twice over, so its other
    cells fit beside it, and at least 16 MiB, so a text far over the bound still reaches ScoreBatch and
    becomes an error row (pyarrow 26 read rows of up to about two blocks; one byte more failed).
    """
    return max(16 << 20, 8 * max_chars)


def _csv_read(max_chars: int):
    import pyarrow.csv as pcsv

    return pcsv.ReadOptions(block_size=csv_block_bytes(max_chars))


def _cause(e: Exception, max_chars: int) -> str:
    """An exception from reading a file, in words a user can act on."""
    if "straddl" in str(e):  # pyarrow: one CSV row longer than its block
        mib = csv_block_bytes(max_chars) >> 20
        return f"a CSV row is longer than {mib} MiB, the most read with --max-chars {max_chars:,}"
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- reading


def read_batches(uri: str, fmt: str, rows: int, text_column: str, max_chars: int) -> Iterator[Any]:
    """Arrow tables of up to `rows` rows: the input's columns (renamed where they clash) + provenance.

    JSONL tables come with an `error` column already (lines that could not be read); other formats'
    own `error` column, like any clashing name, is carried as input_<name>.
    """
    start = 0
    try:
        if fmt == "json":
            tables = _jsonl(uri, rows, text_column)
        elif fmt == "parquet":
            tables = _parquet(uri, rows)
        else:
            tables = _csv(uri, rows, max_chars)
        for table in tables:
            yield _with_provenance(table, uri, start, keep_error=fmt == "json")
            start += table.num_rows
    except UserError:
        raise
    except Exception as e:  # a corrupt or unreadable file: name it, in one line
        raise UserError(f"--input: cannot read {uri} after row {start} ({_cause(e, max_chars)})") from None


def _with_provenance(table, uri: str, start: int, keep_error: bool):
    import pyarrow as pa

    names = [n if keep_error and n == "error" else carried_name(n) for n in table.column_names]
    table = table.rename_columns(names)
    n = table.num_rows
    table = table.append_column("source_file", pa.array([uri] * n, pa.string()))
    return table.append_column("source_row", pa.array(range(start, start + n), pa.int64()))


def _parquet(uri: str, rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fsys, path = filesystem(uri)
    with fsys.open_input_file(path) as f:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([rb])


def _csv(uri: str, rows: int, max_chars: int):
    """Every CSV column as text: a column typed from the first block cannot fail on a later row."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    fsys, path = filesystem(uri)
    names = _csv_names(fsys, path, uri, max_chars)
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names})
    with fsys.open_input_stream(path) as f:
        reader = pcsv.open_csv(
            f, read_options=_csv_read(max_chars), parse_options=_csv_parse(uri), convert_options=convert
        )
        yield from _rebatch((pa.Table.from_batches([rb]) for rb in reader), rows)


def _rebatch(tables, rows: int):
    import pyarrow as pa

    pending, n = [], 0
    for t in tables:
        pending.append(t)
        n += t.num_rows
        while n >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(pending)


def _jsonl(uri: str, rows: int, text_column: str):
    """JSON lines parsed one by one, so a bad line is a row with an error, not an unreadable file.

    The `error` column written here (an unreadable line, a text that is not a string) is kept by
    ScoreBatch; the text of such a row is null. Keys are renamed as the output carries them (`label`
    -> `input_label`) line by line, so lines that disagree on their keys cannot collide. Values of
    other columns that do not share one type are carried as their JSON text.
    """
    text_key = carried_name(text_column)
    fsys, path = filesystem(uri)
    with fsys.open_input_stream(path) as f:
        # surrogateescape keeps invalid bytes recognisable (a lone surrogate), so that line, and only
        # it, becomes an error row instead of a silently changed text.
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape")
        batch: list[dict] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            batch.append(_json_row(line, n))
            if len(batch) == rows:
                yield _json_table(batch, text_key)
                batch = []
        if batch:
            yield _json_table(batch, text_key)


def _json_row(line: str, n: int) -> dict:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return {"error": f"line {n} is not UTF-8"}
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {"error": f"line {n} is not JSON ({e.msg})"}
    except Exception as e:  # noqa: BLE001 - RecursionError (nested too deep), huge numbers...
        return {"error": f"line {n} is not readable JSON ({type(e).__name__})"}
    if not isinstance(obj, dict):
        return {"error": f"line {n} is not a JSON object"}
    if "\\u" in line and not _valid_unicode(obj):
        return {"error": f"line {n} is not valid Unicode (a lone surrogate escape such as \\udc80)"}
    row = {}
    for key, value in obj.items():
        name = carried_name(key)
        if name != key and name in obj:
            return {
                "error": f"line {n} has both {key!r} and {name!r} (the output carries {key!r} as {name!r})"
            }
        row[name] = value
    return row


def _valid_unicode(obj: dict) -> bool:
    """No lone surrogate (from a \\udXXX escape) anywhere: Arrow and Parquet hold UTF-8 only."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except Exception:  # noqa: BLE001 - too deep to check here: _json_table carries it as text or not at all
        return True
    return True


def _json_table(batch: list[dict], text_key: str):
    import pyarrow as pa

    for row in batch:
        text = row.get(text_key)
        if text is not None and not isinstance(text, str):
            row[text_key] = None
            row.setdefault("error", f"{text_key!r} is a JSON {type(text).__name__}, not text")
    names: dict[str, None] = {text_key: None}
    for row in batch:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in batch]
        try:
            columns[name] = pa.array(values)
        except Exception:  # noqa: BLE001 - mixed types, an int over 64 bits...: keep what each value was
            columns[name] = pa.array(
                [None if v is None else v if isinstance(v, str) else _json_text(v) for v in values],
                pa.string(),
            )
    if "error" not in columns:
        columns["error"] = pa.nulls(len(batch), pa.string())
    return pa.table(columns)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except Exception:  # noqa: BLE001 - RecursionError: json.loads read it, but deeper than dumps goes
        return "(nested too deep to carry)"
