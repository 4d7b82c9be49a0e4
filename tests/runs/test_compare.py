import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    hold_train_at,
    sigint_as_in_a_terminal,
    sigterm_fails_the_test,
    train_args,
    wait_running_until,
    write_imdb,
)

import imdb_lora.runs.compare
from imdb_lora.cli import main
from imdb_lora.metrics import peak_memory
from imdb_lora.runs.compare import comparison_markdown
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training.trainer import Trainer


class TrainInThisProcess:
    """compare's `python -m imdb_lora train ...` child without the ~10 s start of a fresh Python with
    torch: a stand-in for subprocess.Popen that runs the command in this process when waited on."""

    started: list[list[str]] = []  # the train arguments of every child, in order

    def __init__(self, argv: list[str], env: dict[str, str]):
        assert argv[:3] == [sys.executable, "-m", "imdb_lora"] and argv[3] == "train"
        self.argv = argv[3:]
        self.started.append(argv[4:])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def wait(self) -> int:
        return main(self.argv)


@pytest.fixture
def train_in_this_process(monkeypatch) -> list[list[str]]:
    monkeypatch.setattr(TrainInThisProcess, "started", [])
    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=TrainInThisProcess))
    return TrainInThisProcess.started


def compare_flags(tiny_models, imdb_dir, *extra: str) -> list[str]:
    """conftest's quick train flags for one epoch, less the ones compare sets itself."""
    flags = train_args(tiny_models("bert"), imdb_dir, Path("unused"), "--epochs", "1", *extra)[1:]
    i = flags.index("--output-dir")
    return flags[:i] + flags[i + 2 :]


@pytest.mark.parametrize("process", ["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_compare_writes_both_rows(process, tiny_models, imdb_dir, tmp_path, capsys, request):
    if process == "in-process":
        request.getfixturevalue("train_in_this_process")
    flags = compare_flags(tiny_models, imdb_dir)
    code = main(["compare", "--output-dir", str(tmp_path / "cmp"), "--full-lr", "1e-4", *flags])
    assert code == 0, capsys.readouterr().err
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    lora_row = next(line for line in table.splitlines() if line.startswith("| LoRA |"))
    full_row = next(line for line in table.splitlines() if line.startswith("| Full fine-tuning |"))
    lora_trainable = int(lora_row.split("|")[2].strip().replace(",", ""))
    full_trainable = int(full_row.split("|")[2].strip().replace(",", ""))
    assert 0 < lora_trainable < full_trainable
    assert (tmp_path / "cmp" / "lora" / "adapter").is_dir() and (tmp_path / "cmp" / "full" / "model").is_dir()
    assert (
        "1e-4" in (tmp_path / "cmp" / "full" / "config.yaml").read_text()
        or "0.0001" in (tmp_path / "cmp" / "full" / "config.yaml").read_text()
    )


@pytest.mark.parametrize("flag", ["--lora-lr", "--full-lr"])
@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "inf", "1"])
def test_compare_learning_rates_are_numbers_between_0_and_1(tmp_path, capsys, flag, value):
    # nan was refused as "--lr must be positive" (a flag compare does not take); inf trained both runs
    assert main(["compare", "--output-dir", str(tmp_path), flag, value]) == 2
    assert f"argument {flag}: expected a number in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "device", "under_a_file"])
