"""`imdb-lora score --resume`: a stopped local-engine job continues where it stood, input file by file.

How a finished input file is known. The local engine writes input file i as `part-{i:0Nd}.parquet`
(and `part-{i:0Nd}_{k:05d}.parquet` when its rows change shape), N = part_digits(the job's inputs), at
least 5, recorded in the marker as "part_digits" (jobs before it recorded none and used 5). Once that
file's last part is closed, it writes a record, `_imdb_lora_score.done-{i:0Nd}.json`: the input file,
its parts with their sizes, its rows and errors. The record is the only proof of a finished file: a
part without one (a job stopped while writing it, or between closing it and writing the record) is
deleted and its input scored again, and a part whose size differs from its record's (truncated or
replaced since) costs its whole file the same. A half-written record is not JSON and counts as none.

Why records, not parts written under a temporary name and renamed when closed: the output goes
through pyarrow filesystems, and on object stores (S3, GCS) a rename is a copy of the whole part and a
delete, doubling the bytes written; worse, an unclosed S3 output stream completes its upload when it is
garbage-collected, so a part's mere existence proves nothing there. A record is a few hundred bytes,
written whole after the part is closed (a single small object on a store); nothing is ever renamed.
One record per file, not a list in the marker: rewriting a growing marker after each of 100,000
input files would write gigabytes.

What must match. The marker of every job records the settings that change the rows (the model's
identity, the input files with their sizes and modification times, --text-column, --keep-text,
--window-stride, --raw, --max-chars, --encoding, the engine); --resume compares them with its own
and refuses in one line naming each that differs. Batch sizes, --device and --base-model (where the
base is, not what it is: the run's adapter is in the model's identity) may change.

Ray. Ray Data writes its parts from the workers, named by its own uuid and block numbers, and one
input file's rows can end up in several parts written by different workers at different times, so
nothing says which input files a stopped Ray job finished: `--resume --engine ray` is refused, and an
output written by the Ray engine is replaced with --overwrite.

Timing. Each record holds its job's attempt number and how long that attempt had run when the file
was done; a resumed job's seconds are the longest of each earlier attempt's kept records plus its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import IO, Any

from ..data.tokenize import recorded_stride
from ..errors import UserError, counted
from .output import (
    LOCK,
    MARKER,
    check_placement,
    lock_output,
    output_file,
    read_marker,
    utc_now,
    write_marker,
)
from .sources import filesystem

RECORD = "_imdb_lora_score.done-"  # + {i:0Nd}.json; a leading underscore: readers of the parts skip it
RECORD_BYTES = 1024 * 1024  # a record names a file and its parts: a few hundred bytes
# The index has part_digits digits (5 or more; its job's); `-k`: an input file's later parts as imdb-lora
# named them before `_kkkkk` (engines.later_part), which a stopped output of that version may hold: kept
# if recorded, else deleted as any other stale part.
PART = re.compile(r"part-(\d+)(?:_\d{5,}|-\d+)?\.parquet")
# The job settings that change the rows (ScoreJob fields) and the flags that set them, in the order
# messages name them.
FLAGS = {
    "engine": "--engine",
    "text_column": "--text-column",
    "keep_text": "--keep-text",
    "window_stride": "--window-stride",
    "raw": "--raw",
    "max_chars": "--max-chars",
    "encoding": "--encoding",
}


LEGACY_DIGITS = 5  # of the input index in the names of every job whose marker records no part_digits
LEAST_DIGITS = LEGACY_DIGITS  # of the input index in part and record names, however few the inputs


def part_digits(inputs: int) -> int:
    """Digits of the input index in a job's part and record names: as many as its last index needs, at
    least LEAST_DIGITS. Readers take parts in file-name order, which must be input order: with a fixed
    5, `part-100000.parquet` sorted before `part-10001.parquet`."""
    return max(LEAST_DIGITS, len(str(max(inputs - 1, 0))))


def part_stem(index: int, digits: int = LEGACY_DIGITS) -> str:
    """The name of input file `index`'s first part, without `.parquet` (later ones add _00001...)."""
    return f"part-{index:0{digits}d}"


def record_name(index: int, digits: int = LEGACY_DIGITS) -> str:
    return f"{RECORD}{index:0{digits}d}.json"


@dataclass
class Done:
    """The record of one finished input file, written once its parts are closed."""

    index: int  # its place among the job's input files
    input: str  # its URI (the output's source_file)
    parts: dict[str, int]  # part file name -> size in bytes
    rows: int
    errors: int
    attempt: int  # 1 for the job that started the output, +1 for each --resume
    seconds: float  # how long that attempt had run when this file was done


