"""LoRA and full fine-tuning on the same data and epochs, measured, in one table (`imdb-lora compare`).

Each method trains in its own process so that peak memory (GPU or CPU RSS) is that method's alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import COMPARE_ARM_ENV, COMPARE_LR_ENV, Config, differing_fields
from ..errors import Terminated, UserError
from .report import fmt_bytes, shown_model_name, time_per_epoch
from .rundir import RunDir, atomic_write_text, require_creatable

METHODS = ("lora", "full")


def run_compare(
    output_dir: str | os.PathLike,
    train_args: list[str],
    lrs: dict[str, float | None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    configs: dict[str, Config] | None = None,
) -> str:
    """Train each method into output_dir/<method> with the same train flags; write comparison.md.

    With `resume`, a finished sub-run is kept (if `configs`, the settings each method would train with,
    match its saved ones) and an interrupted one continues; both sub-runs are checked before either
    trains, so a problem with the second never costs the first's training time.
    """
    out = Path(output_dir)
    check_train_args(train_args)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one")
    if out.exists() and not out.is_dir():  # else each method's train failed on it, a second line after
        raise UserError(f"--output-dir {out} exists and is not a folder")
    require_creatable(out, "--output-dir")
    plans = {m: plan_method(out / m, overwrite, resume, (configs or {}).get(m)) for m in METHODS}
    rows = []
    for method in METHODS:
        run = out / method
        if plans[method] == "keep":
            print(f"== {method}: {run} finished before; kept (--resume)", flush=True)
        else:
            before = run_fingerprint(run) if plans[method] == "overwrite" else None
            try:
                train_method(method, run, train_args, (lrs or {}).get(method), plans[method])
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated, a subclass: kept)
                raise type(e)(after_interrupt(out, method, overwrite, before)) from None
            except UserError as e:  # the child failed and said why; what it means for the runs before it
                raise UserError(f"{e}{kept_on_resume(out, method, overwrite)}") from None
        done = RunDir(run)
        rows.append(done.require_finished() | {"history": done.read_metrics()})
    table = comparison_markdown(rows)
    atomic_write_text(out / "comparison.md", table)
    return table


def check_train_args(train_args: list[str]) -> None:
    if any(a in ("--method", "--output-dir") for a in train_args):
        raise UserError("compare sets --method and --output-dir itself; give the other train flags only")


def plan_method(run: Path, overwrite: bool, resume: bool, expected: Config | None) -> str:
    """What to do with one method's sub-run: "fresh", "overwrite", "resume" or "keep" (or a UserError)."""
    if run.exists() and not run.is_dir():
        raise UserError(f"--output-dir: {run} exists and is a file")
    if not run.exists() or not any(run.iterdir()):
        return "fresh"
    rundir = RunDir(run)
    if overwrite:
        if not rundir.is_run():
            raise UserError(f"--overwrite: {run} is not an imdb-lora run directory; refusing to replace it")
        return "overwrite"
    if not resume:
        if rundir.status() == "finished":
            hint = ", or --resume to keep it"
        elif rundir.is_resumable():
            hint = ", or --resume to continue it"
        else:
            hint = ""
        raise UserError(f"--output-dir: {run} exists and is not empty; pass --overwrite to replace it{hint}")
    if rundir.status() == "finished":
        diff = differing_fields(Config.load(rundir.config_path, flag=None), expected) if expected else []
        if diff:
            raise UserError(
                f"--resume: {run} finished with other settings ({', '.join(diff)}); "
                "pass --overwrite to train both methods again"
            )
        return "keep"
    if rundir.is_resumable():
        return "resume"
    raise UserError(f"--resume: {run} holds no finished or resumable run; pass --overwrite to replace it")


