"""`imdb-lora score`: bulk scoring of JSONL/CSV/Parquet files into Parquet, locally or on Ray."""

from __future__ import annotations

import argparse
import shlex

from ..errors import UserError, cannot_write, counted, make_room, write_failure
from ..extras import require
from ..scale.batch import MAX_CHARS
from .common import (
    Renamed,
    add_base_model_flag,
    add_batch_size_flag,
    add_device_flag,
    add_max_batch_tokens_flag,
    add_raw_flag,
    add_window_flag,
    non_negative_float,
    nonempty_path,
    path_arg,
    positive_int,
)


def add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score review files (JSONL, CSV, Parquet; folders; cloud URIs) into Parquet, locally or on Ray",
    )
    p.add_argument(
        "model", type=path_arg, help="finished run directory or export folder (int8 ONNX suits CPU workers)"
    )
    p.add_argument(
        "--input", nargs="+", action="extend", required=True, type=nonempty_path, metavar="PATH",
        help="files or folders of .jsonl/.csv/.tsv/.parquet (local paths or URIs such as s3://...)",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, type=path_arg, metavar="DIR", help="folder for the Parquet output"
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where the model runs: local (this process) or ray (Ray Data actors; see below) [default: local]",
    )
    p.add_argument("--text-column", default="text", help="column holding the review [default: text]")
    p.add_argument("--keep-text", action="store_true", help="copy the text column to the output too")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier score output (only a folder holding score's _imdb_lora_score.json marker)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="continue a stopped job's output (local engine): input files it finished are kept, the rest scored",
    )  # fmt: skip
    p.add_argument(
        "--max-chars", type=positive_int, default=MAX_CHARS, metavar="N",
        help=f"a longer text becomes a row with an error, never cut [default: {MAX_CHARS:,}]",
    )  # fmt: skip
    p.add_argument(
        "--encoding", default="utf-8", metavar="NAME",
        help="of JSONL and CSV inputs, e.g. cp1252 or latin-1 (Parquet is always UTF-8 and ignores it); "
        "a row that is not in it becomes a row with an error [default: utf-8]",
    )  # fmt: skip
    p.add_argument(
        "--rows-per-batch", type=positive_int, default=ROWS_PER_BATCH, metavar="N",
        help=f"rows read and handed to a worker at a time (Ray Data's batch_size) [default: {ROWS_PER_BATCH}]",
    )  # fmt: skip
    # Renamed so that --batch-size means one thing in every command: said in one line, not "unrecognized".
    p.add_argument("--model-batch-size", action=Renamed, new="--batch-size", help=argparse.SUPPRESS)
    add_batch_size_flag(p, BATCH_SIZE, token_capped=True)
    add_device_flag(p, None, scope="local engine: ")
    g = p.add_argument_group("ray engine")
    g.add_argument("--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto) [default: "
                   "$RAY_ADDRESS, else a local Ray started for this command]")  # fmt: skip
    g.add_argument("--workers", type=positive_int, help="actors (loaded models) [default: as many as fit]")
    g.add_argument("--cpus-per-worker", type=non_negative_float, help="CPUs each actor reserves [default: 1]")
    g.add_argument(
        "--num-gpus-per-worker", type=non_negative_float, default=0.0,
        help="GPUs each actor reserves (a fraction shares one) [default: 0, CPU only]",
    )  # fmt: skip
    add_base_model_flag(p)
    add_window_flag(p)
    add_raw_flag(p)
    add_max_batch_tokens_flag(p)
    p.set_defaults(func=cmd_score)


RAY_ONLY = ("ray_address", "workers", "cpus_per_worker")
ROWS_PER_BATCH, BATCH_SIZE = 256, 32  # the defaults, which a resume command need not repeat