def write_record(output: str, done: Done, digits: int = LEGACY_DIGITS) -> None:
    """Written whole, after the file's parts are closed: its existence says they are complete."""
    fsys, path = output_file(output, record_name(done.index, digits))
    with fsys.open_output_stream(path) as f:
        f.write(json.dumps(asdict(done)).encode() + b"\n")


def has_record(output: str, index: int, digits: int) -> bool:
    """Whether input file `index` has a whole record in the output (asked after a stop, not per file)."""
    return read_record(*output_file(output, record_name(index, digits))) is not None


def read_record(fsys, path: str) -> Done | None:
    """A record, or None if it is not one (half-written, edited, not ours)."""
    try:
        with fsys.open_input_stream(path) as f:
            done = Done(**json.loads(f.read(RECORD_BYTES)))
    except Exception:  # noqa: BLE001 - missing, truncated, not JSON, other keys: no record
        return None
    types = {"index": int, "input": str, "parts": dict, "rows": int, "errors": int, "attempt": int}
    if not all(isinstance(getattr(done, k), t) for k, t in types.items()):
        return None
    if not isinstance(done.seconds, int | float):
        return None
    return done


# ---------------------------------------------------------------- what a job records, what must match


def job_record(
    settings: dict[str, Any], model: dict[str, str], sources: list, given: dict[str, str] | None = None
) -> dict[str, Any]:
    """The marker's "job": what --resume must find unchanged, and under "given" the settings as the
    user typed them where that differs from what is compared (--encoding latin-1 is codec iso8859-1),
    for messages only."""
    return {
        **settings,
        "model": model,
        "inputs": [[s.uri, s.size, s.mtime_ns] for s in sources],
        "given": given or {},
        "part_digits": part_digits(len(sources)),
    }


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the stopped job's record and this one's, as the user would name it."""
    # a marker written before 090718f holds null for one truncated window: the same job as 0
    saved, now = ({**job, "window_stride": recorded_stride(job.get("window_stride"))} for job in (saved, now))
    found = [
        change(flag, as_given(saved, key), as_given(now, key))
        for key, flag in FLAGS.items()
        if saved.get(key) != now.get(key)
    ]
    was, model = saved.get("model") or {}, now["model"]
    if was.get("sha256") != model["sha256"]:
        found.append(
            f"the model ({model['path']} changed since the stopped job scored with it)"
            if was.get("path") == model["path"]
            else f"the model ({model['path']} is not the {was.get('path')} the stopped job scored with)"
        )
    found += input_differences(saved.get("inputs") or [], now["inputs"])
    return found


def as_given(job: dict[str, Any], key: str) -> Any:
    """A setting as its job's user typed it, if recorded (markers before "given": as compared)."""
    given = job.get("given")
    return given[key] if isinstance(given, dict) and key in given else job.get(key)


def input_differences(saved: list, now: list) -> list[str]:
    """The first input file that differs (a list of 100,000 would make no line), and how."""
    if len(saved) != len(now):
        return [f"--input: {counted(len(now), 'file')} (the stopped job: {len(saved):,})"]
    for (uri, size, mtime), (was_uri, was_size, was_mtime) in zip(now, saved):
        if uri != was_uri:
            return [f"--input: {uri} where the stopped job read {was_uri}"]
        if (size, mtime) != (was_size, was_mtime):
            return [f"--input: {uri} changed since the stopped job read it (size or modification time)"]
    return []


def change(flag: str, was: Any, now: Any) -> str:
    """`--max-chars 50 (the stopped job: 100000)`; a switch: `--raw (the stopped job: without it)`."""
    if isinstance(now, bool) or isinstance(was, bool):
        return f"{flag} (the stopped job: without it)" if now else f"no {flag} (the stopped job: {flag})"
    show = lambda v: "not given" if v is None else str(v)  # noqa: E731
    return f"{flag} {show(now)} (the stopped job: {show(was)})"


# ---------------------------------------------------------------- resuming an output


@dataclass
class Resumed:
    """What a resumed job starts from."""

    kept: dict[int, Done]  # input index -> its record, for the files not scored again
    attempt: int  # this job's attempt number
    earlier_seconds: float  # the time the kept files took in earlier attempts
    digits: int = LEGACY_DIGITS  # of the index in part and record names: the stopped job's (part_digits)


