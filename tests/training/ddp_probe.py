"""`imdb-lora` under torchrun, watched: the script torchrun starts in the data-parallel tests.

It runs the same `imdb_lora.cli.main` as `python -m imdb_lora`, and adds probes set by environment:
- PROBE_RUN_DIR + PROBE_LOG: on every rank but 0, an audit hook logs (one line each, to PROBE_LOG.rank<r>)
  every file creation, write, rename or removal under the run directory: only rank 0 may write there;
- PROBE_KILL_AT_STEP=k: rank 0 kills itself with SIGKILL after its k-th optimizer step (a real crash:
  no cleanup, no exception handler), which brings the whole torchrun job down mid-epoch;
- PROBE_STATUS: every rank writes the exit status `imdb-lora` returned to PROBE_STATUS.rank<r>;
- PROBE_STILL_CLOCK_RANK=r: rank r's own --max-time clock stands still (never runs out), so that rank
  stops on a budget only when rank 0's clock, passed on at each step boundary, says so.

`python ddp_probe.py --self-test DIR LOG` checks that the audit hook sees the writes a run makes.
"""

from __future__ import annotations

import os
import signal
import sys

WRITE_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link"}


def watch_writes(run_dir: str, log_path: str) -> None:
    """Log every write-like operation under run_dir to log_path (opened before the hook exists)."""
    root = os.path.realpath(run_dir)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def inside(p) -> bool:
        try:
            return isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)).startswith(
                root
            )
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            hit = writing and inside(path)
        else:
            hit = event in WRITE_EVENTS and any(inside(a) for a in args[:2])
        if hit:
            os.write(fd, f"{event} {args[:2]!r}\n".encode())

    sys.addaudithook(hook)


def kill_after(step: int) -> None:
    from imdb_lora.training.trainer import Trainer

    done = {"n": 0}

    def after_step(self) -> None:
        done["n"] += 1
        if done["n"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._after_step = after_step


def still_clock() -> None:
    from imdb_lora.training.trainer import Trainer

    Trainer._elapsed = lambda self: 0.0


def self_test(run_dir: str, log_path: str) -> None:
    """Writes made the ways a run makes them; the log must list them."""
    from pathlib import Path

    from imdb_lora.runs.rundir import RunDir

    watch_writes(run_dir, log_path)
    run = RunDir(run_dir)
    run.write_status("running", {})  # open(tmp, "w") + os.replace
    run.lock()  # open(".lock", "a+")
    Path(run_dir, "sub").mkdir()


def main() -> int:
    if sys.argv[1:2] == ["--self-test"]:
        self_test(sys.argv[2], sys.argv[3])
        return 0
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and os.environ.get("PROBE_RUN_DIR"):
        watch_writes(os.environ["PROBE_RUN_DIR"], f"{os.environ['PROBE_LOG']}.rank{rank}")
    if rank == 0 and os.environ.get("PROBE_KILL_AT_STEP"):
        kill_after(int(os.environ["PROBE_KILL_AT_STEP"]))
    if os.environ.get("PROBE_STILL_CLOCK_RANK") == str(rank):
        still_clock()
    from imdb_lora.cli import main as cli_main

    code = cli_main(sys.argv[1:])
    if os.environ.get("PROBE_STATUS"):
        with open(f"{os.environ['PROBE_STATUS']}.rank{rank}", "w") as f:
            f.write(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main())
