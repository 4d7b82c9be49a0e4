"""A failure during setup removes what a fresh run created; a resumed run keeps its files, unlocked."""

import pytest
from conftest import train_args, without_startup

from imdb_lora.cli import main
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training.trainer import Trainer


class Boom(Exception):
    pass


def test_user_error_after_the_directory_was_made_leaves_nothing(tiny_models, imdb_dir, tmp_path, capsys):
    out = tmp_path / "r"
    # --lora-modules is only checked against the model once the model is built: after the directory exists
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--lora-modules", "nothing_here")) == 2
    err = without_startup(capsys.readouterr().err).splitlines()
    assert len(err) == 1 and "--lora-modules" in err[0], err
    assert not out.exists()
    # and the same command, corrected, needs no --overwrite
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1")) == 0


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_any_setup_failure_of_a_fresh_run_removes_its_directory(
    tiny_models, imdb_dir, tmp_path, monkeypatch, exc
):
    def fail(self):
        assert self.run.path.is_dir() and self.run.config_path.is_file()  # it had been created
        raise exc

    monkeypatch.setattr(Trainer, "_setup_optimizer", fail)
    out = tmp_path / "r"
    if exc is KeyboardInterrupt:
        assert main(train_args(tiny_models("bert"), imdb_dir, out)) == 130
    else:
        with pytest.raises(Boom):
            main(train_args(tiny_models("bert"), imdb_dir, out))
    assert not out.exists()


@pytest.mark.parametrize("when", ["taking the lock", "after the lock"])
def test_ctrl_c_just_after_the_directory_is_made_removes_it(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys, when
):
    """Ctrl-C between the folder's mkdir and the point where the run counts it as its own (a real
    compare's Ctrl-C, sent as soon as the folder appears, landed there): the empty folder, lock file
    and all, is removed as a later setup failure's would be, and the same command runs again."""
    real_lock = RunDir.lock

    def lock(self):
        if when == "after the lock":
            real_lock(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "lock", lock)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out)) == 130
    assert not out.exists()
    monkeypatch.undo()
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1")) == 0


def test_an_interrupted_setup_keeps_a_folder_another_process_holds(tmp_path):
    """remove_if_empty leaves a folder whose lock another holder has, and one with anything else in it."""
    held, other = RunDir(tmp_path / "held"), RunDir(tmp_path / "other")
    held.path.mkdir()
    held.lock()
    try:
        RunDir(held.path).remove_if_empty()
        assert held.lock_path.is_file()
    finally:
        held.unlock()
    other.path.mkdir()
    (other.path / "config.yaml").write_text("x")
    other.remove_if_empty()
    assert (other.path / "config.yaml").is_file()
    RunDir(held.path).remove_if_empty()  # no holder now: removed
    assert not held.path.exists()


def test_setup_failure_of_a_resumed_run_keeps_its_files_and_releases_the_lock(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    def crash(self):
        raise Boom

    out = tmp_path / "r"
    monkeypatch.setattr(Trainer, "_after_step", crash)
    with pytest.raises(Boom):
        main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "1"))
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(Trainer, "_setup_optimizer", lambda self: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        main(["train", "--output-dir", str(out), "--resume"])
    assert sorted(p.name for p in out.iterdir()) == before
    RunDir(out).check_unlocked()
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
