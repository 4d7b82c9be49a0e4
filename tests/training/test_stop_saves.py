"""Ctrl-C or SIGTERM during the training loop finishes the step in flight and writes the resume
checkpoint at that step (not only at the last multiple of --checkpoint-every), then stops as before;
during an epoch's evaluation it ends the pass after its batch in flight and writes the checkpoint of
the epoch's steps (the raw weights, the evaluation left to --resume); after the evaluation it finishes
the epoch's record and its checkpoint. `--resume` then ends exactly as the uncut run. A second Ctrl-C
stops at once, the last checkpoint kept and nothing half-written. The signals are real (sent to this
process from inside a step, an evaluation batch or a write; capfd where the first signal's line, written
to fd 2 by the handler, is checked); the child-process test is in test_overwrite_and_interrupt.py."""

import json
import os
import re
import signal

import pytest
import torch
from conftest import sigterm_fails_the_test, train_args
from safetensors import safe_open
from safetensors.torch import load_file

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier
from imdb_lora.modeling import forward
from imdb_lora.runs.rundir import RunDir
from imdb_lora.training import checkpoint
from imdb_lora.training.progress import saved_step
from imdb_lora.training.stopping import STEPS, StopAtStepBoundary
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
TIMINGS = ("train_seconds", "eval_seconds")
STOP_AT = 7  # 5 steps an epoch (36 reviews, batch 8), 10 in all: epoch 2's second step
LAST_PERIODIC = 5  # with --checkpoint-every 3: epoch 1's end (epoch 2's next would be step 8)


def args(tiny_models, imdb_dir, out, batching: str, *extra: str) -> list[str]:
    return train_args(
        tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "3", "--batching", batching, *extra
    )


@pytest.fixture(scope="module")
def uncut(tiny_models, imdb_dir, tmp_path_factory):
    """(batching, extra flags) -> the same run trained without a stop."""
    runs = {}

    def get(batching: str, *extra: str):
        if (batching, extra) not in runs:
            out = tmp_path_factory.mktemp("uncut") / batching
            assert main(args(tiny_models, imdb_dir, out, batching, *extra)) == 0
            runs[batching, extra] = out
        return runs[batching, extra]

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


EVAL = ("--eval-batch-size", "4")  # 12 validation reviews: 3 batches a pass, so a stop lands inside one
EMA = ("--ema-decay", "0.7")


def signals_in_eval(monkeypatch, epoch: int, name: str, *sigs: signal.Signals) -> dict:
    """Send `sigs` to this process inside the first batch's forward of the evaluation pass `name` in
    `epoch`; the returned dict counts the forward batches run after that one (`after`)."""
    real_eval, real_forward = Trainer.eval_logits, forward.forward_logits
    seen = {"armed": False, "sent": False, "after": 0}

    def eval_logits(self, seqs, pass_name, *rest):
        seen["armed"] = self.state.epoch == epoch and pass_name == name and not seen["sent"]
        return real_eval(self, seqs, pass_name, *rest)

    def forward_logits(*a, **kw):
        seen["after"] += seen["sent"]
        if seen["armed"]:
            seen["armed"], seen["sent"] = False, True
            for sig in sigs:
                os.kill(os.getpid(), sig)
        return real_forward(*a, **kw)

    monkeypatch.setattr(Trainer, "eval_logits", eval_logits)
    monkeypatch.setattr(forward, "forward_logits", forward_logits)
    return seen


def progress(path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["progress"])


def resume_to_the_uncut_run(uncut_run, out, capture, epoch: int, step: int) -> None:
    capture.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert f"at epoch {epoch}, step {step}\n" in capture.readouterr().out
    assert RunDir(out).status() == "finished"
    assert metrics(out) == metrics(uncut_run)
    assert torch.equal(Classifier.load(str(uncut_run)).logits(TEXTS), Classifier.load(str(out)).logits(TEXTS))


@pytest.mark.parametrize(
    "sig,epoch,name,batching,extra",
    [
        (signal.SIGTERM, 2, "validation", "auto", EVAL),
        (signal.SIGTERM, 2, "validation", "flat", EVAL),  # the LoRA merged into the base for the pass
        (signal.SIGINT, 1, "test", "auto", EVAL),
        (signal.SIGTERM, 2, "validation (EMA)", "auto", EVAL + EMA),  # the average swapped in
    ],
    ids=["SIGTERM-val", "SIGTERM-val-flat", "SIGINT-test-epoch1", "SIGTERM-ema-val"],
)
def test_a_stop_during_the_evaluation_saves_the_epochs_steps_and_resume_equals_the_uncut_run(
    sig,
    epoch,
    name,
    batching,
    extra,
    uncut,
    tiny_models,
    imdb_dir,
    tmp_path,
    monkeypatch,
    capfd,
    ctrl_c_taken,
):
    """Before, the signal raised inside the evaluation and the run kept its last checkpoint (step 8, or
    step 3 in epoch 1): the steps since were lost, with the default --checkpoint-every 200 usually the
    whole epoch's (a GPU session's epoch, when scripts/gpu-checks.sh cuts a run by SIGTERM). Now the pass ends after its
    batch in flight and the checkpoint holds the epoch's steps, its evaluation left to --resume, with
    the raw trained weights (not the average swapped in for an EMA pass)."""
    uncut_run = uncut(batching, *extra)
    seen = signals_in_eval(monkeypatch, epoch, name, sig)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, batching, *extra)) == 128 + sig
    at = 5 * epoch
    err = capfd.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    what = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    assert "Traceback" not in err and lines[-1] == (
        f"imdb-lora: {what}; training was at step {at} of 10; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step {at}); continue it with: "
        f"imdb-lora train --output-dir {out} --resume"
    )
    assert seen["sent"] and seen["after"] == 0  # the pass ended with the batch it was in
    saved = progress(out / "checkpoint.safetensors")
    assert (saved["epoch"], saved["step_in_epoch"], len(saved["history"])) == (epoch, 5, epoch - 1)
    assert "ending the evaluation after its batch in flight" in err  # the first signal's line
    assert len(metrics(out)) == epoch - 1 if epoch > 1 else not (out / "metrics.jsonl").exists()
    assert not list(out.glob("*.tmp")) and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if epoch == 2:  # the last steps' weights, moments and average: the uncut run's final checkpoint's
        a, b = load_file(out / "checkpoint.safetensors"), load_file(uncut_run / "checkpoint.safetensors")
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("param/", "opt/", "ema/")))
    monkeypatch.undo()
    resume_to_the_uncut_run(uncut_run, out, capfd, epoch, 5)


