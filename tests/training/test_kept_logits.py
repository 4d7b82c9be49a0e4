"""Calibration reads the kept weights' logits from the epoch evaluation that chose them, and they are the
logits a second evaluation of those weights gives: bit for bit, on every evaluation path, raw or EMA
weights kept, in the last epoch or an earlier one (restored from disk). Where they are not in memory (a
resume past the kept epoch, data-parallel shards) the kept checkpoint is evaluated again, as before."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import train_args

import imdb_lora.training.trainer as trainer_module
from imdb_lora.cli import main
from imdb_lora.training import posthoc
from imdb_lora.training.posthoc import KeptLogits
from imdb_lora.training.trainer import Trainer

SMALL = ("--max-eval-samples", "12", "--eval-batch-size", "4")
KEPT_PASSES = ["validation, kept checkpoint", "test, kept checkpoint"]


def steer(monkeypatch, kept: str, best: str) -> None:
    """Validation accuracies that make `kept` (raw | ema) weights of epoch `best` (last | earlier, of 2)
    the ones kept; the logits, and so the calibration, stay the real ones."""
    rising = {e: e if best == "last" else 3 - e for e in (1, 2)}
    steer_figures(monkeypatch, {e: (r, r + (10 if kept == "ema" else 0)) for e, r in rising.items()})


def steer_figures(monkeypatch, figures: dict[int, tuple[float, float]]) -> None:
    """Each epoch's validation accuracy as given, (raw weights', the average's): they decide what is kept."""
    real = Trainer.evaluate

    def steered(self, seqs, labels, name, after_batch=None):
        loss, acc, logits = real(self, seqs, labels, name, after_batch)
        if name.startswith("validation"):
            acc = figures[self.state.epoch]["EMA" in name]
        return loss, acc, logits

    monkeypatch.setattr(Trainer, "evaluate", steered)


