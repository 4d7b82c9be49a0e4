"""The run-directory lock: one writer at a time, the holder named, never stale after a crash."""

import fcntl
import os
import subprocess
import sys

import pytest
from conftest import train_args, without_startup

from imdb_lora.cli import main
from imdb_lora.errors import UserError
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training.trainer import Trainer


class Crash(Exception):
    pass


@pytest.fixture
def interrupted_run(tiny_models, imdb_dir, tmp_path, monkeypatch):
    """A run that crashed after its first mid-epoch checkpoint: resumable, and nobody holds its lock."""

    def crash(self):
        if self.state.global_step == 2:
            raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "1", "--epochs", "1"))
    monkeypatch.undo()
    assert RunDir(out).is_resumable()
    return out


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imdb-lora: error:"), err
    return lines[0]


def test_lock_names_its_holder_and_is_released(tmp_path):
    run = RunDir(tmp_path)
    run.lock()
    try:
        with pytest.raises(UserError, match=rf"in use by another imdb-lora process \(pid {os.getpid()}\)"):
            RunDir(tmp_path).lock()  # a second open file: flock refuses it even in the same process
        with pytest.raises(UserError, match="in use"):
            RunDir(tmp_path).check_unlocked()
    finally:
        run.unlock()
    RunDir(tmp_path).check_unlocked()  # released: no error
    second = RunDir(tmp_path)
    second.lock()
    second.unlock()


def test_second_resume_is_refused_while_the_first_holds_the_lock(interrupted_run, capsys):
    holder = RunDir(interrupted_run)
    holder.lock()  # stands in for a first `train --resume` still training this directory
    before = {p.name: p.stat().st_mtime_ns for p in interrupted_run.iterdir()}
    try:
        capsys.readouterr()
        assert main(["train", "--output-dir", str(interrupted_run), "--resume"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {os.getpid()}" in line and str(interrupted_run) in line
        # nothing was read into or written to the directory by the refused process
        assert {p.name: p.stat().st_mtime_ns for p in interrupted_run.iterdir()} == before
    finally:
        holder.unlock()
    assert main(["train", "--output-dir", str(interrupted_run), "--resume"]) == 0


def test_overwrite_refuses_a_directory_locked_by_another_process(
    interrupted_run, tiny_models, imdb_dir, capsys
):
    # the holder is a real second process, as it would be for a user
    code = (
        "import sys, time; from imdb_lora.runs.rundir import RunDir; run = RunDir(sys.argv[1]); run.lock(); "
    )
    code += "print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(interrupted_run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        args = train_args(tiny_models("bert"), imdb_dir, interrupted_run, "--epochs", "1", "--overwrite")
        assert main(args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {holder.pid}" in line
        assert RunDir(interrupted_run).is_resumable()  # the running process's files are untouched
    finally:
        holder.kill()
        holder.wait()
    # the lock died with the holder: --overwrite now proceeds
    assert (
        main(train_args(tiny_models("bert"), imdb_dir, interrupted_run, "--epochs", "1", "--overwrite")) == 0
    )


def test_finished_and_crashed_runs_leave_no_lock_held(trained_run, interrupted_run):
    # the session's trained_run is shared read-only by the xdist workers: its lock file is taken for a
    # moment through a read-only handle (check_unlocked takes it as a writer and writes its pid there)
    with open(trained_run / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while any process holds it
    RunDir(interrupted_run).check_unlocked()


def test_a_run_started_meanwhile_is_never_taken_over(tiny_models, imdb_dir, tmp_path, monkeypatch, capsys):
    """Two `train --output-dir SAME` started at once both found no directory; the one whose data loaded
    last set the other's fresh run aside as if --overwrite had been given (and deleted it once set up),
    the first then writing into the second's folder. Now the later one is refused, naming the holder."""
    out = tmp_path / "run"
    holder = RunDir(out)
    load = Trainer._setup_data

    def other_train_starts_meanwhile(self):
        load(self)
        out.mkdir()  # the other process created the folder, locked it, and wrote its config
        holder.lock()
        holder.config_path.write_text("other run\n")

    monkeypatch.setattr(Trainer, "_setup_data", other_train_starts_meanwhile)
    try:
        capsys.readouterr()
        assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1")) == 2
        line = one_error_line(without_startup(capsys.readouterr().err))
        assert f"pid {os.getpid()}" in line and str(out) in line
        assert holder.config_path.read_text() == "other run\n"  # the other run's files, untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside
    finally:
        holder.unlock()


def test_overwrite_holds_the_old_run_until_the_new_one_is_set_up(
    interrupted_run, tiny_models, imdb_dir, monkeypatch, capsys
):
    """`train --overwrite` checked the old run's lock, then loaded its data without holding it: a
    `train --resume` (or a second --overwrite) starting meanwhile had its directory moved away and
    deleted under it. Now the lock is held from the check on, and the second process is refused."""
    load = Trainer._setup_data
    refused = []

    def second_process_starts_meanwhile(self):
        load(self)
        with pytest.raises(UserError, match=rf"in use by another imdb-lora process \(pid {os.getpid()}\)"):
            RunDir(interrupted_run).lock()
        refused.append(True)

    monkeypatch.setattr(Trainer, "_setup_data", second_process_starts_meanwhile)
    args = train_args(tiny_models("bert"), imdb_dir, interrupted_run, "--epochs", "1", "--overwrite")
    assert main(args) == 0 and refused
    RunDir(interrupted_run).check_unlocked()


def test_a_run_replaced_while_it_is_read_is_refused_not_mixed(trained_run, tmp_path, monkeypatch):
    """A `train --overwrite` (or an export --overwrite) that swapped the folder while `predict` was
    loading it gave a model put together from both: the old run's config and weights, the new one's
    tokenizer. Now the reader sees the folder changed and says so in one line."""
    import shutil

    from imdb_lora.inference import classifier
    from imdb_lora.inference.classifier import Classifier

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    load_tokenizer = classifier.load_tokenizer

    def overwritten_meanwhile(path, **kw):
        os.replace(run, tmp_path / "old")  # as train --overwrite sets the old run aside...
        shutil.copytree(tmp_path / "old", run)  # ...and makes a new one in its place
        return load_tokenizer(path, **kw)

    monkeypatch.setattr(classifier, "load_tokenizer", overwritten_meanwhile)
    with pytest.raises(UserError, match=r"changed while it was read .*run the command again"):
        Classifier.load(str(run), device="cpu")

    def refused_writer_meanwhile(path, **kw):
        (run / ".lock").write_text("123\n")  # a writer refused by the lock leaves its pid: no change
        return load_tokenizer(path, **kw)

    monkeypatch.setattr(classifier, "load_tokenizer", refused_writer_meanwhile)
    Classifier.load(str(run), device="cpu")