def test_compare_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, kind):
    # each method's train refused it, and compare then added "the lora run failed": two error lines
    (tmp_path / "notes.txt").write_text("x")
    out = {
        "file": tmp_path / "notes.txt",
        "device": Path(os.devnull),
        "under_a_file": tmp_path / "notes.txt" / "o",
    }
    assert main(["compare", "--output-dir", str(out[kind])]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"--output-dir {out[kind]}" in err and "lora run failed" not in err


def test_compare_refuses_method_flag(tmp_path, capsys):
    assert main(["compare", "--output-dir", str(tmp_path), "--method", "full"]) == 2
    assert "compare sets --method" in capsys.readouterr().err


class Crash(Exception):
    pass


def test_compare_resume_keeps_the_finished_run_and_continues_the_interrupted_one(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch, train_in_this_process
):
    trained = train_in_this_process  # the train arguments of each child compare started
    out = tmp_path / "cmp"
    compare = [
        "compare",
        "--output-dir",
        str(out),
        *compare_flags(tiny_models, imdb_dir, "--checkpoint-every", "1"),
    ]
    full_steps = []

    def crash_in_full(self):
        if self.cfg.train.method == "full":
            full_steps.append(1)
            if len(full_steps) == 3:  # after two checkpoints of the full run
                raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash_in_full)
    with pytest.raises(Crash):
        main(compare)
    monkeypatch.setattr(Trainer, "_after_step", lambda self: None)
    assert json.loads((out / "full" / "run.json").read_text())["status"] == "running"
    trained.clear()

    # again without a flag: refused before anything trains, with both ways out named
    assert main(compare) == 2
    err = capsys.readouterr().err
    assert (
        f"{out / 'lora'} exists and is not empty; pass --overwrite to replace it, or --resume to keep it"
        in err
    )
    assert trained == []

    # --resume: the finished LoRA run is kept, the full run continues where it stopped
    assert main([*compare, "--resume"]) == 0
    assert [args[:2] for args in trained] == [["--method", "full"]] and trained[0][-1] == "--resume"
    assert f"== lora: {out / 'lora'} finished before; kept (--resume)" in capsys.readouterr().out
    assert "| Full fine-tuning |" in (out / "comparison.md").read_text()
    assert json.loads((out / "full" / "run.json").read_text())["status"] == "finished"

    # a finished run is kept only with the settings asked for now
    trained.clear()
    assert main([*compare, "--resume", "--epochs", "2"]) == 2
    assert (
        "lora finished with other settings (--epochs (train.epochs: 1 saved, 2 given))"
        in capsys.readouterr().err
    )
    assert trained == []


def test_compare_checks_both_runs_and_its_flags_before_training(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=pytest.fail))
    out = tmp_path / "cmp"
    (out / "full").mkdir(parents=True)
    (out / "full" / "notes.txt").write_text("not a run")
    compare = ["compare", "--output-dir", str(out), *compare_flags(tiny_models, imdb_dir)]
    assert main([*compare, "--overwrite"]) == 2  # lora/ would have trained first, for nothing
    assert f"--overwrite: {out / 'full'} is not an imdb-lora run directory" in capsys.readouterr().err
    assert main([*compare, "--resume"]) == 2
    assert "holds no finished or resumable run" in capsys.readouterr().err
    assert main([*compare, "--epochs", "many"]) == 2
    assert "--epochs: expected int, got 'many'" in capsys.readouterr().err
    assert main([*compare, "--lora-rank", "8"]) == 2
    assert (
        "train flags: unrecognized arguments: --lora-rank 8; did you mean --lora-r?"
        in capsys.readouterr().err
    )
    assert main([*compare, "--lora-dropou", "0.1"]) == 2  # a prefix of --lora-dropout is not taken for it
    assert (
        "unrecognized arguments: --lora-dropou 0.1; did you mean --lora-dropout?" in capsys.readouterr().err
    )
    assert (out / "full" / "notes.txt").read_text() == "not a run"


def test_the_table_names_each_device_when_the_runs_differ():
    row = {"model": "m", "examples": {"train": 8, "val": 2, "test": 4}, "trainable_parameters": 10}
    row |= {"trainable_percent": 1.0, "val_accuracy": 0.5, "train_seconds": 3.0, "epochs_done": 1}
    row |= {"history": [{"epoch": 1, "train_seconds": 3.0}]}
    row |= {"peak_memory_bytes": 1, "peak_memory_kind": "rss", "weights_bytes": 1, "precision": "fp32"}
    lora, full = row | {"method": "lora", "device": "cpu"}, row | {"method": "full", "device": "cpu"}
    assert "Device: cpu (fp32); same data" in comparison_markdown([lora, full])
    full |= {"device": "cuda:0", "precision": "bf16"}
    assert "Devices: lora on cpu (fp32), full on cuda:0 (bf16); same data" in comparison_markdown(
        [lora, full]
    )


