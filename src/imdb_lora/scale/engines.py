"""The two engines of `imdb-lora score`, and what both share: the job, the output folder, the summary.

local  reads each input file in Arrow batches and scores them in this process (pyarrow only: Ray is
       never imported); one Parquet part per input file, in input order, and a record of each file
       once its part is closed, so that --resume continues a stopped job (scale/resume.py).
ray    the same reading and the same ScoreBatch on a Ray cluster: Ray Data reads the files in tasks,
       scores the batches in an actor pool (one loaded model per actor, reused for every batch it gets)
       and writes Parquet from the workers; `preserve_order` keeps the output files in input order.
Either way every output row names its source_file and source_row, and the output folder's marker
(scale/output.py) says "running" until the job has finished; a local output stays locked by this (the
driver) process until then.
"""

from __future__ import annotations

import copy
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from ..data.tokenize import recorded_stride
from ..errors import UserError, counted
from ..extras import require
from .batch import MAX_CHARS, ScoreBatch
from .output import check_output, end_marker, finish_marker, prepare_output
from .resume import (
    FLAGS,
    LEAST_DIGITS,
    Done,
    Resumed,
    has_record,
    job_record,
    part_stem,
    resume_output,
    write_record,
)
from .sources import (
    Source,
    check_columns,
    check_encoding,
    check_no_credentials,
    filesystem,
    list_sources,
    read_batches,
)


@dataclass
class ScoreJob:
    model: str
    inputs: list[str]
    output: str
    text_column: str = "text"
    rows_per_batch: int = 256  # rows handed to a worker at a time (Ray Data's batch_size)
    model_batch_size: int = 32  # reviews per forward pass at most (score's --batch-size, as in `predict`)
    max_batch_tokens: int | None = None  # padded tokens per forward pass (None: the device's default)
    keep_text: bool = False
    window_stride: int | None = None
    raw: bool = False  # ignore the run's calibration temperature, as predict --raw
    base_model: str | None = None  # a LoRA run's base, if it moved since training (--base-model)
    max_chars: int = MAX_CHARS  # a longer text is an error row, never cut
    encoding: str = "utf-8"  # of JSONL and CSV inputs (--encoding; from prepare on, the codec's own name)
    encoding_given: str = ""  # --encoding as typed (prepare): what the readers take, to name it in errors
    overwrite: bool = False
    resume: bool = False  # continue the stopped job of `output` (local engine only)
    engine: str = "local"
    sources: list[Source] = field(default_factory=list)
    lock: IO[str] | None = field(default=None, repr=False, compare=False)  # a local output's, from prepare
    started: bool = False  # the output is this job's (prepared): a stop leaves it unfinished
    resumed: Resumed = field(default_factory=lambda: Resumed({}, 1, 0.0))  # the files kept, this attempt
    done: int = 0  # input files whose parts and record are written (kept ones included)
    part_digits: int = LEAST_DIGITS  # of the input index in part and record names (prepare: the marker's)

    def settings(self) -> dict[str, Any]:
        """The settings that change the rows (scale/resume.py: --resume must find them unchanged)."""
        return {key: getattr(self, key) for key in FLAGS} | {
            "window_stride": recorded_stride(self.window_stride)
        }

    def read_args(self) -> dict[str, Any]:
        """read_batches' settings, alike for both engines (Ray's read stage, read_files, takes them too).
        --encoding goes as typed: the readers decode with its codec and name it as typed in errors."""
        return dict(
            rows=self.rows_per_batch,
            text_column=self.text_column,
            max_chars=self.max_chars,
            encoding=self.encoding_given or self.encoding,
        )

    def scorer_args(self, device: str, threads: int | None = None) -> dict[str, Any]:
        return dict(
            model=self.model,
            text_column=self.text_column,
            batch_size=self.model_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            device=device,
            keep_text=self.keep_text,
            window_stride=self.window_stride,
            threads=threads,
            raw=self.raw,
            base_model=self.base_model,
            max_chars=self.max_chars,
        )


