"""`train --max-steps N` and `--max-time DURATION`: a budget cuts training at a step boundary, the cut
epoch is evaluated like a full one (its row says how many steps it trained), and the run finishes as a
complete run directory saying what ended it (run.json `ended_by`). The tiny runs take 5 steps an epoch
(36 train reviews, batch 8), 10 in all with train_args' 2 epochs."""

import json
import os
import signal

import pytest
import torch
import yaml
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config, duration_seconds
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training.schedule import lr_at
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
LR = 3e-3  # train_args' --lr
TIMINGS = ("train_seconds", "eval_seconds")


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def figures(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows(run)]


def finished(run) -> dict:
    status = RunDir(run).read_status()
    assert status["status"] == "finished"
    assert (run / "calibration.json").is_file() and (run / "results.md").is_file()
    return status


@pytest.fixture(scope="module")
def capped(tiny_models, imdb_dir, tmp_path_factory):
    """--max-steps 7: the same run trained without a stop, shared by the tests that compare to it."""
    out = tmp_path_factory.mktemp("capped") / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--max-steps", "7")) == 0
    return out


def test_max_steps_inside_an_epoch_evaluates_the_cut_epoch_and_finishes(capped, capsys):
    status = finished(capped)
    assert (status["ended_by"], status["steps_done"], status["total_steps"]) == ("max_steps", 7, 7)
    assert status["epochs_done"] == 2 and status["max_steps"] == 7
    first, cut = rows(capped)
    assert "steps" not in first  # a whole epoch
    assert (cut["steps"], cut["steps_in_epoch"], cut["train_reviews"]) == (2, 5, 16)
    assert "test_accuracy" in cut and "val_accuracy" in cut  # evaluated like a full epoch
    # the schedule laid over 7 steps: the last step's rate is the one a 7-step run ends on
    assert first["lr_end"] == pytest.approx(lr_at(4, 7, LR, 0.06))
    assert cut["lr_end"] == pytest.approx(lr_at(6, 7, LR, 0.06)) and cut["lr_end"] < LR / 5
    results = (capped / "results.md").read_text()
    assert "| 2 (2 of 5 steps)" in results
    assert "| Training ended by | --max-steps 7 (step 7 of 7) |" in results
    assert yaml.safe_load((capped / "config.yaml").read_text())["train"]["max_steps"] == 7
    assert "; 2 epochs (cut by --max-steps 7 at step 7), batch 8" in (capped / "README.md").read_text()


@pytest.mark.parametrize(
    "cap,epochs,ended,lr_step",
    [("5", 1, "max_steps", 4), ("10", 2, "epochs", 9), ("100", 2, "epochs", 9)],
    ids=["epoch-boundary", "exactly-the-epochs", "beyond-the-epochs"],
)
def test_max_steps_at_an_epoch_boundary_or_beyond(
    cap, epochs, ended, lr_step, tiny_models, imdb_dir, tmp_path, capsys
):
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--max-steps", cap, "--no-calibration")) == 0
    done = capsys.readouterr().out.splitlines()[-2]
    status = RunDir(out).read_status()
    assert status["status"] == "finished" and status["ended_by"] == ended
    total = min(int(cap), 10)
    assert (status["epochs_done"], status["steps_done"], status["total_steps"]) == (epochs, total, total)
    assert all("steps" not in r for r in rows(out))  # whole epochs only
    assert rows(out)[-1]["lr_end"] == pytest.approx(lr_at(lr_step, total, LR, 0.06))
    results = (out / "results.md").read_text()
    if ended == "max_steps":
        assert done.endswith(" | stopped by --max-steps 5 at step 5")
        assert "| Training ended by | --max-steps 5 (step 5 of 5) |" in results
    else:
        assert "stopped by" not in done
        assert f"| Training ended by | the epochs (step 10 of 10); also set: --max-steps {cap} |" in results


