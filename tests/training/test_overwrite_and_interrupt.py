"""--overwrite replaces only a run directory, and only once the new run is set up; Ctrl-C (or SIGTERM)
during training leaves a run to --resume or, before its first checkpoint, nothing at all; an impossible
--output-dir is refused before the data is read."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    hold_train_at,
    sigint_as_in_a_terminal,
    train_args,
    wait_running_until,
    without_startup,
    write_imdb,
)

from imdb_lora.cli import main
from imdb_lora.errors import Terminated
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training.trainer import Trainer


def error_line(capsys) -> str:
    lines = without_startup(capsys.readouterr().err).splitlines()
    assert len(lines) == 1 and lines[0].startswith("imdb-lora: error:"), lines
    return lines[0]


def last_error_line(capsys) -> str:
    """The error that ends a command which had trained (its progress bars come first on stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("imdb-lora: error:"), err[-2000:]
    return lines[-1]


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_models, imdb_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    assert main(train_args(tiny_models("bert"), imdb_dir, mine, "--overwrite")) == 2
    assert "is not an imdb-lora run directory" in error_line(capsys)
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()


def test_overwrite_refuses_the_folder_it_is_run_from(
    trained_run, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    run = shutil.copytree(trained_run, tmp_path / "r")
    monkeypatch.chdir(run / "adapter")
    assert main(train_args(tiny_models("bert"), imdb_dir, run, "--overwrite")) == 2
    assert "holds the current directory" in error_line(capsys)
    assert (run / "adapter").is_dir() and RunDir(run).status() == "finished"


def test_overwrite_puts_the_old_run_back_when_the_new_setup_fails(
    trained_run, tiny_models, imdb_dir, tmp_path, capsys
):
    run = shutil.copytree(trained_run, tmp_path / "r")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    # --lora-modules is checked once the model is built, after the directory was replaced
    args = train_args(tiny_models("bert"), imdb_dir, run, "--overwrite", "--lora-modules", "nothing_here")
    assert main(args) == 2
    assert "--lora-modules" in error_line(capsys)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing set aside is left behind


def test_overwrite_drops_the_old_run_once_the_new_one_is_set_up(
    trained_run, tiny_models, imdb_dir, tmp_path, capsys
):
    run = shutil.copytree(trained_run, tmp_path / "r")
    (run / "stale.txt").write_text("from the old run")
    assert main(train_args(tiny_models("bert"), imdb_dir, run, "--epochs", "1", "--overwrite")) == 0
    assert not (run / "stale.txt").exists() and RunDir(run).status() == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def interrupt_at_step(monkeypatch, step: int) -> None:
    def ctrl_c(self):
        if self.state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", ctrl_c)


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    interrupt_at_step(monkeypatch, 2)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "0")) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "was removed" in err
    assert not out.exists()
    monkeypatch.undo()  # and the same command needs no --overwrite now
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1")) == 0


STOPS = [
    (KeyboardInterrupt, 130, "imdb-lora: interrupted"),
    (Terminated, 143, "imdb-lora: stopped by SIGTERM"),
]


@pytest.mark.parametrize("stop, status, said", STOPS, ids=["ctrl-c", "sigterm"])
def test_a_stop_just_after_the_run_folder_is_made_leaves_no_folder(
    stop, status, said, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """The signal arrives as mkdir returns, before the trainer has noted that it made the folder: the
    folder was left behind, empty (the trainer noted it only after mkdir)."""
    out = tmp_path / "r"
    mkdir = Path.mkdir

    def mkdir_then_stop(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)
        if self == out:
            raise stop

    monkeypatch.setattr(Path, "mkdir", mkdir_then_stop)
    assert main(train_args(tiny_models("bert"), imdb_dir, out)) == status
    assert capsys.readouterr().err.splitlines()[-1] == said
    assert not out.exists() and list(tmp_path.iterdir()) == []


def stop_as_training_begins(monkeypatch, stop: type[KeyboardInterrupt]) -> None:
    """The signal arrives once setup is over, before train()'s handler is in place (its first line)."""
    train = Trainer.train

    def stopped_first(self):
        monkeypatch.setattr(Trainer, "train", train)  # once: the rerun trains
        raise stop

    monkeypatch.setattr(Trainer, "train", stopped_first)


@pytest.mark.parametrize("stop, status, said", STOPS, ids=["ctrl-c", "sigterm"])
def test_a_stop_between_setup_and_training_leaves_nothing_and_says_so(
    stop, status, said, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """It left the folder with config.yaml and a "running" run.json, no checkpoint, a bare "interrupted",
    and a rerun of the same command that was refused without --overwrite."""
    stop_as_training_begins(monkeypatch, stop)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out)) == status
    line = capsys.readouterr().err.splitlines()[-1]
    assert (
        line
        == f"{said}; no checkpoint had been written yet, so there is nothing to resume; {out} was removed"
    )
    assert not out.exists()
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1")) == 0  # no --overwrite needed


def test_a_stop_between_setup_and_training_of_a_resumed_run_says_how_to_resume(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    interrupt_at_step(monkeypatch, 2)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "1")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    stop_as_training_begins(monkeypatch, KeyboardInterrupt)
    assert main(["train", "--output-dir", str(out), "--resume"]) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("imdb-lora: interrupted; training was at step 2 of ")
    assert line.endswith(f"(step 2); continue it with: imdb-lora train --output-dir {out} --resume")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"