@dataclass
class Summary:
    rows: int
    errors: int
    seconds: float
    examples: list[str]  # a few of the errors, with where they came from
    kept: tuple[int, int] | None = None  # --resume: (input files kept from before, input files)

    def text(self, output: str) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"scored {counted(self.rows, 'row')} in {self.seconds:.1f} s ({rate:,.1f} rows/s); "
            f"{counted(self.errors, 'row')} with an error; output: {output}"
        ]
        if self.kept is not None:
            lines[0] += (
                f" (resumed: {self.kept[0]:,} of {counted(self.kept[1], 'input file')} kept from before)"
            )
        return "\n".join(lines + [f"  {e}" for e in self.examples])


def prepare(job: ScoreJob, ready: Callable[[], object] | None = None) -> None:
    """Check everything that can be checked before any work: model, inputs, their columns, output.

    `ready`: what must work before the output is prepared and takes time (start_ray: Ray started, the
    cluster's resources checked); run after every other check, the output's refusals included, and
    before the output is touched, so that what it refuses leaves no marker a rerun must --overwrite."""
    from ..inference.classifier import check_window_stride_of

    # first: every later message may name these URIs
    for flag, uri in [("MODEL", job.model), *(("--input", i) for i in job.inputs), ("--output", job.output)]:
        check_no_credentials(flag, uri)
    check_model(job.model, job.base_model)
    check_window_stride_of(job.model, job.window_stride)  # a bad one would make every row an error
    # the codec's name to compare (latin-1 and iso-8859-1 are one job); as typed to name it in messages
    job.encoding_given, job.encoding = job.encoding, check_encoding(job.encoding)
    job.sources = list_sources(job.inputs)
    check_columns(job.sources, job.text_column, job.max_chars, job.encoding_given)
    record = job_record(
        job.settings(), model_identity(job.model), job.sources, {"encoding": job.encoding_given}
    )
    # last: nothing else can refuse now
    if job.resume:
        job.lock, job.resumed = resume_output(job.output, record, job.inputs)
        job.done = len(job.resumed.kept)
        job.part_digits = job.resumed.digits
    else:
        if ready is not None:
            check_output(job.output, job.inputs, job.overwrite)
            ready()
        job.lock = prepare_output(job.output, job.inputs, job.overwrite, record)
        job.part_digits = record["part_digits"]
    job.started = True


def model_identity(path: str) -> dict[str, str]:
    """Where the model is, and a digest of what says which model it is: a run's run.json (its times,
    figures and settings; a retrained run differs) and calibration.json (the temperature), an export's
    marker (the sha256 of every file in it). Cheap: small files, never the weights."""
    import hashlib
    from pathlib import Path

    from ..inference.exported import MARKER as EXPORT_MARKER
    from ..inference.exported import is_export

    folder = Path(path).expanduser().resolve()
    names = [EXPORT_MARKER] if is_export(folder) else ["run.json", "calibration.json"]
    digest = hashlib.sha256()
    for name in names:
        file = folder / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"-") + b"\0")
    return {"path": str(folder), "sha256": digest.hexdigest()}


def check_model(path: str, base_model: str | None = None) -> None:
    """A finished run directory or an export folder, and a LoRA run's base model (cheap checks, before
    the output is touched; workers load the model)."""
    from pathlib import Path

    from ..config import Config
    from ..inference.classifier import adapter_base, base_model_of_a_full_run, base_model_of_an_export
    from ..inference.exported import is_export, missing_folder, read_marker
    from ..modeling.load import check_model_source
    from ..runs.rundir import RunDir

    if "://" in path:  # read as a local path it was "no such run directory", as if it were mistyped
        raise UserError(
            f"MODEL {path}: the model is read from a local folder (a run directory or an export), not a "
            "URI; copy it to a path that every worker reads (a shared filesystem, or the image) and give that"
        )
    if is_export(path):
        read_marker(Path(path).expanduser())
        if base_model is not None:
            raise base_model_of_an_export(path)
    elif not Path(path).expanduser().is_dir():
        raise UserError(missing_folder(path))
    else:
        run = RunDir(path)
        info = run.require_finished()
        if info.get("method", "lora") != "lora":
            if base_model is not None:
                raise base_model_of_a_full_run(run.path)
            return
        base = adapter_base(run, Config.load_saved(run.config_path), base_model)
        check_model_source(base, False, "--base-model" if base_model is not None else None)


def is_onnx(path: str) -> bool:
    from pathlib import Path

    from ..inference.exported import is_export, read_marker

    return is_export(path) and read_marker(Path(path).expanduser())["format"] == "onnx"