def count_passes(monkeypatch, logits: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The name of every evaluation pass the trainer runs, in order (and into `logits`, each name's last
    logits)."""
    names: list[str] = []
    real = Trainer.eval_logits

    def counted(self, seqs, name, after_batch=None):
        names.append(name)
        out = real(self, seqs, name, after_batch)
        if logits is not None:
            logits[name] = out
        return out

    monkeypatch.setattr(Trainer, "eval_logits", counted)
    return names


def calibrated_twice(monkeypatch, model, data, out, *extra: str) -> dict:
    """Train with `extra` flags, after_training run twice on the finished trainer: first as it does now (the
    epoch's logits, no pass), then the old way (kept_logits dropped: the kept checkpoint restored and
    evaluated again). Everything it writes must be the same: calibration.json, run.json's
    `calibration`, the bins, and the logits themselves, bit for bit. Returns the run's run.json."""
    logits: dict[str, torch.Tensor] = {}
    passes = count_passes(monkeypatch, logits)
    seen = {}

    def reused_then_evaluated(tr):
        start = len(passes)
        seen["kept"] = tr.kept_logits
        reused = posthoc.after_training(tr)
        seen["reused"] = (reused, (tr.run.path / "calibration.json").read_text(), passes[start:])
        tr.kept_logits = None  # the path before: evaluate the kept weights again
        again = posthoc.after_training(tr)
        seen["again"] = (again, (tr.run.path / "calibration.json").read_text(), passes[start:])
        return again

    monkeypatch.setattr(trainer_module, "after_training", reused_then_evaluated)
    assert main(train_args(model, data, out, *SMALL, *extra)) == 0
    info = json.loads((out / "run.json").read_text())
    kept = seen["kept"]
    assert (kept.epoch, kept.weights) == (info["best_epoch"], info["kept_weights"])
    (reused, reused_file, reused_passes), (again, again_file, all_passes) = seen["reused"], seen["again"]
    assert reused_passes == []  # no second pass over validation or test
    read_test = "--no-eval-test-each-epoch" not in extra
    assert all_passes == KEPT_PASSES[: 1 + read_test]  # the forced old path did evaluate
    assert reused.summary == again.summary and reused.bins == again.bins  # exactly: same floats
    assert reused_file == again_file
    assert info["calibration"] == reused.summary["calibration"] and info["calibration"]["temperature"] != 1.0
    # what makes them equal: the logits themselves, bit for bit
    assert torch.equal(kept.val, logits["validation, kept checkpoint"])
    assert torch.equal(kept.test, logits["test, kept checkpoint"]) if read_test else kept.test is None
    return info


@pytest.mark.parametrize(
    "batching,kept,best",
    [
        ("padded", "raw", "earlier"),
        ("padded", "ema", "last"),
        ("packed", "raw", "last"),
        ("packed", "ema", "earlier"),
        ("flat", "raw", "last"),
        ("flat", "raw", "earlier"),
        ("flat", "ema", "last"),
        ("flat", "ema", "earlier"),
    ],
)
def test_reused_logits_are_what_evaluating_the_kept_weights_again_gives(
    tiny_models, imdb_dir, tmp_path, monkeypatch, batching, kept, best
):
    """On every evaluation path, raw or averaged weights kept, from the last epoch or an earlier one."""
    steer(monkeypatch, kept, best)
    ema = ("--ema-decay", "0.5") if kept == "ema" else ()
    info = calibrated_twice(
        monkeypatch, tiny_models("bert"), imdb_dir, tmp_path / "run", "--batching", batching, *ema
    )
    assert (info["kept_weights"], info["best_epoch"]) == (kept, 2 if best == "last" else 1)
    assert info["eval_path"].startswith(batching)


@pytest.mark.parametrize(
    "extra,figures,kept",
    [
        # full fine-tuning: the earlier epoch's whole model restored from model/
        (("--method", "full"), {1: (2, 0), 2: (1, 0)}, (1, "raw")),
        (("--method", "full", "--batching", "flat"), {1: (2, 0), 2: (1, 0)}, (1, "raw")),
        # the average kept in epoch 1, then the raw weights better in epoch 2: their logits replace it
        (("--ema-decay", "0.5"), {1: (1, 5), 2: (6, 2)}, (2, "raw")),
        # the average beats the raw weights in epoch 2 but not epoch 1's: epoch 1's logits stay
        (("--ema-decay", "0.5"), {1: (5, 1), 2: (2, 3)}, (1, "raw")),
        (("--batching", "flat"), {1: (3, 0), 2: (3, 0)}, (1, "raw")),  # a tie keeps the earlier epoch
        # test not read each epoch: validation's logits reused, test neither read nor reported
        (("--ema-decay", "0.5", "--no-eval-test-each-epoch"), {1: (1, 2), 2: (1, 5)}, (2, "ema")),
    ],
)
def test_the_logits_reused_are_the_kept_weights_whichever_epoch_and_weights_won(
    tiny_models, imdb_dir, tmp_path, monkeypatch, extra, figures, kept
):
    steer_figures(monkeypatch, figures)
    info = calibrated_twice(monkeypatch, tiny_models("bert"), imdb_dir, tmp_path / "run", *extra)
    assert (info["best_epoch"], info["kept_weights"]) == kept


def test_a_resume_after_the_kept_epoch_evaluates_it_again_to_the_same_calibration(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    """Epoch 1 kept, the run stopped in epoch 2 and resumed: the resumed process never evaluated epoch
    1's weights, so it restores and evaluates them (the kept-checkpoint passes), and its calibration is
    the uncut run's, which read epoch 1's logits from memory."""
    steer(monkeypatch, "raw", "earlier")
    passes = count_passes(monkeypatch)
    args = ("--checkpoint-every", "1", *SMALL)
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "uncut", *args)) == 0
    assert not set(KEPT_PASSES) & set(passes)

    steps = {"n": 0}

    class Crash(Exception):
        pass

    def crash_in_epoch_2(self):
        steps["n"] += 1
        if self.state.epoch == 2:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_after_step", crash_in_epoch_2)
        with pytest.raises(Crash):
            main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "cut", *args))
    passes.clear()
    assert main(["train", "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert passes[-2:] == KEPT_PASSES
    cut, uncut = (json.loads((tmp_path / d / "calibration.json").read_text()) for d in ("cut", "uncut"))
    assert cut == uncut and cut["epoch"] == 1


def test_data_parallel_epoch_logits_are_not_kept():
    """Each rank evaluates a shard of the split: its logits are no split's, so none are handed on and
    rank 0 evaluates the kept checkpoint alone, as before."""
    dist = SimpleNamespace(
        enabled=True, shard=lambda xs: xs[::2], loss_and_accuracy=lambda logits, y: (0.5, 1.0)
    )
    rank = SimpleNamespace(
        dist=dist, eval_logits=lambda seqs, name, after_batch=None: torch.zeros(len(seqs), 2)
    )
    loss, acc, logits = Trainer.evaluate(rank, [[1]] * 4, [0, 1, 0, 1], "validation")
    assert (loss, acc, logits) == (0.5, 1.0, None)
    assert KeptLogits.of(1, "raw", logits, None) is None
    one = SimpleNamespace(**{**vars(rank), "dist": SimpleNamespace(**{**vars(dist), "enabled": False})})
    assert Trainer.evaluate(one, [[1]] * 4, [0, 1, 0, 1], "validation")[2].shape == (2, 2)


def test_stale_logits_of_another_epoch_are_never_used():
    """Logits of weights that are not the kept ones (another epoch's, or raw where the average was kept)
    are not read: the kept checkpoint is evaluated."""
    evaluated = []
    tr = SimpleNamespace(
        state=SimpleNamespace(best_epoch=2, best_weights="ema"),
        cfg=SimpleNamespace(train=SimpleNamespace(eval_test_each_epoch=False)),
        val_ids=[[0]],
        eval_logits=lambda seqs, name: evaluated.append(name) or torch.ones(1, 2),
    )
    for epoch, weights in ((1, "ema"), (2, "raw")):
        tr.kept_logits = KeptLogits(epoch, weights, torch.zeros(1, 2), None)
        val, test = posthoc.kept_logits(tr)
        assert torch.equal(val, torch.ones(1, 2)) and test is None
    tr.kept_logits = KeptLogits(2, "ema", torch.zeros(1, 2), None)
    assert torch.equal(posthoc.kept_logits(tr)[0], torch.zeros(1, 2))
    assert evaluated == ["validation, kept checkpoint"] * 2


def test_a_stop_during_calibration_resumes_to_the_uncut_runs_calibration(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    """Every epoch done, then Ctrl-C in after_training: the resumed process trains nothing, has no epoch
    logits, evaluates the kept checkpoint and writes the calibration.json the uncut run did."""
    steer(monkeypatch, "raw", "earlier")
    passes = count_passes(monkeypatch)
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "uncut", *SMALL)) == 0

    def stop(tr):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "after_training", stop)
        assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "cut", *SMALL)) == 130
    passes.clear()
    assert main(["train", "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert passes == KEPT_PASSES
    cut, uncut = ((tmp_path / d / "calibration.json").read_bytes() for d in ("cut", "uncut"))
    assert cut == uncut