def test_a_stop_between_setup_and_training_under_overwrite_puts_the_old_run_back(
    trained_run, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """A stop before the replaced run's removal began: the old run was left aside (r.replaced-PID) and
    the new one, with no checkpoint, in its place."""
    run = shutil.copytree(trained_run, tmp_path / "r")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    drop = Trainer._drop_replaced

    def stopped_first(self):
        monkeypatch.setattr(Trainer, "_drop_replaced", drop)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_drop_replaced", stopped_first)
    assert main(train_args(tiny_models("bert"), imdb_dir, run, "--overwrite")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "imdb-lora: interrupted"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and RunDir(run).status() == "finished"


def test_a_stop_while_the_replaced_run_is_removed_finishes_removing_it(
    trained_run, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """Once the old run's removal has begun it cannot be put back whole: the removal finishes, and the
    new run, without a checkpoint, goes as a stop before the first checkpoint takes it."""
    run = shutil.copytree(trained_run, tmp_path / "r")
    rmtree = shutil.rmtree

    def rmtree_cut_short(path, *args, **kwargs):
        if ".replaced-" in str(path):
            monkeypatch.setattr(shutil, "rmtree", rmtree)
            (Path(path) / "run.json").unlink()  # a part removed, then the signal
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_cut_short)
    assert main(train_args(tiny_models("bert"), imdb_dir, run, "--overwrite")) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    assert (
        line
        == f"imdb-lora: interrupted; no checkpoint had been written yet, so there is nothing to resume; {run} was removed"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_a_checkpoint_says_how_to_resume(tiny_models, imdb_dir, tmp_path, monkeypatch, capsys):
    interrupt_at_step(monkeypatch, 2)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "1")) == 130
    assert f"imdb-lora train --output-dir {out} --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"


def test_a_full_disk_during_training_is_one_line_and_leaves_the_run_as_ctrl_c_does(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """A full disk under a checkpoint ended train in safetensors' traceback (SafetensorError, not even an
    OSError), leaving a run that said "running" and a half-written run.json.tmp beside it; now one line
    names the run and what to do: resume from the last checkpoint (before the first one, the run is
    removed, as Ctrl-C removes it: the same code)."""
    from safetensors import SafetensorError

    from imdb_lora.training import trainer

    save_checkpoint, saves = trainer.save_checkpoint, []

    def full_disk(*args, **kw):  # the second checkpoint (epoch 2's end) finds the disk full
        saves.append(1)
        if len(saves) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_checkpoint(*args, **kw)

    monkeypatch.setattr(trainer, "save_checkpoint", full_disk)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "0")) == 2
    line = last_error_line(capsys)
    assert f"--output-dir {out}: cannot write (No space left on device); free some space first" in line
    assert line.endswith(f"continue it with: imdb-lora train --output-dir {out} --resume")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"


# SIGINT's path differs only in its name and status (Ctrl-C is tested in-process above): a slow test
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_during_training_says_where_the_checkpoint_is_and_how_to_resume(sig, tiny_models, tmp_path):
    """SIGTERM (kill, a scheduler) killed a real `imdb-lora train` silently (status -15), though the run
    could be resumed; now it stops as Ctrl-C does: one line with the last checkpoint and the command,
    the shell's status (143; Ctrl-C 130), no traceback, and the command resumes it. The checkpoint is
    written where the signal found the loop (the step it was at), not only every --checkpoint-every
    steps: the signal comes after step 7 and training stops there with a checkpoint of step 7. The
    process waits at step 7 until the signal comes: sent when step 5's checkpoint appeared, it had to
    reach the process within the epoch's 13 remaining steps (a fraction of a second), or on a loaded
    machine it landed in the evaluation (another stop, with another line) or after the run."""
    from safetensors import safe_open

    data = write_imdb(tmp_path / "data", per_class=48, seed=1)  # 18 steps an epoch
    out = tmp_path / "r"
    args = train_args(tiny_models("bert"), data, out, "--batch-size", "4", "--max-length", "32",
                      "--checkpoint-every", "5", "--no-token-cache")  # fmt: skip
    held = tmp_path / "held"
    env = hold_train_at("_after_step:7", held, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "imdb_lora", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        wait_running_until(proc, held.exists)
        assert proc.poll() is None and held.exists(), "training never reached step 7"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
    last = [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        saved = json.loads(f.metadata()["progress"])["global_step"]
    assert saved == 7
    what = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert f"imdb-lora: {name}: finishing the step in flight and saving a checkpoint there" in err
    assert re.fullmatch(
        rf"imdb-lora: {what}; training was at step {saved} of 36; its last checkpoint is "
        rf"{re.escape(str(out / 'checkpoint.safetensors'))} \(step {saved}\); "
        rf"continue it with: imdb-lora train --output-dir {re.escape(str(out))} --resume",
        last,
    ), last
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"


@pytest.mark.parametrize("flag", ["train", "export"])
def test_an_output_folder_under_a_file_is_a_one_line_error(
    flag, trained_run, tiny_models, imdb_dir, tmp_path, capsys
):
    (tmp_path / "p.csv").write_text("text,label\n")
    dest = tmp_path / "p.csv" / "x"
    if flag == "train":
        args = train_args(tiny_models("bert"), imdb_dir, dest)
    else:
        args = ["export", str(trained_run), "--to", str(dest)]
    assert main(args) == 2
    assert "p.csv is a file" in error_line(capsys)


def test_overwrite_takes_a_folder_left_by_a_train_killed_right_after_its_lock(
    tiny_models, imdb_dir, tmp_path
):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("12345\n")  # the lock file alone: killed before config.yaml was written
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1", "--overwrite")) == 0
    assert RunDir(out).status() == "finished"