@contextmanager
def recorded(job: ScoreJob) -> Iterator[None]:
    """The job's end in its output's marker if anything escapes: "stopped" (a signal) or "failed" (an
    error); then the output's lock is let go (after the marker, so a job that finds the output unlocked
    reads its end)."""
    try:
        yield
    except BaseException as e:
        end_marker(job.output, e)
        raise
    finally:
        if job.lock is not None:
            job.lock.close()  # closing releases the flock
            job.lock = None


def finished(job: ScoreJob, summary: Summary) -> Summary:
    finish_marker(job.output, summary.rows, summary.errors, summary.seconds)
    return summary


# ---------------------------------------------------------------- local


def run_local(job: ScoreJob, device: str = "auto", progress: bool = True) -> Summary:
    from tqdm.auto import tqdm

    start = time.time()
    with recorded(job):
        todo = [(i, s) for i, s in enumerate(job.sources) if i not in job.resumed.kept]
        scorer = ScoreBatch(**job.scorer_args(device)) if todo else None  # nothing left: no model to load
        # closed on an error too, before its one line: else the bar is drawn again below it, at exit
        with tqdm(
            total=known_rows([s for _, s in todo]), unit="row", desc="score", disable=not progress,
            dynamic_ncols=True,
        ) as bar:  # fmt: skip
            parts = [name for d in job.resumed.kept.values() for name in d.parts]
            for i, src in todo:
                done = score_file(job, scorer, i, src, bar.update, start)
                record_file(job, done)
                parts += done.parts
        # The job's parts alone: a resumed output may hold what its user put there since (a note, a folder)
        summary = summarize(job.output, job.resumed.earlier_seconds + time.time() - start, parts=parts)
        if job.resume:
            summary.kept = (len(job.resumed.kept), len(job.sources))
        return finished(job, summary)


def record_file(job: ScoreJob, done: Done) -> None:
    """Write a finished file's record and count it in `job.done`, which a stop line names: counted first,
    so that a stop just after the record is written (Ctrl-C, or a failure closing its stream) does not
    say one file fewer than the records hold; uncounted again if the stop left no record."""
    job.done += 1
    try:
        write_record(job.output, done, job.part_digits)
    except BaseException:
        if not has_record(job.output, done.index, job.part_digits):
            job.done -= 1
        raise


def score_file(job: ScoreJob, scorer: ScoreBatch, index: int, src: Source, update, start: float) -> Done:
    """Input file `index` scored into its parts, all closed; the record that says so (not yet written)."""
    import pyarrow.parquet as pq

    fsys, out = filesystem(job.output)
    parts = PartWriter(fsys, f"{out}/{part_stem(index, job.part_digits)}", pq)
    rows = errors = 0
    for table in read_batches(src.uri, src.format, **job.read_args()):
        scored = scorer(table)
        parts.write(scored)
        rows, errors = rows + scored.num_rows, errors + scored.num_rows - scored["error"].null_count
        update(table.num_rows)
    parts.close()
    return Done(
        index, src.uri, parts.written, rows, errors, job.resumed.attempt, round(time.time() - start, 3)
    )


class PartWriter:
    """Parquet parts of one input file; a batch whose columns differ (sparse JSONL keys) starts a new part."""

    def __init__(self, fsys, stem: str, pq):
        self.fsys, self.stem, self.pq = fsys, stem, pq
        self.writer = self.stream = None
        self.count = 0
        self.name = ""
        self.written: dict[str, int] = {}  # closed parts: file name -> size in bytes

    def write(self, table) -> None:
        if self.writer is not None and table.schema != self.writer.schema:
            try:
                table = table.cast(self.writer.schema)  # e.g. a column that was all null so far
            except Exception:  # noqa: BLE001 - another shape of row: its own part
                self.close()
        if self.writer is None:
            path = f"{self.stem}{later_part(self.count)}.parquet"
            self.name = path.rsplit("/", 1)[-1]
            self.stream = self.fsys.open_output_stream(path)
            self.writer = self.pq.ParquetWriter(self.stream, table.schema)
            self.count += 1
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # the footer: the part is whole once the stream is closed too
            size = self.stream.tell()
            self.stream.close()
            self.written[self.name] = size
            self.writer = self.stream = None