def test_a_second_ctrl_c_during_the_evaluation_stops_save_keeps_the_last_checkpoint(
    uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capfd, ctrl_c_taken
):
    """SIGTERM in epoch 2's validation, then Ctrl-C while the checkpoint of its steps is written (the
    temporary complete, before the rename): the run stops there; the checkpoint of step 8 stays whole."""
    signals_in_eval(monkeypatch, 2, "validation", signal.SIGTERM)
    save_file, calls = checkpoint.save_file, []

    def then_ctrl_c(*a, **kw):
        save_file(*a, **kw)
        calls.append(1)
        if len(calls) == 4:  # steps 3, 5 (epoch 1's end) and 8 were the first three
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint, "save_file", then_ctrl_c)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, "auto", *EVAL)) == 130
    assert stop_line(capfd) == (
        f"imdb-lora: interrupted; training was at step 10 of 10; its last checkpoint is "
        f"{out / 'checkpoint.safetensors'} (step 8); continue it with: "
        f"imdb-lora train --output-dir {out} --resume"
    )
    assert len(calls) == 4 and sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.safetensors"]
    assert saved_step(out / "checkpoint.safetensors") == 8
    monkeypatch.undo()
    resume_to_the_uncut_run(uncut("auto", *EVAL), out, capfd, 2, 3)


def test_a_stop_after_the_evaluation_finishes_the_epochs_checkpoint(
    uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capfd
):
    """SIGTERM while epoch 1's row is written (its evaluation over, its adapter saved): before, the run
    stopped there with the checkpoint of step 3; now it writes epoch 1's checkpoint and stops, and
    --resume starts epoch 2 without evaluating epoch 1 again or appending its row twice."""
    real, sent = RunDir.write_metrics, []

    def write_metrics(self, history):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        real(self, history)

    monkeypatch.setattr(RunDir, "write_metrics", write_metrics)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, "auto", *EVAL)) == 143
    err = capfd.readouterr().err
    assert err.rstrip().endswith(
        f"training was at step 5 of 10; its last checkpoint is {out / 'checkpoint.safetensors'} (step 5); "
        f"continue it with: imdb-lora train --output-dir {out} --resume"
    )
    saved = progress(out / "checkpoint.safetensors")
    assert (saved["epoch"], saved["step_in_epoch"], len(saved["history"])) == (2, 0, 1)
    assert "SIGTERM: finishing the epoch's record and its checkpoint, then stopping" in err
    monkeypatch.undo()
    resume_to_the_uncut_run(uncut("auto", *EVAL), out, capfd, 2, 0)


def test_a_stop_in_the_evaluation_after_a_last_step_stop_writes_no_second_checkpoint(
    uncut, tiny_models, imdb_dir, tmp_path, monkeypatch, capfd
):
    """A stop in epoch 1's last step saved its steps; the resumed run, stopped again in that epoch's
    evaluation, already has that checkpoint: nothing is written, the line names it, --resume goes on."""
    signals_in_step(monkeypatch, LAST_PERIODIC, signal.SIGTERM)
    out = tmp_path / "r"
    with sigterm_fails_the_test():
        assert main(args(tiny_models, imdb_dir, out, "auto", *EVAL)) == 143
    monkeypatch.undo()
    signals_in_eval(monkeypatch, 1, "validation", signal.SIGTERM)
    writes = []
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **kw: writes.append(a))
    capfd.readouterr()
    with sigterm_fails_the_test():
        assert main(["train", "--output-dir", str(out), "--resume"]) == 143
    err = capfd.readouterr().err
    assert "ending the evaluation after its batch in flight" in err and not writes
    assert err.rstrip().endswith(
        f"(step {LAST_PERIODIC}); continue it with: imdb-lora train --output-dir {out} --resume"
    )
    monkeypatch.undo()
    resume_to_the_uncut_run(uncut("auto", *EVAL), out, capfd, 1, 5)


@pytest.mark.parametrize(
    "env, again",
    [
        ({}, "Ctrl-C again stops at once"),
        ({"TORCHELASTIC_RUN_ID": "x"}, "under torchrun, Ctrl-C again does not stop it sooner"),
    ],
    ids=["one-process", "torchrun"],
)
def test_the_first_signals_line_says_what_ctrl_c_again_does(env, again, monkeypatch, capfd):
    """Under torchrun a terminal's second Ctrl-C reaches torchrun alone, which passes SIGTERM on (ignored
    while stopping) and kills the processes 30 s later: the line promised a stop at once there too."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    StopAtStepBoundary()._handle(signal.SIGINT, None)
    assert capfd.readouterr().err == f"\nimdb-lora: Ctrl-C: {STEPS}, then stopping ({again})\n"
