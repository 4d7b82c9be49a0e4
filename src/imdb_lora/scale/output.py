"""The output folder of `imdb-lora score`: where it may be, its marker, and what --overwrite may replace.

Every output holds `_imdb_lora_score.json` (a leading underscore: pyarrow datasets, Ray Data and pandas
skip it when reading the Parquet parts). It is written before any part, with "status": "running", and
rewritten when the job ends: "finished" with rows, errors and seconds, "stopped" with the signal (Ctrl-C,
SIGTERM), or "failed" with the error. A job that was killed (SIGKILL, a crash), or that could not write
its end, leaves "running": its parts are incomplete. --resume takes every status but "finished" alike
(scale/resume.py); before "stopped" existed, a stopped job's marker said "failed" with the error
"interrupted". The marker also records the job (its settings, model and input files), which `--resume`
must find unchanged. `--overwrite` replaces only a folder holding this marker, so it can never empty a
folder this tool did not write; a folder holding nothing but the marker of a job that ended ("failed",
"stopped") before writing a part is replaced without it (nothing_to_lose). Everything goes through the
pyarrow filesystem of the output, so a bucket behaves as a local folder does.

A LOCAL output is also locked while a job writes it: `_imdb_lora_score.lock` holds the writer's pid
under an OS lock (flock, as runs/rundir.py locks a run), taken before anything in the folder is deleted
or written and held by the driver process until the job ends, so a second job on the same output (with
--overwrite or not) is refused and touches nothing. A killed job's lock goes with its process: a lock
file left behind blocks nobody. Remote (URI) outputs have no such lock (object stores offer no flock):
two jobs must not be given the same remote output.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
from typing import IO, Any

from ..errors import Terminated, UserError
from ..runs.filelock import lock_file, write_pid
from .sources import filesystem

MARKER = "_imdb_lora_score.json"
KIND = "imdb-lora score output"
LOCK = "_imdb_lora_score.lock"  # a leading underscore too: readers of the parts skip it
# A marker names the job's input files (for --resume): ~150 bytes each; never read more than this.
MARKER_BYTES = 256 * 1024 * 1024


def prepare_output(
    output: str, inputs: list[str], overwrite: bool, job: dict[str, Any] | None = None
) -> IO[str] | None:
    """An empty output folder holding a "running" marker; an earlier output replaced only if --overwrite.

    `job`: what the marker records of the job, for --resume (scale/resume.py). Returns the held lock of
    a local output (None for a remote one): close it when the job has ended.
    """
    fsys, path, local, held, full = _checked(output, inputs, overwrite)
    lock = None
    try:
        if full:
            if local and held is None:  # an output without a lock file: ours (its marker says so), lock it
                held = lock_output(output, path, create=True)
            if held is not None:  # a job refused by our lock from here on names us, not a dead holder
                write_pid(held)
            fsys.delete_dir_contents(path)  # the lock file too: `held` keeps its lock on the deleted file
        elif held is not None:  # nothing to delete: the lock file we hold stays this job's lock
            lock, held = held, None
        try:
            fsys.create_dir(path, recursive=True)
        except OSError as e:  # under a file, a read-only or unwritable place: pyarrow's own traceback
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise UserError(f"--output {output}: cannot create the folder ({reason})") from None
        if local and lock is None:
            # A new lock file, locked before the deleted one's lock is let go (finally), so no other job
            # slips in between; one that took the new file first (a narrow race) refuses this one here.
            lock = lock_output(output, path, create=True)
        if lock is not None:
            write_pid(lock)
        write_marker(output, {"status": "running", "started": utc_now(), "attempt": 1, "job": job})
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    finally:
        if held is not None:
            held.close()
    return lock


def check_output(output: str, inputs: list[str], overwrite: bool) -> None:
    """prepare_output's refusals, with nothing written or deleted: for a job with slow work to do before
    it prepares its output (score --engine ray starts Ray), so that a refused output is said first."""
    held = _checked(output, inputs, overwrite)[3]
    if held is not None:
        held.close()


def _checked(output: str, inputs: list[str], overwrite: bool):
    """The refusals of prepare_output, before it changes anything: (filesystem, path, local, the lock of
    an earlier job's lock file, now held, or None, whether the folder holds anything)."""
    from pyarrow import fs

    check_placement(output, inputs)
    fsys, path = filesystem(output)
    local = fsys.type_name == "local"
    info = fsys.get_file_info(path)
    if info.type == fs.FileType.File:
        raise UserError(f"--output {output} is a file; give a folder")
    if info.type not in (fs.FileType.Directory, fs.FileType.NotFound):  # /dev/null, a FIFO, a socket
        raise UserError(f"--output {output} exists and is not a folder; give a folder")
    # The lock of an earlier job, before anything else: a running job's folder is never read as
    # "unfinished" nor emptied. Only an existing lock file is opened: a folder this tool may refuse
    # (not a score output, no --overwrite) gets nothing written into it.
    held = lock_output(output, path, create=False) if local and info.type == fs.FileType.Directory else None
    try:
        contents = _contents(fsys, path) if info.type == fs.FileType.Directory else []
        full = bool(contents)
        if full:
            marker = read_marker(output)
            if not overwrite and not nothing_to_lose(marker, contents):
                raise UserError(f"--output {output} {describe(marker, local)}; {what_to_pass(marker)}")
            if marker is None:  # --overwrite must never empty a folder this tool did not write
                raise UserError(f"--output {output} is not an imdb-lora score output; refusing to replace it")
    except BaseException:
        if held is not None:
            held.close()
        raise
    return fsys, path, local, held, full


def nothing_to_lose(marker: dict[str, Any] | None, contents: list) -> bool:
    """An output whose job ended ("failed" or "stopped") before it wrote anything but its marker: a
    worker that could not load the model, a first block that raised, Ctrl-C during Ray's start. Replacing
    it loses nothing, so a rerun needs no --overwrite (it did: the rerun of a Ray job whose workers could
    not load the model was refused until given --overwrite, for an output holding no row). A "running"
    marker is not taken: on a remote output (no lock) its job may still be starting."""
    ended = marker is not None and marker.get("status") in ("failed", "stopped")
    return ended and [i.base_name for i in contents] == [MARKER]


def _contents(fsys, path: str) -> list:
    """What a folder holds, the lock file aside: a folder holding only a lock file counts as empty."""
    from pyarrow import fs

    return [i for i in fsys.get_file_info(fs.FileSelector(path)) if i.base_name != LOCK]


def lock_output(output: str, path: str, create: bool) -> IO[str] | None:
    """An exclusive flock on the output's lock file; None if there is none to lock (create=False and no
    file). Another holder: one line naming its pid (the file's content), and nothing touched."""
    return lock_file(
        os.path.join(path, LOCK),
        create,
        busy=lambda pid: (
            f"--output {output} is being written by another imdb-lora score job (pid {pid}); "
            "wait for it to end or stop it, or choose another folder"
        ),
        unusable=lambda why: f"--output {output}: cannot open its lock file {LOCK} ({why})",
        changing=f"--output {output}: its lock file keeps changing; is another score job starting?",
    )


def describe(marker: dict[str, Any] | None, lock_checked: bool = False) -> str:
    """What a non-empty output folder holds, for the refusal without --overwrite.

    lock_checked: a local output whose lock no job holds, so an unfinished output's job has ended; a
    remote one has no lock, and its job may still be running.
    """
    if marker is None:
        return "exists and is not empty"
    status = marker.get("status")
    if status == "finished":
        return "holds an earlier score output"
    # "stopped" and "failed" are written as the job ends: it has ended, lock or not
    if status == "stopped" or marker.get("error") == "interrupted":  # the latter: "failed", before "stopped"
        why = f"the job was stopped by {marker.get('signal', 'a signal')}"
    elif status == "failed":
        why = "the job failed"
    elif lock_checked:
        why = "the job was killed or failed"
    else:
        why = "the job was killed, failed or is still running"
    return f"holds an unfinished score output (status {status!r}: {why})"


def resumable(marker: dict[str, Any] | None) -> bool:
    """An unfinished output of the local engine that recorded its job: --resume can continue it."""
    job = (marker or {}).get("job")
    return (
        marker is not None
        and marker.get("status") != "finished"
        and isinstance(job, dict)
        and (job.get("engine") == "local")
    )


def what_to_pass(marker: dict[str, Any] | None) -> str:
    if resumable(marker):
        return "pass --resume to continue it, or --overwrite to replace it"
    return "pass --overwrite to replace it"


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


def output_file(output: str, name: str) -> tuple[Any, str]:
    """(filesystem, path) of the file `name` in the output folder."""
    fsys, path = filesystem(output)
    return fsys, f"{path.rstrip('/')}/{name}"


def marker_path(output: str) -> tuple[Any, str]:
    return output_file(output, MARKER)


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
    """Whole or not at all: written beside the marker, then renamed over it. A full disk under a rewrite in
    place left an empty marker, which made the output "not an imdb-lora score output" that even
    --overwrite refused; now the previous marker stays (or, for the first, none: an empty folder)."""
    fsys, path = marker_path(output)
    tmp = path + ".tmp"  # a leading underscore too: readers of the parts skip it
    try:
        with fsys.open_output_stream(tmp) as f:
            f.write(json.dumps({"kind": KIND, **record}, indent=2).encode() + b"\n")
        fsys.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the write's own error, not this one
            fsys.delete_file(tmp)
        raise


def carried(output: str) -> dict[str, Any]:
    """What the running marker says of the job, kept when the job's end is written."""
    marker = read_marker(output) or {}
    return {k: marker[k] for k in ("started", "resumed", "attempt", "job") if k in marker}


def finish_marker(output: str, rows: int, errors: int, seconds: float) -> None:
    write_marker(
        output,
        {
            **carried(output),
            "status": "finished",
            "finished": utc_now(),
            "rows": rows,
            "errors": errors,
            "seconds": round(seconds, 3),
        },
    )


def end_marker(output: str, error: BaseException) -> None:
    """The end of a job that did not finish: "stopped" with the signal (Ctrl-C, SIGTERM: the user's or
    a scheduler's choice, not a fault), else "failed" with the error. Best effort: the job is already
    ending; a marker that cannot be written stays "running"."""
    if isinstance(error, KeyboardInterrupt):
        end = {"status": "stopped", "signal": "SIGTERM" if isinstance(error, Terminated) else "SIGINT"}
    else:
        end = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}
    try:
        write_marker(output, {**carried(output), **end})
    except Exception:  # noqa: BLE001 - keep the job's own error, not this one
        pass


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