def train_method(method: str, run: Path, train_args: list[str], lr: float | None, plan: str) -> None:
    """One method's `imdb-lora train` in its own process, so its peak memory is its own."""
    args = ["train", "--method", method, "--output-dir", str(run), *train_args]
    if lr is not None:
        args += ["--lr", str(lr)]
    args += {"fresh": [], "overwrite": ["--overwrite"], "resume": ["--resume"]}[plan]
    print(f"== {method}: imdb-lora {' '.join(args)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != COMPARE_LR_ENV} | {COMPARE_ARM_ENV: method}
    if lr is not None:  # the --lr above is the user's --lora-lr or --full-lr: named so by the child
        env[COMPARE_LR_ENV] = f"--{method}-lr"
    with subprocess.Popen([sys.executable, "-m", "imdb_lora", *args], env=env) as proc:
        try:
            code = proc.wait()
        except KeyboardInterrupt as e:
            # Ctrl-C reached the child too (the terminal sends it to the whole process group); SIGTERM
            # may have come to compare alone, so it is passed on. The child is leaving its run resumable
            # (or removing a run with nothing to resume): killing it now, as subprocess.call would,
            # could cut that short.
            if isinstance(e, Terminated) and proc.poll() is None:
                proc.terminate()
            proc.wait()
            raise
    if code != 0:
        raise UserError(f"the {method} run failed (exit code {code}); see its output above")


def run_fingerprint(run: Path) -> tuple[int, ...] | None:
    """The run folder's inode and its run.json's and checkpoint's change times: equal before and after
    an interrupted `train --overwrite` only if the old run was put back untouched (train sets the old
    run aside by renaming it, which keeps both, and puts it back the same way if setup is cut short)."""
    try:
        stats = [run.stat().st_ino]
        for name in ("run.json", "checkpoint.safetensors", "config.yaml"):
            f = run / name
            stats.append(f.stat().st_mtime_ns if f.exists() else -1)
        return tuple(stats)
    except OSError:
        return None


def after_interrupt(out: Path, method: str, overwrite: bool, before: tuple[int, ...] | None = None) -> str:
    """What Ctrl-C during `method`'s train leaves, as the child left it: a run that --resume continues,
    or (before its first checkpoint) nothing of it, to be trained again from the start. `before`: the
    run_fingerprint of the run --overwrite was replacing; if it is unchanged, that old run was put back."""
    resume = resume_flags(overwrite)
    if before is not None and run_fingerprint(out / method) == before:
        return (
            f"the {method} run stopped during its setup and the old {method} run was put back as it was; "
            "run the same compare command again to replace it"
        )
    if RunDir(out / method).is_resumable():
        return f"the {method} run stopped; the same compare command with {resume} continues it"
    gone = f"the {method} run stopped before its first checkpoint, so there is nothing of it to resume"
    kept = kept_on_resume(out, method, overwrite)
    return (
        f"{gone}{kept} and trains {method} from the start"
        if kept
        else f"{gone}; run the same compare command again"
    )


def resume_flags(overwrite: bool) -> str:
    """What to pass on the rerun: --resume, in place of --overwrite where that was given."""
    return "--resume instead of --overwrite" if overwrite else "--resume"


def kept_on_resume(out: Path, method: str, overwrite: bool) -> str:
    """'; the same compare command with --resume keeps the finished lora run' when a run before `method`
    finished (a rerun without --resume would train it again, or refuse its folder); else ''."""
    finished = [m for m in METHODS[: METHODS.index(method)] if RunDir(out / m).status() == "finished"]
    if not finished:
        return ""
    resume = resume_flags(overwrite)
    return f"; the same compare command with {resume} keeps the finished {' and '.join(finished)} run"


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        # comparison.md is shared as results.md is: a local base by its folder's name, never this machine's path
        f"# LoRA vs full fine-tuning: {shown_model_name(first['model'])}",
        "",
        f"{devices_line(rows)}; same data, epochs and seed for both; "
        f"train/val/test = {' / '.join(f'{v:,}' for v in first['examples'].values())} reviews. "
        "Test accuracy is that of the checkpoint chosen on validation.",
        "",
        "| Method | Trainable parameters | Trainable % | Val acc | Test acc | Seconds per epoch | Peak memory | Saved size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "LoRA" if r["method"] == "lora" else "Full fine-tuning"
        test = f"{100 * r['test_accuracy']:.2f}%" if r.get("test_accuracy") is not None else "–"
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {r['trainable_percent']:.2f}% | "
            f"{100 * r['val_accuracy']:.2f}% | {test} | {time_per_epoch(r['history'])} | "
            # 'size, kind' as results.md says 'Peak memory, kind': the kind has brackets of its own
            f"{fmt_bytes(r['peak_memory_bytes'])}, {r['peak_memory_kind']} | {fmt_bytes(r['weights_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def devices_line(rows: list[dict[str, Any]]) -> str:
    """One device for both runs, or each run's: a run kept by --resume may have trained elsewhere."""
    where = [f"{r['device']} ({r['precision']})" for r in rows]
    if len(set(where)) == 1:
        return f"Device: {where[0]}"
    return "Devices: " + ", ".join(f"{r['method']} on {w}" for r, w in zip(rows, where, strict=True))