def test_max_time_stops_at_the_first_step_past_the_budget_without_rescaling(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """A fake clock: 10 s per step since the command's start, so a 1 min budget is spent at step 6."""
    monkeypatch.setattr(Trainer, "_elapsed", lambda self: 10.0 * self.state.global_step)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--max-time", "1m")) == 0
    captured = capsys.readouterr()
    status = finished(out)
    assert (status["ended_by"], status["steps_done"], status["total_steps"]) == ("max_time", 6, 10)
    assert status["max_time"] == "1m" and status["max_steps"] is None
    first, cut = rows(out)
    assert (cut["steps"], cut["train_reviews"]) == (1, 8)
    assert cut["lr_end"] == pytest.approx(lr_at(5, 10, LR, 0.06))  # the 10-step schedule, not rescaled
    assert "--max-time 1m reached at step 6 (epoch 2, 1 of its 5 steps): evaluating it" in captured.err
    assert captured.out.splitlines()[-2].endswith(" | stopped by --max-time 1m at step 6")
    assert "| Training ended by | --max-time 1m (step 6 of 10) |" in (out / "results.md").read_text()


@pytest.fixture
def ctrl_c_at_step(monkeypatch):
    """SIGINT raising KeyboardInterrupt (as in a terminal), sent at the start of global step `at`."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real = Trainer._step

    def arm(at: int) -> None:
        def step(self, idx):
            if self.state.global_step + 1 == at:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, idx)

        monkeypatch.setattr(Trainer, "_step", step)

    yield arm
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "at,extra",
    [(3, ()), (7, ()), (7, ("--checkpoint-every", "2"))],
    ids=["before-the-cap", "at-the-cap", "at-the-cap-after-a-periodic-checkpoint"],
)
def test_a_ctrl_c_capped_run_resumes_to_the_uncut_capped_run(
    at, extra, capped, ctrl_c_at_step, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """At step 3 the resume trains on to the same cap; at step 7 (the cut step) the stop's checkpoint
    holds the cut, so the resume evaluates the cut epoch and trains nothing more. A budget's --max-time
    may change on --resume (the resumed command's own budget); --max-steps may not (the schedule is
    laid over it). With --checkpoint-every 2 the periodic checkpoint of step 7 is written before the
    cut: the stop writes it again, holding the cut."""
    ctrl_c_at_step(at)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--max-steps", "7", *extra)) == 130
    assert f"training was at step {at} of 7" in capsys.readouterr().err
    monkeypatch.undo()
    resume = ["train", "--output-dir", str(out), "--resume"]
    assert main([*resume, "--max-steps", "8"]) == 2
    assert "--max-steps (train.max_steps: 7 saved, 8 given)" in capsys.readouterr().err
    assert main([*resume, "--max-time", "2h"]) == 0
    status = finished(out)
    assert (status["ended_by"], status["steps_done"], status["max_time"]) == ("max_steps", 7, "2h")
    assert figures(out) == figures(capped)
    assert torch.equal(Classifier.load(str(capped)).logits(TEXTS), Classifier.load(str(out)).logits(TEXTS))
    assert main(resume) == 2  # finished: not resumable, as any finished run
    assert "is already finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--max-steps", "0", "--max-steps must be >= 1 (got 0)"),
        ("--max-steps", "1.5", "--max-steps: expected int, got '1.5'"),
        ("--max-time", "0", "--max-time must be a finite duration above 0 seconds (got '0')"),
        ("--max-time", "1d", "--max-time must be a duration: seconds (90, 90s) or a number with h, m, s"),
        ("--max-time", "30m1h", "--max-time must be a duration:"),
    ],
)
def test_budget_flags_refuse_bad_values_in_one_line(flag, value, message, tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90", 90),
        ("90s", 90),
        ("2.5", 2.5),
        ("30m", 1800),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("1h0m30s", 3630),
    ],
)
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


def test_budgets_round_trip_through_config_yaml(tmp_path):
    cfg = Config()
    cfg.train.max_steps, cfg.train.max_time = 7, "1h30m"
    path = tmp_path / "config.yaml"
    cfg.validate().save(path)
    again = Config.load(path, flag=None).validate()
    assert (again.train.max_steps, again.train.max_time) == (7, "1h30m")
    path.write_text("train:\n  max_time: 90\n")  # a YAML number is seconds
    assert Config.load(path, flag=None).validate().train.max_time == "90"
    path.write_text("train:\n  max_time: 2d\n")
    with pytest.raises(UserError, match="--max-time must be a duration"):
        Config.load(path, flag=None).validate()


class FakeDist:
    """A data-parallel rank: agree_on_stop returns the MAX of this rank's value and the others'."""

    def __init__(self, rank: int, others: int):
        self.enabled, self.main, self.others, self.passed = True, rank == 0, others, []

    def agree_on_stop(self, value: int) -> int:
        self.passed.append(value)
        return max(value, self.others)


@pytest.mark.parametrize(
    "rank,elapsed,others,up",
    [(0, 61.0, 0, True), (0, 59.0, 0, False), (1, 61.0, 0, False), (1, 0.0, 1, True)],
    ids=["rank0-over", "rank0-under", "rank1-own-clock-ignored", "rank1-follows-rank0"],
)
def test_under_torchrun_rank_0s_clock_decides_for_every_rank(rank, elapsed, others, up):
    """Every rank stops after the same step: rank 0's clock is passed to the others by the stop's
    collective (a rank's own clock, a little ahead or behind, never decides alone)."""
    trainer = Trainer.__new__(Trainer)
    trainer.dist = FakeDist(rank, others)
    trainer.time_budget = 60.0
    trainer._elapsed = lambda: elapsed
    assert trainer._time_is_up() is up
    assert trainer.dist.passed == [int(rank == 0 and elapsed >= 60)]


def test_compare_passes_the_budget_to_each_run():
    """compare's train flags are parsed as train's and each method trains in a `train` command of its
    own: the budget is each run's, --max-time counted from that run's start (README says so)."""
    from imdb_lora.cli.compare import method_configs

    configs = method_configs(["--max-steps", "7", "--max-time", "30m"], {"lora": None, "full": None})
    assert {(c.train.max_steps, c.train.max_time) for c in configs.values()} == {(7, "30m")}
    with pytest.raises(UserError, match="--max-time must be a duration"):
        method_configs(["--max-time", "soon"], {"lora": None, "full": None})
