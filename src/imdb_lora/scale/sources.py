"""Input files for bulk scoring: listing, format by suffix, and reading as Arrow batches with provenance.

Both engines read through `read_batches`, so they accept the same inputs and give the same rows: every
batch carries the input's columns (ids...), `source_file` and `source_row` (0-based row in that file),
so the output's order can always be recovered. Input columns whose names the output uses are carried
as `input_<name>` (a labeled file's `label` becomes `input_label`, next to the predicted `label`).

Paths go through pyarrow's filesystems: local paths, or URIs such as s3://, gs://, hdfs://, abfs://
(credentials as pyarrow reads them). Compressed JSONL/CSV (.gz, .bz2, .zst, .lz4) are decompressed by
suffix. A JSONL line that is not in the input encoding (--encoding, default UTF-8), longer than
jsonl_line_chars(max_chars), not JSON (nested too deep too), not a JSON object, whose text is not a
string, or that holds both a name the output uses and its input_<name> (`label` and `input_label`),
becomes a row with an `error`, never a failed job; so does a CSV row with a cell that is not in the
encoding. CSV and Parquet are read by pyarrow: their columns are checked once before any work
(`check_columns`), and a file pyarrow cannot read stops the job with one line naming it.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..data.files import RepeatedKey, binary_kind, repeated_names, unique_keys
from ..errors import UserError, counted

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
    """How a listed file is named to other processes: a URI for remote files, an absolute local path.

    A URI's query (pyarrow's filesystem options: `?endpoint_override=HOST:PORT&scheme=http` for an
    S3-compatible store) is carried to the files listed under it: without it each file of
    `s3://bucket/in/?endpoint_override=...` was opened on AWS itself (a bucket of the same name there,
    or a one-line network error), not the store that listed it."""
    if "://" not in uri:
        return path
    query = urllib.parse.urlsplit(uri).query
    return uri.split("://", 1)[0] + "://" + path + (f"?{query}" if query else "")


# Query keys of pyarrow's filesystem URIs that hold a secret (abfs takes `client_secret`), or that would
# (S3 refuses `access_key`/`secret_key`/`session_token` in pyarrow 26, but its refusal came after the URI
# was already in a message): matched by name, so a key added later is caught too.
SECRET_WORDS = ("secret", "key", "token", "password", "sas", "signature", "credential")


def check_no_credentials(flag: str, uri: str) -> None:
    """Refuse a URI that carries credentials: the password of `s3://KEY:SECRET@bucket/...` (pyarrow's
    S3 access and secret key; abfs's account key), any user part of an s3:// URI (an access key), or a
    query key that names a secret. score writes its URIs into the output (source_file, the marker and
    its records) and onto the console (errors, the summary, a stop line's resume command). The line
    names the URI without its password and query, so the secret is never printed."""
    if "://" not in uri:
        return
    parts = urllib.parse.urlsplit(uri)
    try:
        user, password = parts.username, parts.password
    except ValueError:  # a malformed netloc: pyarrow refuses it
        return
    keys = [k for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    secret = [k for k in keys if any(w in k.lower() for w in SECRET_WORDS)]
    if not (password is not None or (user and parts.scheme == "s3") or secret):
        return
    what = f"the query's {', '.join(secret)}" if secret else "a KEY:SECRET@ part"
    env = (
        "the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) variables or an AWS profile"
        if parts.scheme == "s3"
        else "the store's own environment variables or configuration, as pyarrow reads them"
    )
    raise UserError(
        f"{flag} {without_credentials(uri)}: credentials in a URI ({what}) would be written into the "
        f"output and onto the console; remove them and give them by {env}"
    )


def without_credentials(uri: str) -> str:
    """A URI as it may be printed: its query and password dropped (s3://: its whole user part, a key)."""
    parts = urllib.parse.urlsplit(uri)
    user, _, host = parts.netloc.rpartition("@")
    user = user.split(":", 1)[0]  # a password, never shown
    kept = f"{user}@{host}" if user and parts.scheme != "s3" else host  # abfs: the container, not a secret
    return urllib.parse.urlunsplit((parts.scheme, kept, parts.path, "", ""))


@dataclass(frozen=True)
class Source:
    uri: str  # absolute local path or URI: what read_batches opens, and the output's source_file
    format: str  # json, csv or parquet
    # As listed (None where the filesystem does not say): score --resume checks an input is unchanged.
    size: int | None = field(default=None, compare=False)
    mtime_ns: int | None = field(default=None, compare=False)


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
                f
                for f in fsys.get_file_info(fs.FileSelector(path, recursive=True))
                if f.type == fs.FileType.File
                and format_of(f.path)
                and not os.path.basename(f.path).startswith((".", "_"))
            ]
            if not found:
                raise UserError(f"--input: {given} holds no .jsonl, .csv or .parquet file")
            out += [source_of(given, f) for f in sorted(found, key=lambda f: f.path)]
        elif format_of(path):
            out.append(source_of(given, info))
        else:
            raise UserError(f"--input: {given}: unknown format; use .jsonl, .csv, .tsv or .parquet files")
    return once_each(out, inputs)


def once_each(sources: list[Source], inputs: list[str]) -> list[Source]:
    """The sources, refused in one line if a file is listed twice (the same path given twice, or a
    folder and a file in it, or by a symlink or a file:// URI): it was scored twice, its rows repeated,
    so the output no longer had one row per input row."""
    seen: dict[str, str] = {}  # same_file_key -> the name it was first listed under
    for src in sources:
        key = same_file_key(src.uri)
        if key in seen:
            also = f" (as {seen[key]})" if seen[key] != src.uri else ""
            raise UserError(
                f"--input: {src.uri}{also} is named twice by --input {' '.join(inputs)}; give each file once"
            )
        seen[key] = src.uri
    return sources


def same_file_key(uri: str) -> str:
    """What makes two listed names one file: a local file's device and inode (file:// URIs read as
    paths), which a symlink, a hard link and, on a case-insensitive disk, another case share; a remote
    URI as given."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    local = uri.removeprefix("file://")
    try:
        st = os.stat(local)
    except OSError:  # listed a moment ago: gone since, it is reported when read
        return os.path.realpath(local)
    return f"{st.st_dev}:{st.st_ino}"


def source_of(given: str, info) -> Source:
    """The Source of a listed file (a pyarrow FileInfo) under the --input it was found by."""
    return Source(full_uri(given, info.path), format_of(info.path), info.size, info.mtime_ns)


def check_encoding(name: str) -> str:
    """--encoding as Python's codec name (utf-8, iso8859-1, cp1252...), or one line if there is none."""
    try:
        info = codecs.lookup(name)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # rot13, base64...: not text codecs
        raise UserError(f"--encoding {name}: not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)")
    return info.name


# JSON objects of a JSONL input looked at before any work for the text column (their keys vary by line).
PEEK_OBJECTS = 1000


def check_columns(sources: list[Source], text_column: str, max_chars: int, encoding: str = "utf-8") -> None:
    """Fail before any work where an input cannot give texts: bytes that are no text at all, a CSV or
    Parquet file without the text column (or naming a column twice, or whose text column holds no
    strings), a JSONL file none of whose first PEEK_OBJECTS objects has it. Each of these made every
    row an error row (or a traceback), and the job still ended with exit status 0."""
    for s in sources:
        _check_not_binary(s)
        try:
            if s.format == "json":
                _check_jsonl_column(s, text_column, max_chars, encoding)
                continue
            schema = _schema(s, max_chars, encoding)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"--input: cannot read {s.uri} ({_cause(e, max_chars)})") from None
        names = schema.names
        if text_column not in names:
            raise UserError(
                f"--text-column: {s.uri} has no column {text_column!r} (it has {', '.join(names) or 'none'})"
            )
        twice = repeated_names(names)
        if twice:  # pyarrow cannot pick one of them: a KeyError traceback while scoring
            raise UserError(f"--input: {s.uri} names column(s) {twice} more than once")
        _check_text_type(s, schema.field(text_column).type, text_column)
        clash = {carried_name(n) for n in names if carried_name(n) != n} & set(names)
        if clash:
            raise UserError(f"{s.uri}: columns {sorted(clash)} would collide in the output; rename them")


def _check_not_binary(s: Source) -> None:
    """A JSONL or CSV file that is compressed (or Parquet) without saying so in its name: each of its
    'lines' became an error row (JSONL), or pyarrow's parse error quoted the raw bytes (CSV)."""
    fsys, path = filesystem(s.uri)  # its name without a URI's query (full_uri)
    if s.format == "parquet" or format_of(path) is None or path.lower().endswith(COMPRESSIONS):
        return
    with fsys.open_input_stream(path, compression=None) as f:
        head = f.read(8)
    kind = binary_kind(head)
    if kind:
        raise UserError(
            f"--input: {s.uri} is {kind}, not text; name it by its format ({', '.join(COMPRESSIONS)} are "
            "decompressed) or convert it"
        )


def _check_text_type(s: Source, tp, text_column: str) -> None:
    """A Parquet text column must hold strings (a CSV's columns always do)."""
    import pyarrow as pa

    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)):
        if not (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(tp)):
            raise UserError(f"--text-column: {s.uri}'s column {text_column!r} holds {tp}, not strings")