def test_the_table_names_a_local_base_by_its_folder_not_its_path(tmp_path):
    local = tmp_path / "models" / "all-MiniLM-L6-v2"
    row = {"model": str(local), "examples": {"train": 8, "val": 2, "test": 4}}
    row |= {"trainable_parameters": 10, "trainable_percent": 1.0, "val_accuracy": 0.5, "train_seconds": 3.0}
    row |= {"epochs_done": 1, "peak_memory_bytes": 1, "peak_memory_kind": "rss", "weights_bytes": 1}
    row |= {"history": [{"epoch": 1, "train_seconds": 3.0}]}
    row |= {"precision": "fp32", "device": "cpu"}
    table = comparison_markdown([row | {"method": "lora"}, row | {"method": "full"}])
    assert (
        table.startswith("# LoRA vs full fine-tuning: all-MiniLM-L6-v2\n") and str(local.parent) not in table
    )
    hub = comparison_markdown([row | {"method": "lora", "model": "sentence-transformers/all-MiniLM-L6-v2"}])
    assert hub.startswith("# LoRA vs full fine-tuning: sentence-transformers/all-MiniLM-L6-v2\n")


def test_the_peak_memory_cell_has_no_nested_brackets():
    row = {"model": "m", "examples": {"train": 8, "val": 2, "test": 4}, "trainable_parameters": 10}
    row |= {"trainable_percent": 1.0, "val_accuracy": 0.5, "train_seconds": 3.0, "epochs_done": 1}
    row |= {"history": [{"epoch": 1, "train_seconds": 3.0}]}
    row |= {"peak_memory_bytes": 1 << 30, "peak_memory_kind": peak_memory(torch.device("cpu"))[1]}
    row |= {"weights_bytes": 1, "precision": "fp32", "device": "cpu", "method": "lora"}
    assert "| 1.0 GB, CPU (process peak RSS) |" in comparison_markdown([row])


def test_seconds_per_epoch_averages_the_full_epochs_only():
    """Two 11 s epochs and one cut after 1 of 10 steps (1.2 s): the cut one pulled the mean to 7.7 s."""
    row = {"model": "m", "examples": {"train": 8, "val": 2, "test": 4}, "trainable_parameters": 10}
    row |= {"trainable_percent": 1.0, "val_accuracy": 0.5, "train_seconds": 23.2, "epochs_done": 3}
    row |= {"peak_memory_bytes": 1, "peak_memory_kind": "rss", "weights_bytes": 1}
    row |= {"weights_bytes": 1, "precision": "fp32", "device": "cpu", "method": "lora"}
    full = [{"epoch": e, "train_seconds": 11.0} for e in (1, 2)]
    row |= {"history": [*full, {"epoch": 3, "train_seconds": 1.2, "steps": 1, "steps_in_epoch": 10}]}
    assert "| 11.0 s |" in comparison_markdown([row])


