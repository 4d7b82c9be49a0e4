"""The output folder of `imdb-lora score`: where it may be, its marker, and what --overwrite may replace.

Every output holds `_imdb_lora_score.json` (a leading underscore: pyarrow datasets, Ray Data and pandas
skip it when reading the Parquet parts). It is written before any part, with "status": "running", and
rewritten when the job ends: "finished" with rows, errors and seconds, or "failed" with the error. A job
that was killed leaves "running": its parts are incomplete. `--overwrite` replaces only a folder holding
this marker, so it can never empty a folder this tool did not write. Everything goes through the
pyarrow filesystem of the output, so a bucket behaves as a local folder does.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any

from ..errors import UserError
from .sources import filesystem

MARKER = "_imdb_lora_score.json"
KIND = "imdb-lora score output"
MARKER_BYTES = 64 * 1024  # a marker is a few hundred bytes; never read more than this


def prepare_output(output: str, inputs: list[str], overwrite: bool) -> None:
    """An empty output folder holding a "running" marker; an earlier output replaced only if --overwrite."""
    from pyarrow import fs

    check_placement(output, inputs)
    fsys, path = filesystem(output)
    info = fsys.get_file_info(path)
    if info.type == fs.FileType.File:
        raise UserError(f"--output {output} is a file; give a folder")
    if info.type == fs.FileType.Directory and fsys.get_file_info(fs.FileSelector(path)):
        marker = read_marker(output)
        if not overwrite:
            raise UserError(f"--output {output} {describe(marker)}; pass --overwrite to replace it")
        if marker is None:  # --overwrite must never empty a folder this tool did not write
            raise UserError(f"--output {output} is not an imdb-lora score output; refusing to replace it")
        fsys.delete_dir_contents(path)
    fsys.create_dir(path, recursive=True)
    write_marker(output, {"status": "running", "started": _now()})


def describe(marker: dict[str, Any] | None) -> str:
    """What a non-empty output folder holds, for the refusal without --overwrite."""
    if marker is None:
        return "exists and is not empty"
    if marker.get("status") == "finished":
        return "holds an earlier score output"
    return (
        f"holds an unfinished score output (status {marker.get('status')!r}: the job was killed, "
        "failed or is still running)"
    )


def check_placement(output: str, inputs: list[str]) -> None:
    """Refuse an output that is, holds or lies inside an input, or that holds the current directory."""
    out = location(output)
    for given in inputs:
        inp = location(given)
        if out[0] == inp[0] and overlaps(out[1], inp[1]):
            raise UserError(
                f"--output {output} overlaps --input {given}; the output must not be, hold or lie inside "
                "an input: choose another folder"
            )
    if out[0] == "local" and overlaps(out[1], os.path.realpath(os.getcwd()), inner_only=True):
        raise UserError(f"--output {output} holds the current directory; choose another folder")


def location(uri: str) -> tuple[str, str]:
    """(kind of filesystem, normalized path): local paths resolved through symlinks, URIs normalized.

    Remote places are compared by scheme and path alone (a bucket is part of the path), not by host or
    credentials: two URIs that might name the same place count as the same, which refuses more, never less.
    """
    fsys, path = filesystem(uri)
    if fsys.type_name == "local":
        return "local", os.path.realpath(path)
    return fsys.type_name, posixpath.normpath("/" + path.strip("/"))


def overlaps(out: str, other: str, inner_only: bool = False) -> bool:
    """`out` is `other`, or holds it; unless inner_only, also `out` lies inside `other`."""
    inside = lambda a, b: a == b or a.startswith(b.rstrip("/") + "/")  # noqa: E731
    return inside(other, out) or (not inner_only and inside(out, other))


# ---------------------------------------------------------------- the marker


def marker_path(output: str) -> tuple[Any, str]:
    fsys, path = filesystem(output)
    return fsys, f"{path.rstrip('/')}/{MARKER}"


def read_marker(output: str) -> dict[str, Any] | None:
    """The marker's record, or None when the folder holds none (or something else under that name)."""
    fsys, path = marker_path(output)
    try:
        with fsys.open_input_stream(path) as f:
            record = json.loads(f.read(MARKER_BYTES))
    except Exception:  # noqa: BLE001 - missing, unreadable, not JSON, too deep: not our marker
        return None
    return record if isinstance(record, dict) and record.get("kind") == KIND else None


def write_marker(output: str, record: dict[str, Any]) -> None:
    fsys, path = marker_path(output)
    with fsys.open_output_stream(path) as f:
        f.write(json.dumps({"kind": KIND, **record}, indent=2).encode() + b"\n")


def finish_marker(output: str, rows: int, errors: int, seconds: float) -> None:
    started = (read_marker(output) or {}).get("started")
    write_marker(
        output,
        {
            "status": "finished",
            "started": started,
            "finished": _now(),
            "rows": rows,
            "errors": errors,
            "seconds": round(seconds, 3),
        },
    )


def fail_marker(output: str, error: BaseException) -> None:
    """Best effort: the job is already failing; a marker that cannot be written stays "running"."""
    started = (read_marker(output) or {}).get("started")
    message = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    try:
        write_marker(output, {"status": "failed", "started": started, "error": message[:500]})
    except Exception:  # noqa: BLE001 - keep the job's own error, not this one
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