def _check_jsonl_column(s: Source, text_column: str, max_chars: int, encoding: str) -> None:
    """Some of the first PEEK_OBJECTS JSON objects must have the text column: a mistyped or absent
    column (`Text`, `review`) made every row of the file an error row. A file with no readable object
    there is left to the per-row errors."""
    fsys, path = filesystem(s.uri)
    seen: dict[str, None] = {}
    objects = 0
    with fsys.open_input_stream(path) as f:
        lines = io.TextIOWrapper(f, encoding=_jsonl_codec(encoding), errors="replace")
        for line in _bounded_lines(lines, jsonl_line_chars(max_chars)):
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except Exception:  # noqa: BLE001 - a bad line is its own row's error, read later
                continue
            if not isinstance(obj, dict):
                continue
            if text_column in obj:
                return
            seen.update(dict.fromkeys(obj))
            objects += 1
            if objects >= PEEK_OBJECTS:
                break
    if objects:
        keys = ", ".join(list(seen)[:20]) or "none"
        raise UserError(
            f"--text-column: {s.uri} has no key {text_column!r} in its first {counted(objects, 'JSON object')} "
            f"(keys: {keys})"
        )


def _jsonl_codec(encoding: str) -> str:
    """UTF-8 read as utf-8-sig: a byte order mark made line 1 an error row in JSONL, while pyarrow
    skips it in a CSV."""
    codec = _codec(encoding)
    return "utf-8-sig" if codec == "utf-8" else codec