@pytest.mark.parametrize("left", ["resumable", "nothing"])
def test_ctrl_c_lets_the_run_tidy_up_and_says_what_it_left(left, tmp_path, capsys, monkeypatch):
    waits = []

    class InterruptedChild:
        def __init__(self, argv, env):
            self.run = Path(argv[argv.index("--output-dir") + 1])

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def wait(self) -> int:
            waits.append(1)
            if len(waits) == 1:
                raise KeyboardInterrupt  # Ctrl-C while the child trains
            if left == "resumable":  # the child got it too and has left its run resumable...
                self.run.mkdir(parents=True)
                (self.run / "config.yaml").write_text("{}\n")
                (self.run / "checkpoint.safetensors").write_bytes(b"")
            return 130  # ...or, before its first checkpoint, removed it

        def kill(self) -> None:
            pytest.fail("compare killed a run that was still tidying up after Ctrl-C")

    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=InterruptedChild))
    assert main(["compare", "--output-dir", str(tmp_path / "cmp"), "--epochs", "1"]) == 130
    err = capsys.readouterr().err
    resume = "interrupted; the lora run stopped; the same compare command with --resume continues it"
    again = (
        "interrupted; the lora run stopped before its first checkpoint, so there is nothing of it to "
        "resume; run the same compare command again"
    )
    assert (resume in err, again in err) == ((True, False) if left == "resumable" else (False, True))
    assert len(waits) == 2


def test_ctrl_c_in_full_before_its_checkpoint_keeps_the_finished_lora_run(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch, train_in_this_process
):
    class FullInterruptedEarly(TrainInThisProcess):
        """The full run's child gets Ctrl-C before its first checkpoint: it leaves no folder."""

        waits = 0

        def wait(self) -> int:
            if self.argv[2] != "full":
                return super().wait()
            FullInterruptedEarly.waits += 1
            if FullInterruptedEarly.waits == 1:
                raise KeyboardInterrupt
            return 130

    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=FullInterruptedEarly))
    out = tmp_path / "cmp"
    compare = ["compare", "--output-dir", str(out), *compare_flags(tiny_models, imdb_dir)]
    assert main(compare) == 130
    err = capsys.readouterr().err
    assert (
        "interrupted; the full run stopped before its first checkpoint, so there is nothing of it to resume; "
        "the same compare command with --resume keeps the finished lora run and trains full from the start"
    ) in err
    assert RunDir(out / "lora").status() == "finished" and not (out / "full").exists()

    # the advice works: --resume keeps lora and trains full from the start
    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=TrainInThisProcess))
    train_in_this_process.clear()
    assert main([*compare, "--resume"]) == 0
    assert [args[:2] for args in train_in_this_process] == [["--method", "full"]]
    assert "--resume" not in train_in_this_process[0]


def test_ctrl_c_between_the_lora_setup_and_its_training_says_to_run_again_and_that_works(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch, train_in_this_process
):
    """The signal reaches the lora child once its setup is over, before its training's handler: the
    child left its folder (config.yaml, a "running" run.json, no checkpoint), and the advice to run the
    same command again was refused, the folder not empty."""
    train = Trainer.train

    def stopped_first(self):
        monkeypatch.setattr(Trainer, "train", train)
        raise KeyboardInterrupt

    class LoraStoppedBeforeItsSteps(TrainInThisProcess):
        code: int | None = None

        def wait(self) -> int:
            if self.argv[2] != "lora" or self.code is not None:  # compare waits again once interrupted
                return super().wait() if self.code is None else self.code
            self.code = main(self.argv)  # the child, given Ctrl-C
            raise KeyboardInterrupt  # and compare, in the terminal's process group

    monkeypatch.setattr(Trainer, "train", stopped_first)
    monkeypatch.setattr(
        imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=LoraStoppedBeforeItsSteps)
    )
    out = tmp_path / "cmp"
    compare = ["compare", "--output-dir", str(out), *compare_flags(tiny_models, imdb_dir)]
    assert main(compare) == 130
    err = capsys.readouterr().err
    assert Trainer.train is train and err.rstrip().endswith(
        "imdb-lora: interrupted; the lora run stopped before its first checkpoint, so there is nothing of it "
        "to resume; run the same compare command again"
    )
    assert not (out / "lora").exists()
    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=TrainInThisProcess))
    assert main(compare) == 0  # the advice works
    assert RunDir(out / "lora").status() == "finished" and RunDir(out / "full").status() == "finished"