def later_part(count: int) -> str:
    """The suffix of an input file's part after its first: `_00001`... Readers take a folder's parts in
    file-name order, and `part-00000_00001.parquet` sorts after `part-00000.parquet` ('_' after '.') and
    before `part-00001.parquet`; the `-1` this replaced sorted before its file's first part ('-' before
    '.'), so pyarrow and pandas read an input's later rows first."""
    return "" if count == 0 else f"_{count:05d}"


def known_rows(sources: list[Source]) -> int | None:
    """Rows in all inputs if cheap to know (Parquet metadata only), else None (the bar counts up)."""
    import pyarrow.parquet as pq

    if any(s.format != "parquet" for s in sources):
        return None
    total = 0
    for s in sources:
        fsys, path = filesystem(s.uri)
        with fsys.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


# ---------------------------------------------------------------- ray


def run_ray(
    job: ScoreJob,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> Summary:
    with recorded(job):
        return finished(job, _run_ray(job, address, workers, cpus_per_worker, gpus_per_worker))


def start_ray(job: ScoreJob, address: str | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Ray connected (started if it is not), and the actors the cluster holds (pool_size), or one line
    for what cannot work. Given to prepare() as `ready`, before the output is touched: a refusal here
    used to come after the output's "running" marker, leaving a "failed" one that a rerun with a sane
    value could not reuse without --overwrite. Again in _run_ray, where it is quick (Ray is up)."""
    require("scale", "score --engine ray", ("ray.data",))
    import ray

    if gpus_per_worker and is_onnx(job.model):
        raise UserError(
            "--num-gpus-per-worker: ONNX exports run on CPUs; score a run or a merged export on GPUs"
        )
    if not ray.is_initialized():
        with sigterm_handler_kept():
            try:
                # address None: RAY_ADDRESS, else a local cluster
                ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver())
            except ConnectionError as e:  # "auto" with no cluster running, or a cluster that went away
                flag = "--ray-address" if address else "$RAY_ADDRESS"
                raise UserError(f"{flag}: cannot connect to a Ray cluster ({e})") from None
    return pool_size(ray.cluster_resources(), cpus_per_worker, gpus_per_worker)  # also with --workers


def log_to_driver() -> bool | None:
    """ray.init's log_to_driver: False, so the workers' stdout and stderr stay in Ray's session logs
    (/tmp/ray/session_latest/logs/worker-*) instead of the console. A worker that cannot load the model
    printed its traceback there ~6 times over (each actor, each retry, Ray's "(raylet) ... will be
    retried" lines on stdout: 370 lines for one failure) before score's own line; the failure still
    reaches the driver as an exception, which score says in one line. RAY_LOG_TO_DRIVER=1 in the
    environment brings them back: then None, and Ray reads that variable itself."""
    import os

    return None if "RAY_LOG_TO_DRIVER" in os.environ else False


# Ray engine: bytes per Ray Data block (~750 IMDB reviews with their columns), rows per Parquet part at least
BLOCK_BYTES, ROWS_PER_PART = 1 << 20, 100_000


def _run_ray(
    job: ScoreJob, address: str | None, workers: int | None, cpus_per_worker: float, gpus_per_worker: float
) -> Summary:
    fit = start_ray(job, address, cpus_per_worker, gpus_per_worker)
    import ray
    import ray.data

    start = time.time()
    console_without_tracebacks(logging.getLogger("ray.data"))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output files in input order
    # A block is what one actor scores, and Ray Data cuts a stage's output into blocks by bytes (128 MiB
    # by default): an input file under that was one block, scored by one actor while the others waited
    # (2,000 IMDB reviews in one 2.6 MB file, 2 actors on 2 CPUs: 41.2 s, one actor idle; now 24.1 s).
    ctx.target_max_block_size = BLOCK_BYTES
    size = workers or fit
    ds = ray.data.from_items([{"uri": s.uri, "format": s.format} for s in job.sources])
    # Reading and writing are light next to the model: they take no CPU slot from the actors.
    ds = ds.map_batches(
        read_files,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=job.read_args(),
        num_cpus=0,
    )
    ds = ds.map_batches(
        ScoreBatch,
        batch_size=job.rows_per_batch,
        batch_format="pyarrow",
        fn_constructor_kwargs=job.scorer_args(
            "cuda" if gpus_per_worker else "cpu", threads=max(1, int(cpus_per_worker))
        ),
        # one block at a time per actor: Ray queued blocks on the first actor up while the next still started
        # `concurrency=` is deprecated since Ray 2.51
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
    )
    try:
        # Ray's default mode (append) adds its uuid-named parts beside the marker and deletes nothing.
        # min_rows_per_file: small blocks, yet not a part per block (a million reviews: ~1,300 parts)
        ds.write_parquet(job.output, min_rows_per_file=ROWS_PER_PART, ray_remote_args={"num_cpus": 0})
    except Exception as e:
        raise user_error_inside(e) or schema_clash_inside(e) or e from None
    return summarize(job.output, time.time() - start)


@contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """The process's SIGTERM handler as it was before the block. ray.init replaces it with its own,
    sys.exit(15): a Ray job sent SIGTERM then ended with exit status 15, no line, and its output's
    marker "failed" (SystemExit: 15) instead of the CLI's "stopped by SIGTERM" (143) and "stopped". The
    CLI's handler raises Terminated where the job is; Ray still shuts down at exit (atexit)."""
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    kept = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if kept is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, kept)


def console_without_tracebacks(logger: logging.Logger) -> None:
    """A failed Ray Data task logs its whole traceback on the console (~200 lines) before the exception
    reaches score, which then ends in one line (user_error_inside, schema_clash_inside): the console
    keeps Ray's log line ("An exception was raised from a task of operator ..."), Ray's session log
    file (its other handler) the traceback and Ray Data's report of it (WithoutTraceback)."""
    for handler in logger.handlers:
        on_console = getattr(handler, "stream", None) in (sys.stderr, sys.stdout)
        if on_console and not any(isinstance(f, WithoutTraceback) for f in handler.filters):
            handler.addFilter(WithoutTraceback(handler))


# Ray Data's logger of the failure it re-raises to the driver: "Exception occurred in Ray Data or Ray Core
# internal code ... please open an issue", then "Full stack trace:" and the traceback (ray/data/exceptions.py)
RAY_DATA_REPORT = "ray.data.exceptions"


class WithoutTraceback(logging.Filter):
    """Passes a record on to its handler without the traceback, leaving the record itself untouched
    (the other handlers get it whole). On this handler (the console) it drops:
    - a record that only introduced its traceback (Ray Data's "Full stack trace:"), bare without it;
    - Ray Data's report of a failure that score ends in one line of its own (an input it cannot read, files
      that disagree on a column's type): its advice to open an issue with Ray is wrong for those.
    """

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == RAY_DATA_REPORT and said_in_one_line(handled(record)):
            return False
        if not (record.exc_info or record.exc_text):
            return True
        if record.getMessage().rstrip().endswith(":"):  # the traceback's header, nothing more
            return False
        plain = copy.copy(record)
        plain.exc_info, plain.exc_text = None, None
        self.handler.handle(plain)  # passes this filter, then the handler writes it
        return False


def handled(record: logging.LogRecord) -> BaseException | None:
    """The exception a record is about: its own, else the one being handled where it was logged (Ray
    Data logs its report inside the `except` that re-raises the failure, in this thread)."""
    if record.exc_info and record.exc_info[1] is not None:
        return record.exc_info[1]
    return sys.exc_info()[1]


def said_in_one_line(e: BaseException | None) -> bool:
    """score ends with its own one line for `e` (see _run_ray)."""
    return e is not None and (user_error_inside(e) or schema_clash_inside(e)) is not None


RAY_PORT_WAIT = 5.0  # seconds: a Ray head answers at once; a wrong address would keep ray.init for minutes


def check_ray_address(address: str | None) -> None:
    """An explicit `host:port` (or `ray://host:port`) address must accept a connection, checked before any
    work: ray.init retries an unreachable one for minutes, then fails with a traceback. "auto", a local
    cluster (None and no $RAY_ADDRESS) and anything else are left to Ray."""
    import os
    import re
    import socket

    flag, value = ("--ray-address", address) if address else ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d{1,5})/?", (value or "").strip())
    if not m:
        return
    host, port = m[1], int(m[2])
    try:
        socket.create_connection((host, port), timeout=RAY_PORT_WAIT).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise UserError(f"{flag} {value}: no Ray cluster reachable at {host}:{port} ({reason})") from None


def read_files(batch, rows: int, text_column: str, max_chars: int = MAX_CHARS, encoding: str = "utf-8"):
    """Ray Data stage: a batch of file names in, their rows out (streamed, `rows` at a time)."""
    for uri, fmt in zip(batch["uri"].to_pylist(), batch["format"].to_pylist()):
        yield from read_batches(uri, fmt, rows, text_column, max_chars, encoding)


def pool_size(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """As many actors as the cluster holds: by GPUs when workers take GPUs, else by CPUs. A worker the
    cluster cannot hold at all is refused: Ray would wait for it for ever, logging only its autoscaler's
    "No available node types can fulfill resource request" every half minute."""
    if resources.get("CPU", 0) < cpus:
        raise UserError(
            f"--cpus-per-worker {cpus:g}: the Ray cluster has {counted(resources.get('CPU', 0), 'CPU')}"
        )
    if gpus:
        fit = resources.get("GPU", 0) // gpus
        if fit < 1:
            raise UserError(
                f"--num-gpus-per-worker {gpus}: the Ray cluster has {counted(resources.get('GPU', 0), 'GPU')}"
            )
        return int(fit)
    return int(resources["CPU"] // cpus)


def _chain(e: BaseException | None):
    """An exception and the ones it wraps (Ray keeps a worker's error as `cause`), each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__


# What Ray Data appends to a task's error once its retries are spent (ray/data/_internal/util.py):
# "\nFailed to apply UDF transform after 1/1 attempts (...).\nTo change retry attempts, ..."
RAY_RETRY_NOTE = "\nFailed to "


def user_error_inside(e: BaseException) -> UserError | None:
    """The UserError a Ray worker raised, to report in one line: the innermost one, the worker's own.
    Ray re-raises it as a RayTaskError that is also a UserError (its cause's class) but whose text is
    the worker's whole traceback; the error itself is that exception's `cause`, with Ray Data's note on
    retries appended to its message, which is cut."""
    raised = [x for x in _chain(e) if isinstance(x, UserError)]
    if raised:
        return UserError(str(raised[-1]).split(RAY_RETRY_NOTE, 1)[0])
    # An actor whose constructor raised (ScoreBatch: a model the workers cannot load) reaches the driver
    # as an ActorDiedError that keeps only the text of the worker's traceback, not the error: the job
    # ended in Ray's traceback (exit status 1). The traceback's last line names the UserError.
    for x in _chain(e):
        said = str(x).rsplit(f"\n{USER_ERROR}: ", 1)
        if len(said) == 2:
            return UserError(said[1].split("\n", 1)[0])
    return None


USER_ERROR = f"{UserError.__module__}.{UserError.__qualname__}"  # as a traceback's last line names it


def schema_clash_inside(e: BaseException) -> UserError | None:
    """Arrow's "Field X has incompatible types" from inside Ray: input files that disagree on a type."""
    import re

    for x in _chain(e):
        m = re.search(r"Field (\S+) has incompatible types: (\S+) vs (\S+)", str(x))
        if m:
            return UserError(
                f"--input: the files disagree on the type of column {m[1]!r} ({m[2]} vs {m[3]}); "
                "give that column one type in every file (CSV columns are read as text)"
            )
    return None


# ---------------------------------------------------------------- summary


def summarize(output: str, seconds: float, examples: int = 3, parts: list[str] | None = None) -> Summary:
    """Rows and errors as written (read back from the output's `error` column): of the part files named
    in `parts` (in name order, which is input order), else of every Parquet file in the output (Ray's)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fsys, path = filesystem(output)
    where = path if parts is None else [f"{path.rstrip('/')}/{name}" for name in sorted(parts)]
    data = pds.dataset(where, filesystem=fsys, format="parquet")
    if not data.files:  # inputs without a single row
        return Summary(0, 0, seconds, [])
    # Counted and picked by the dataset's scanner, a batch at a time: reading the three columns whole
    # held every row's source_file (tens of MB for a million rows) to count a few errors.
    failed = pc.is_valid(pc.field("error"))
    columns = ["source_file", "source_row", "error"]
    shown = [
        f"{r['source_file']} source_row {r['source_row']} (0-based): {r['error']}"
        for r in data.head(examples, columns=columns, filter=failed).to_pylist()
    ]
    return Summary(data.count_rows(), data.count_rows(filter=failed), seconds, shown)