def _schema(s: Source, max_chars: int, encoding: str):
    """The Arrow schema of a Parquet file, or a CSV's header as a schema of strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fsys, path = filesystem(s.uri)
    if s.format == "parquet":
        with fsys.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow
    names = _csv_names(fsys, path, s.uri, max_chars, encoding)
    return pa.schema([pa.field(n, pa.string()) for n in names])  # a schema may name a column twice


def _csv_names(fsys, path: str, uri: str, max_chars: int, encoding: str) -> list[str]:
    """The header's names, decoded here as the cells are (pyarrow would replace bytes it cannot read)."""
    # Both reads are serial: a threaded reader may parse the next block ahead, and that block's error
    # (a row longer than a block) would then fail this check instead of the read, at its row.
    with fsys.open_input_stream(path) as f:  # how many columns (pyarrow types the first block to tell)
        columns = len(_csv_reader(f, uri, max_chars, encoding, None, threads=False).schema)
    with fsys.open_input_stream(path) as f:
        reader = _csv_reader(f, uri, max_chars, encoding, columns, threads=False)
        header = reader.read_next_batch().slice(0, 1)
    names = []
    for raw in header.columns:
        try:
            names.append(raw[0].as_py().decode(_cell_codec(encoding)))
        except UnicodeDecodeError:
            raise UserError(
                f"--input: the header of {uri} is not {_label(encoding)}; give its encoding with --encoding"
            ) from None
    return names