def test_a_failed_full_run_says_resume_keeps_the_finished_lora_run(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch, train_in_this_process
):
    """A full run that fails (its own error above) said only that it failed: rerun without --resume,
    compare would train the finished LoRA run again, or refuse its folder."""

    class FullFails(TrainInThisProcess):
        def wait(self) -> int:
            return super().wait() if self.argv[2] != "full" else 2

    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=FullFails))
    out = tmp_path / "cmp"
    assert main(["compare", "--output-dir", str(out), *compare_flags(tiny_models, imdb_dir)]) == 2
    assert capsys.readouterr().err.endswith(
        "the full run failed (exit code 2); see its output above; "
        "the same compare command with --resume keeps the finished lora run\n"
    )
    assert RunDir(out / "lora").status() == "finished"


def test_ctrl_c_advice_under_overwrite_names_resume_instead(tmp_path):
    from imdb_lora.runs.compare import after_interrupt

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "run.json").write_text('{"status": "finished"}')
    assert after_interrupt(tmp_path, "full", overwrite=True).endswith(
        "the same compare command with --resume instead of --overwrite keeps the finished lora run "
        "and trains full from the start"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.yaml").write_text("{}\n")
    (tmp_path / "full" / "checkpoint.safetensors").write_bytes(b"")
    assert after_interrupt(tmp_path, "full", overwrite=True) == (
        "the full run stopped; the same compare command with --resume instead of --overwrite continues it"
    )


def test_ctrl_c_before_overwrite_replaced_the_old_run_says_it_was_put_back(tmp_path):
    """Ctrl-C while `train --overwrite` sets up puts the old run back; advising --resume would continue
    the run the user asked to replace."""
    from imdb_lora.runs.compare import after_interrupt, run_fingerprint

    old = tmp_path / "lora"
    old.mkdir()
    for name in ("config.yaml", "checkpoint.safetensors", "run.json"):
        (old / name).write_text("x")  # an interrupted, resumable run
    before = run_fingerprint(old)
    aside = tmp_path / ".lora.aside"
    old.rename(aside)  # what train --overwrite does first, and undoes when its setup is cut short
    aside.rename(old)
    assert after_interrupt(tmp_path, "lora", overwrite=True, before=before) == (
        "the lora run stopped during its setup and the old lora run was put back as it was; "
        "run the same compare command again to replace it"
    )
    time.sleep(0.01)
    (old / "run.json").write_text("y")  # the new run got as far as writing its own status
    assert "continues it" in after_interrupt(tmp_path, "lora", overwrite=True, before=before)


def test_sigterm_to_compare_alone_is_passed_on_to_the_training_child(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM to compare's own process (not its group, as Ctrl-C reaches) killed compare
    at once and left the child training on, unseen; now compare passes it on, waits for the child to
    leave its run resumable, says so and exits 143."""
    events = []

    class TrainingChild:
        def __init__(self, argv, env):
            self.run = Path(argv[argv.index("--output-dir") + 1])
            self.stopped = False

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def poll(self) -> int | None:
            return 143 if self.stopped else None

        def terminate(self) -> None:
            events.append("terminate")
            self.stopped = True

        def wait(self) -> int:
            events.append("wait")
            if len(events) == 1:  # SIGTERM to compare while the child trains
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises at once: never slept through
            assert self.stopped, "compare waited on a child it had not passed SIGTERM on to"
            self.run.mkdir(parents=True)  # the child leaves its run resumable
            (self.run / "config.yaml").write_text("{}\n")
            (self.run / "checkpoint.safetensors").write_bytes(b"")
            return 143

    monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(Popen=TrainingChild))
    with sigterm_fails_the_test():
        assert main(["compare", "--output-dir", str(tmp_path / "cmp"), "--epochs", "1"]) == 143
    assert events == ["wait", "terminate", "wait"]
    assert (
        "imdb-lora: stopped by SIGTERM; the lora run stopped; the same compare command with --resume "
        "continues it" in capsys.readouterr().err
    )


def interrupt_compare(args: list[str], log: Path, ready, hold: tuple[str, Path] | None = None) -> str:
    """A real `imdb-lora compare` in its own process group, sent SIGINT (as a terminal's Ctrl-C) once
    `ready()` holds; it must exit 130. `hold`: (method, file) for conftest.hold_train_at, the train
    children waiting there for the signal. Returns what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if hold is not None:
        env = hold_train_at(*hold, env)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imdb_lora", *args],
            env=env,
            stdout=f,
            stderr=f,
            start_new_session=True,
            preexec_fn=sigint_as_in_a_terminal,
        )
    try:
        wait_running_until(proc, ready, poll=0.002)
        assert proc.poll() is None, f"compare ended before Ctrl-C: {log.read_text()[-2000:]}"
        assert ready(), f"compare was not ready for Ctrl-C in 300 s: {log.read_text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text()


@pytest.mark.slow
def test_real_ctrl_c_then_resume(tiny_models, imdb_dir, tmp_path, train_in_this_process):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during the LoRA run of a real
    two-process compare leaves that run resumable; compare --resume then finishes both."""
    data = write_imdb(tmp_path / "imdb48", per_class=48, seed=1)  # 18 steps an epoch at batch 4
    out = tmp_path / "cmp"
    flags = compare_flags(tiny_models, data, "--batch-size", "4", "--checkpoint-every", "2", "--epochs", "2")
    compare = ["compare", "--output-dir", str(out), *flags]
    held = tmp_path / "held"  # the LoRA child waits after its 3rd step (a checkpoint at step 2) for Ctrl-C
    text = interrupt_compare(compare, tmp_path / "compare.log", held.exists, ("_after_step:3", held))
    assert "the lora run stopped; the same compare command with --resume continues it" in text
    assert json.loads((out / "lora" / "run.json").read_text())["status"] != "finished"
    assert RunDir(out / "lora").is_resumable() and not (out / "full").exists()

    assert main([*compare, "--resume"]) == 0
    lora, full = train_in_this_process
    assert lora[:2] == ["--method", "lora"] and lora[-1] == "--resume"
    assert full[:2] == ["--method", "full"] and "--resume" not in full
    assert {json.loads((out / m / "run.json").read_text())["status"] for m in ("lora", "full")} == {
        "finished"
    }


@pytest.mark.slow
def test_real_ctrl_c_before_the_first_checkpoint_says_to_run_again(tiny_models, tmp_path):
    """Ctrl-C during the LoRA run's setup, its folder made (before any step: a Ctrl-C in the steps
    would write a checkpoint at the step reached): the child removes the folder, and compare does not
    promise a --resume. The child is held in its model loading until the signal comes: setup lasts
    ~0.08 s from the folder's appearing, and this test, sending Ctrl-C when it saw the folder, failed
    under load, its signal landing in the steps."""
    data = write_imdb(tmp_path / "imdb48", per_class=48, seed=1)
    out = tmp_path / "cmp"
    flags = compare_flags(tiny_models, data, "--batch-size", "4", "--checkpoint-every", "0")
    compare = ["compare", "--output-dir", str(out), *flags]
    held = tmp_path / "held"

    def in_setup() -> bool:  # held in the model loading, the folder made and its settings written
        return held.exists() and (out / "lora" / "config.yaml").is_file()

    text = interrupt_compare(compare, tmp_path / "compare.log", in_setup, ("_setup_model", held))
    assert "nothing of it to resume; run the same compare command again" in text, text[-2000:]
    assert "--resume continues it" not in text
    assert not (out / "lora").exists() and not (out / "full").exists()


@pytest.mark.parametrize("arm", [None, "full"])
def test_the_full_arm_does_not_call_the_lora_arms_flags_inert(tmp_path, capsys, monkeypatch, arm):
    """compare gives both arms the user's --lora-r; the full one said '--lora-r: no effect with --method
    full', noise under compare. A train typed by hand still says it. (Before the model is looked for.)"""
    from imdb_lora.cli import main
    from imdb_lora.config import COMPARE_ARM_ENV
    from imdb_lora.runs import compare as compare_mod

    seen = []

    class Child:  # the child train, as compare starts it: only its environment matters here
        def __init__(self, args, env):
            seen.append(env.get(COMPARE_ARM_ENV))

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *a: None  # noqa: E731
        wait = lambda self: 0  # noqa: E731

    with monkeypatch.context() as m:  # subprocess is shared: patched only while the child is started
        m.setattr(compare_mod.subprocess, "Popen", Child)
        compare_mod.train_method("full", tmp_path / "full", ["--lora-r", "4"], None, "fresh")
    assert seen == ["full"]
    if arm:
        monkeypatch.setenv(COMPARE_ARM_ENV, arm)
    out = ["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "run")]
    assert main(["train", "--method", "full", "--lora-r", "4", *out]) == 2
    assert ("--lora-r: no effect with --method full" in capsys.readouterr().err) is (arm is None)


@pytest.mark.parametrize("content", [b"[1]\n", b"3\n", b"\xff\xfe\n", b"{\n"])
def test_a_damaged_metrics_file_is_one_line(tmp_path, content):
    """compare reads each run's metrics.jsonl for its table: a row that is no object, or bytes that are
    not UTF-8, came out as a traceback (TypeError in the table, UnicodeDecodeError in the reading)."""
    from imdb_lora.errors import UserError
    from imdb_lora.runs.rundir import RunDir

    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1, "train_seconds": 1.0}\n' + content)
    with pytest.raises(UserError, match=r"metrics\.jsonl: not one JSON object per line \("):
        RunDir(tmp_path).read_metrics()


def test_an_arms_train_names_its_rate_by_the_flag_the_user_typed(tmp_path, capsys, monkeypatch):
    """compare passes --lora-lr's (--full-lr's) rate to the arm's train as --lr; the child's refusals (a
    diverging training's `try a lower --lr`) named --lr, a flag the user never typed. Here a refusal the
    child makes before anything is looked for: its rate is named as typed, and only where compare set it."""
    from imdb_lora.cli import main
    from imdb_lora.config import COMPARE_ARM_ENV, COMPARE_LR_ENV
    from imdb_lora.runs import compare as compare_mod

    seen = []

    class Child:  # the child train, as compare starts it: only its environment matters here
        def __init__(self, args, env):
            seen.append((env.get(COMPARE_ARM_ENV), env.get(COMPARE_LR_ENV)))

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *a: None  # noqa: E731
        wait = lambda self: 0  # noqa: E731

    with monkeypatch.context() as m:  # subprocess is shared: patched only while the child is started
        m.setattr(compare_mod.subprocess, "Popen", Child)
        m.setenv(COMPARE_LR_ENV, "--full-lr")  # an outer compare's: not passed on where no rate is set
        compare_mod.train_method("lora", tmp_path / "lora", [], 0.01, "fresh")
        compare_mod.train_method("full", tmp_path / "full", [], None, "fresh")
    assert seen == [("lora", "--lora-lr"), ("full", None)]
    args = ["train", "--weight-decay", "500", "--lr", "0.01", "--output-dir", str(tmp_path / "run")]
    monkeypatch.setenv(COMPARE_ARM_ENV, "lora")
    monkeypatch.setenv(COMPARE_LR_ENV, "--lora-lr")
    assert main(args) == 2
    assert "--weight-decay 500 times --lora-lr 0.01 must be below 1" in capsys.readouterr().err
    monkeypatch.delenv(COMPARE_ARM_ENV)  # a train typed by hand: the variable alone names nothing
    assert main(args) == 2
    assert "--weight-decay 500 times --lr 0.01 must be below 1" in capsys.readouterr().err
