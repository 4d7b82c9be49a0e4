"""Ctrl-C or SIGTERM during the training loop finishes the step in flight and writes the resume
checkpoint at that step (not only at the last multiple of --checkpoint-every), then stops as before;
`--resume` then ends exactly as the uncut run. A second Ctrl-C stops at once, the last checkpoint kept
and nothing half-written. The signals are real (sent to this process from inside a step or a
checkpoint write); the child-process test is in test_overwrite_and_interrupt.py."""

import json
import os
import re
import signal

import pytest
import torch
from conftest import sigterm_fails_the_test, train_args

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training import checkpoint
from imdb_lora.training.progress import saved_step
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
TIMINGS = ("train_seconds", "eval_seconds")
STOP_AT = 7  # 5 steps an epoch (36 reviews, batch 8), 10 in all: epoch 2's second step
LAST_PERIODIC = 5  # with --checkpoint-every 3: epoch 1's end (epoch 2's next would be step 8)


def args(tiny_models, imdb_dir, out, batching: str) -> list[str]:
    return train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "3", "--batching", batching)


@pytest.fixture(scope="module")
def uncut(tiny_models, imdb_dir, tmp_path_factory):
    """batching -> the same run trained without a stop."""
    runs = {}

    def get(batching: str):
        if batching not in runs:
            out = tmp_path_factory.mktemp("uncut") / batching
            assert main(args(tiny_models, imdb_dir, out, batching)) == 0
            runs[batching] = out
        return runs[batching]

    return get


@pytest.fixture
def ctrl_c_taken():
    """SIGINT raising KeyboardInterrupt, as in a terminal's foreground job (whatever pytest's worker has)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def signals_in_step(monkeypatch, at: int, *sigs: signal.Signals) -> None:
    """Send `sigs` to this process at the start of global step `at`, before its forward runs."""
    real = Trainer._step

    def step(self, idx):
        if self.state.global_step + 1 == at:
            for sig in sigs:
                os.kill(os.getpid(), sig)
        return real(self, idx)

    monkeypatch.setattr(Trainer, "_step", step)


def stop_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def assert_resumes_to(uncut_run, out, capsys, at: int) -> None:
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert f"at epoch 2, step {at - 5}" in capsys.readouterr().out
    assert RunDir(out).status() == "finished"
    assert metrics(out) == metrics(uncut_run)
    a = Classifier.load(str(uncut_run)).logits(TEXTS)
    b = Classifier.load(str(out)).logits(TEXTS)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sig,batching",
    [(signal.SIGTERM, "auto"), (signal.SIGTERM, "flat"), (signal.SIGINT, "auto")],
    ids=["SIGTERM", "SIGTERM-flat", "SIGINT"],
)
def test_a_signal_mid_step_saves_at_the_step_reached_and_resume_equals_the_uncut_run(
    sig, batching, uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys, ctrl_c_taken
):
    """Before, the signal raised inside step 7 and the run kept its checkpoint of step 5 (epoch 1's
    end): step 7's work was lost, and with the default --checkpoint-every up to 200 steps were."""
    uncut_run = uncut(batching)
    signals_in_step(monkeypatch, STOP_AT, sig)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, batching)) == 128 + sig
    what = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    assert stop_line(capsys) == (
        f"imdb-lora: {what}; training was at step {STOP_AT} of 10; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step {STOP_AT}); continue it with: "
        f"imdb-lora train --output-dir {out} --resume"
    )
    assert saved_step(out / "checkpoint.safetensors") == STOP_AT
    assert not list(out.glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    monkeypatch.undo()
    assert_resumes_to(uncut_run, out, capsys, STOP_AT)


@pytest.mark.parametrize("where", ["step", "save"])
def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(
    where, uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys, ctrl_c_taken
):
    """SIGTERM, then Ctrl-C while the step finishes (before it is counted) or while its checkpoint is
    written (after the temporary file is complete, before the rename): the run stops there, as a single
    signal stopped it before; the checkpoint of step 5 stays whole and no temporary is left."""
    armed = {"save": False}
    if where == "step":
        signals_in_step(monkeypatch, STOP_AT, signal.SIGTERM, signal.SIGINT)
    else:
        signals_in_step(monkeypatch, STOP_AT, signal.SIGTERM)
        real_step = Trainer._step

        def arm(self, idx):
            armed["save"] = self.state.global_step + 1 == STOP_AT or armed["save"]
            return real_step(self, idx)

        save_file = checkpoint.save_file

        def then_ctrl_c(*a, **kw):
            save_file(*a, **kw)
            if armed["save"]:
                armed["save"] = False
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(Trainer, "_step", arm)
        monkeypatch.setattr(checkpoint, "save_file", then_ctrl_c)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, "auto")) == 130
    at = STOP_AT if where == "save" else STOP_AT - 1  # the step in flight is counted once it has run
    assert stop_line(capsys) == (
        f"imdb-lora: interrupted; training was at step {at} of 10; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step {LAST_PERIODIC}); continue it with: "
        f"imdb-lora train --output-dir {out} --resume"
    )
    assert not armed["save"] and sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.safetensors"]
    assert saved_step(out / "checkpoint.safetensors") == LAST_PERIODIC
    monkeypatch.undo()
    assert_resumes_to(uncut("auto"), out, capsys, LAST_PERIODIC)


def test_a_stop_with_no_checkpoint_yet_leaves_a_run_to_resume(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """--checkpoint-every 0 and a SIGTERM in epoch 1: before, nothing was left (the folder removed)."""
    signals_in_step(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "0")) == 143
    assert stop_line(capsys).endswith(
        f"(step 2); continue it with: imdb-lora train --output-dir {out} --resume"
    )
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"


def test_a_stop_in_an_epochs_last_step_saves_before_its_evaluation_and_resumes_exactly(
    uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    """SIGTERM in step 5, epoch 1's last: the loop ends with the step, the checkpoint records the
    epoch's steps all done and its evaluation not, and --resume evaluates it and goes on as uncut."""
    signals_in_step(monkeypatch, LAST_PERIODIC, signal.SIGTERM)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, "auto")) == 143
    assert stop_line(capsys).endswith(
        f"(step {LAST_PERIODIC}); continue it with: imdb-lora train --output-dir {out} --resume"
    )
    assert saved_step(out / "checkpoint.safetensors") == LAST_PERIODIC
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert RunDir(out).status() == "finished"
    assert metrics(out) == metrics(uncut("auto"))
    assert torch.equal(
        Classifier.load(str(uncut("auto"))).logits(TEXTS), Classifier.load(str(out)).logits(TEXTS)
    )