def _csv_reader(f, uri: str, max_chars: int, encoding: str, columns: int | None, threads: bool = True):
    """pyarrow's CSV reader over raw cells: the header is the first row (f0, f1... as names) and, once
    the number of columns is known, every column is binary, so pyarrow neither types nor decodes a cell:
    one that is not in the encoding becomes that row's error (_decode_cells), not a failed file."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(
        block_size=csv_block_bytes(max_chars),
        autogenerate_column_names=True,
        encoding=_stream_codec(encoding),
        use_threads=threads,
    )
    convert = pcsv.ConvertOptions(column_types={f"f{i}": pa.binary() for i in range(columns or 0)})
    return pcsv.open_csv(f, read_options=read, parse_options=_csv_parse(uri), convert_options=convert)


# The reading functions take `encoding` as the user typed it (--encoding US-ASCII, latin-1): they decode
# with its codec (_codec) and name it as typed in their errors (_label); a codec's own name (ascii,
# iso8859-1) in an error sent the user looking for a flag value they never gave.


@functools.cache
def _codec(encoding: str) -> str:
    """Python's own name of the codec `encoding` names (check_encoding has refused unknown names)."""
    return codecs.lookup(encoding).name


@functools.cache
def _keeps_ascii(encoding: str) -> bool:
    """Every ASCII byte alone is that character (UTF-8, Latin-1, cp1252, Shift-JIS...): delimiters, quotes
    and newlines are the same bytes, so pyarrow can split the raw bytes and each cell is decoded alone."""
    try:
        return all(bytes([b]).decode(_codec(encoding)) == chr(b) for b in range(128))
    except UnicodeDecodeError:  # UTF-16/32, ISO-2022...
        return False


def _stream_codec(encoding: str) -> str:
    """What pyarrow transcodes the whole file from: nothing ("utf8") where cells are decoded one by one;
    otherwise (UTF-16...) pyarrow transcodes to UTF-8, and a byte it cannot read fails the file."""
    return "utf8" if _keeps_ascii(encoding) else _codec(encoding)


def _cell_codec(encoding: str) -> str:
    return _codec(encoding) if _keeps_ascii(encoding) else "utf-8"


def _label(encoding: str) -> str:
    """The encoding as errors name it: as typed, UTF-8 however it was spelt (the default's name)."""
    return "UTF-8" if _codec(encoding) == "utf-8" else encoding


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


def _cause(e: Exception, max_chars: int) -> str:
    """An exception from reading a file, in words a user can act on."""
    if "straddl" in str(e):  # pyarrow: one CSV row longer than its block
        mib = csv_block_bytes(max_chars) >> 20
        return f"a CSV row is longer than {mib} MiB, the most read with --max-chars {max_chars:,}"
    text = str(e)  # pyarrow's parse error quotes the whole offending row: a few hundred characters do
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# ---------------------------------------------------------------- reading


def read_batches(
    uri: str, fmt: str, rows: int, text_column: str, max_chars: int, encoding: str = "utf-8"
) -> Iterator[Any]:
    """Arrow tables of up to `rows` rows: the input's columns (renamed where they clash) + provenance.

    JSONL and CSV tables come with an `error` column already (lines or cells that could not be read),
    their own columns renamed already; Parquet's own `error` column, like any clashing name, is carried
    as input_<name>. `encoding` is that of JSONL and CSV files; Parquet is always UTF-8.
    """
    start = 0
    try:
        if fmt == "json":
            tables = _jsonl(uri, rows, text_column, max_chars, encoding)
        elif fmt == "parquet":
            tables = _parquet(uri, rows)
        else:
            tables = _csv(uri, rows, max_chars, encoding)
        for table in tables:
            yield _with_provenance(table, uri, start, keep_error=fmt != "parquet")
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


def _csv(uri: str, rows: int, max_chars: int, encoding: str):
    """Every CSV column as text: a column typed from the first block cannot fail on a later row."""
    fsys, path = filesystem(uri)
    names = [carried_name(n) for n in _csv_names(fsys, path, uri, max_chars, encoding)]
    with fsys.open_input_stream(path) as f:
        reader = _csv_reader(f, uri, max_chars, encoding, len(names))
        decoded = (
            _decode_cells(rb.slice(1) if i == 0 else rb, names, encoding)  # batch 0 starts with the header
            for i, rb in enumerate(reader)
        )
        yield from _rebatch(decoded, rows)