def resume_output(output: str, job: dict[str, Any], inputs: list[str]) -> tuple[IO[str] | None, Resumed]:
    """Take over an unfinished output for --resume: its lock, a check that it may be continued with
    these settings, the stale parts gone, and a "running" marker. Returns the lock (None for a remote
    output) and what to keep. Refusals are one line; nothing is touched before they are passed."""
    from pyarrow import fs

    from ..runs.filelock import write_pid

    check_placement(output, inputs)
    fsys, path = filesystem(output)
    local = fsys.type_name == "local"
    kind = fsys.get_file_info(path).type
    if kind != fs.FileType.Directory:
        what = "does not exist" if kind == fs.FileType.NotFound else "is not a folder"
        raise UserError(f"--resume: --output {output} {what}; nothing to resume")
    lock = lock_output(output, path, create=False) if local else None  # a live job's: refused here
    try:
        marker = resumable_marker(output, job)
        if local and lock is None:  # a score output without a lock file (copied, or remote before)
            lock = lock_output(output, path, create=True)
        if lock is not None:
            write_pid(lock)
        # the stopped job's names, even where this version would pick others (a marker without part_digits)
        digits = stopped_digits(marker["job"])
        resumed = keep_finished(fsys, path, job["inputs"], digits)
        resumed.attempt = int(marker.get("attempt") or 1) + 1
        write_marker(
            output,
            {
                "status": "running",
                "started": marker.get("started"),
                "resumed": utc_now(),
                "attempt": resumed.attempt,
                "job": {**job, "part_digits": digits},
            },
        )
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock, resumed


def resumable_marker(output: str, job: dict[str, Any]) -> dict[str, Any]:
    """The stopped job's marker, if --resume may continue it with `job`'s settings; else one line."""
    marker = read_marker(output)
    if marker is None:
        raise UserError(f"--resume: --output {output} is not an imdb-lora score output (no {MARKER})")
    if marker.get("status") == "finished":
        raise UserError(f"--resume: --output {output} is already finished; nothing to resume")
    saved = marker.get("job")
    if not isinstance(saved, dict):
        raise UserError(
            f"--resume: --output {output} was written by an earlier imdb-lora that recorded no settings; "
            "replace it with --overwrite"
        )
    if saved.get("engine") != "local":
        raise UserError(
            f"--resume: --output {output} was written by --engine {saved.get('engine')}, whose stopped "
            "jobs cannot be continued (nothing says which input files it finished); replace it with --overwrite"
        )
    differ = differences(saved, job)
    if differ:
        raise UserError(
            f"--resume: --output {output} was scored with other settings: {'; '.join(differ)}; resume "
            "with the stopped job's, or replace the output with --overwrite"
        )
    return marker


def stopped_digits(saved: dict[str, Any]) -> int:
    """The digits of the stopped job's part and record names: recorded, or LEGACY_DIGITS before they were."""
    digits = saved.get("part_digits", LEGACY_DIGITS)
    return digits if isinstance(digits, int) and 1 <= digits <= 20 else LEGACY_DIGITS


def keep_finished(fsys, path: str, inputs: list, digits: int = LEGACY_DIGITS) -> Resumed:
    """The finished files' records; every other part and record deleted (half-written, unrecorded)."""
    from pyarrow import fs

    listing = {i.base_name: i for i in fsys.get_file_info(fs.FileSelector(path))}
    kept: dict[int, Done] = {}
    for name in sorted(n for n in listing if n.startswith(RECORD)):
        done = read_record(fsys, f"{path}/{name}")
        if done is not None and intact(done, listing, inputs) and name == record_name(done.index, digits):
            kept[done.index] = done
    ours = {name for d in kept.values() for name in d.parts} | {record_name(i, digits) for i in kept}
    for name, info in listing.items():
        stale = PART.fullmatch(name) or name.startswith(RECORD) or name == MARKER + ".tmp"
        if stale and name not in ours and name != LOCK and info.type == fs.FileType.File:
            fsys.delete_file(f"{path}/{name}")
    return Resumed(kept, 0, earlier_seconds(kept.values()), digits)


def intact(done: Done, listing: dict, inputs: list) -> bool:
    """A record of this job's input `done.index` whose parts are all there, at their recorded sizes."""
    if not 0 <= done.index < len(inputs) or inputs[done.index][0] != done.input:
        return False
    return all(
        PART.fullmatch(name) and int(PART.fullmatch(name)[1]) == done.index
        and name in listing and listing[name].size == size
        for name, size in done.parts.items()
    )  # fmt: skip


def earlier_seconds(records) -> float:
    """Each earlier attempt's time up to its last kept file, summed."""
    longest: dict[int, float] = {}
    for d in records:
        longest[d.attempt] = max(longest.get(d.attempt, 0.0), float(d.seconds))
    return sum(longest.values())