def cmd_score(ns: argparse.Namespace) -> int:
    local = ns.engine == "local"  # Ray besides pyarrow for --engine ray
    check_resume_flags(ns)
    require("scale", "score" if local else "score --engine ray", ("pyarrow",) if local else None)
    from ..scale.engines import ScoreJob, check_ray_address, prepare, run_local, run_ray, start_ray

    if ns.engine == "local":
        given = [f"--{k.replace('_', '-')}" for k in RAY_ONLY if getattr(ns, k) is not None]
        given += ["--num-gpus-per-worker"] if ns.num_gpus_per_worker else []
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{', '.join(given)} {verb} to --engine ray only")
    else:
        if ns.device is not None:  # Ray workers never read it: a GPU would be silently left unused
            raise UserError(
                "--device applies to --engine local only; Ray workers take GPUs with --num-gpus-per-worker"
            )
        if ns.cpus_per_worker is None:
            ns.cpus_per_worker = 1.0
        elif ns.cpus_per_worker <= 0:
            raise UserError("--cpus-per-worker must be > 0")
        check_ray_address(ns.ray_address)  # before the output is prepared: an unreachable one fails here
    job = ScoreJob(
        model=ns.model,
        inputs=ns.input,
        output=ns.output,
        text_column=ns.text_column,
        rows_per_batch=ns.rows_per_batch,
        model_batch_size=ns.batch_size,
        max_batch_tokens=ns.max_batch_tokens,
        keep_text=ns.keep_text,
        window_stride=ns.window_stride,
        raw=ns.raw,
        base_model=ns.base_model,
        max_chars=ns.max_chars,
        encoding=ns.encoding,
        overwrite=ns.overwrite,
        resume=ns.resume,
        engine=ns.engine,
    )
    try:
        # Ray is started and the cluster checked before the output is prepared: a refusal leaves none
        ray_up = (
            None
            if local
            else lambda: start_ray(job, ns.ray_address, ns.cpus_per_worker, ns.num_gpus_per_worker)
        )
        prepare(job, ready=ray_up)
        if ns.engine == "local":
            summary = run_local(job, device=ns.device or "auto")
        else:
            summary = run_ray(job, ns.ray_address, ns.workers, ns.cpus_per_worker, ns.num_gpus_per_worker)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the line says what the output holds, how on
        if not job.started:
            raise
        raise type(e)(f"{left_behind(job)}; {how_on(ns)}") from None
    except UserError as e:  # an input that fails part way (unreadable): fixed, the job can go on
        if not job.started or ns.engine != "local":
            raise
        raise UserError(f"{e}; {left_behind(job)}; once that is fixed, {how_on(ns)}") from None
    except Exception as e:
        failure = write_failure(e)
        if failure is None:
            raise
        if not job.started:  # even the first marker could not be written: there is none
            raise UserError(
                f"--output {ns.output}: {cannot_write(failure)}; {make_room(failure)}, then score again"
            ) from None
        raise UserError(
            f"--output {ns.output}: {cannot_write(failure)}; {left_behind(job)}; {make_room(failure)}, then "
            f"{how_on(ns)}"
        ) from None
    print(summary.text(ns.output))
    return 0


def check_resume_flags(ns: argparse.Namespace) -> None:
    if ns.resume and ns.overwrite:
        raise UserError("--overwrite and --resume contradict each other; pass one")
    if ns.resume and ns.engine != "local":
        raise UserError(
            "--resume works with --engine local only: Ray Data's workers write parts that do not say which "
            "input files they finished, so a stopped Ray job cannot be continued file by file; replace its "
            "output with --overwrite"
        )


def left_behind(job) -> str:
    """What a stopped job leaves in its output: the input files scored, for the local engine. Ray's parts
    do not say which input files they hold (a stopped Ray job had written parts and said "0 of 4")."""
    if job.engine != "local":
        return f"the output {job.output} is unfinished"
    return f"the output {job.output} is unfinished ({job.done:,} of {counted(len(job.sources), 'input file')} scored)"


def how_on(ns: argparse.Namespace) -> str:
    """The command that continues a stopped job: the local engine resumes; Ray's output is replaced."""
    if ns.engine != "local":
        return "Ray jobs cannot be resumed: score again with --overwrite"
    return f"continue it with: {resume_command(ns)}"


def resume_command(ns: argparse.Namespace) -> str:
    """`imdb-lora score ... --resume` with this job's model, inputs, output and every flag given a value
    other than its default (the ones --resume checks, and the batch sizes and device chosen)."""
    inputs = [str(i) for i in ns.input]
    # A value beginning with '-' is read as a flag after its flag's name: joined to it with '=' instead.
    if any(i.startswith("-") for i in inputs):
        given = [f"--input={i}" for i in inputs]
    else:
        given = ["--input", *inputs]
    args = ["imdb-lora", "score", str(ns.model), *given, *valued_flag("--output", str(ns.output))]
    valued = (
        ("--text-column", ns.text_column, "text"),
        ("--max-chars", ns.max_chars, MAX_CHARS),
        ("--encoding", ns.encoding, "utf-8"),
        ("--window-stride", ns.window_stride, None),
        ("--base-model", ns.base_model, None),
        ("--rows-per-batch", ns.rows_per_batch, ROWS_PER_BATCH),
        ("--batch-size", ns.batch_size, BATCH_SIZE),
        ("--max-batch-tokens", ns.max_batch_tokens, None),
        ("--device", ns.device, None),
    )
    for flag, value, default in valued:
        if value != default:
            args += valued_flag(flag, str(value))
    args += [flag for flag, on in (("--keep-text", ns.keep_text), ("--raw", ns.raw)) if on]
    return shlex.join([*args, "--resume"])


def valued_flag(flag: str, value: str) -> list[str]:
    """`--flag value`, or `--flag=value` where the value begins with '-' (argparse takes it for a flag)."""
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]