def _decode_cells(batch, names: list[str], encoding: str):
    """Raw (binary) CSV cells as text, plus an `error` column: a cell that is not in the encoding is
    null, and its row says which column, so that row alone is not scored (never a changed text)."""
    import pyarrow as pa

    errors: list[str | None] = [None] * batch.num_rows
    columns = [_decode_column(raw, name, encoding, errors) for raw, name in zip(batch.columns, names)]
    return pa.Table.from_arrays([*columns, pa.array(errors, pa.string())], names=[*names, "error"])


def _decode_column(raw, name: str, encoding: str, errors: list[str | None]):
    import pyarrow as pa

    codec = _cell_codec(encoding)
    if codec == "utf-8":
        try:
            return raw.cast(pa.string())  # Arrow checks the UTF-8 of the whole column at C speed
        except pa.ArrowInvalid:
            pass  # some cell is not UTF-8: find which, one by one
    values = []
    for i, cell in enumerate(raw.to_pylist()):
        try:
            values.append(None if cell is None else cell.decode(codec))
        except UnicodeDecodeError as e:
            values.append(None)
            errors[i] = errors[i] or (
                f"column {name!r} is not {_label(encoding)} (byte 0x{cell[e.start]:02x} at offset {e.start}; "
                "--encoding)"
            )
    return pa.array(values, pa.string())


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


def jsonl_line_chars(max_chars: int) -> int:
    """The longest JSONL line read, in characters; a longer one is an error row, never read whole.

    A text of max_chars characters can take 12 line characters each: json.dumps' default (ensure_ascii)
    writes every non-ASCII character as a 6-character \\uXXXX escape, and one outside the BMP (an emoji)
    as a pair of them; 1,000,000 more leave room for the other fields. So every line whose text fits
    --max-chars is read (a longer text is refused later, with its own message), while a line of
    gigabytes, or a .gz expanding to one, costs at most this many characters in memory (2,200,000 by
    default; a Python string holds at most 4 bytes per character).
    """
    return 12 * max_chars + 1_000_000


def _jsonl(uri: str, rows: int, text_column: str, max_chars: int = 100_000, encoding: str = "utf-8"):
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
        lines = io.TextIOWrapper(f, encoding=_jsonl_codec(encoding), errors="surrogateescape")
        batch: list[dict] = []
        for n, line in enumerate(_bounded_lines(lines, jsonl_line_chars(max_chars)), 1):
            if line is None:
                batch.append({"error": _too_long(n, max_chars)})
            elif not line.strip():
                continue
            else:
                batch.append(_json_row(line, n, encoding))
            if len(batch) == rows:
                yield _json_table(batch, text_key)
                batch = []
        if batch:
            yield _json_table(batch, text_key)


def _bounded_lines(lines: io.TextIOWrapper, limit: int) -> Iterator[str | None]:
    """Each line (up to `limit` characters, newline aside), or None for a longer one, whose rest is
    read in small pieces and dropped: memory stays bounded, and the next line keeps its number."""
    while True:
        line = lines.readline(limit + 1)  # TextIOWrapper stops at `limit + 1` characters, newline or not
        if not line:
            return
        if len(line) <= limit or line.endswith("\n"):
            yield line
            continue
        while (rest := lines.readline(1 << 16)) and not rest.endswith("\n"):
            pass
        yield None


def _too_long(n: int, max_chars: int) -> str:
    limit = jsonl_line_chars(max_chars)
    return f"line {n} is longer than {limit:,} characters (12 per --max-chars character, plus 1,000,000)"


def _json_row(line: str, n: int, encoding: str = "utf-8") -> dict:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return {"error": f"line {n} is not {_label(encoding)}"}
    try:
        obj = json.loads(line, object_pairs_hook=unique_keys)
    except RepeatedKey as e:  # json keeps the last of the two without a word
        return {"error": f"line {n} has the key {e.key!r} more than once"}
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
