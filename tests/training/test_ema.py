"""EMA of the trainable weights: the average itself, beside-the-raw evaluation, what is saved, resume."""

import json

import pytest
import torch
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier
from imdb_lora.modeling.forward import batched_logits
from imdb_lora.training.ema import Ema
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]
TIMING = ("train_seconds", "eval_seconds")


def rows(run) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out]


def test_average_is_bias_corrected_and_swapped_in_and_out():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = Ema(model, decay=0.75)  # not 0.5, where decay and 1 - decay (the weight of the new value) agree
    seen = []
    for value in (1.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(value)
        ema.update()
    # weights 0.75 * 1 + 1 * 3 over 1.75 (decay 0.75, bias-corrected): 2.142857...
    expected = (0.75 * seen[0] + seen[1]) / 1.75
    with ema.applied():
        assert torch.allclose(model.weight, torch.full_like(model.weight, expected))
    assert torch.equal(model.weight, torch.full_like(model.weight, 3.0))  # raw weights back
    state = ema.state_dict()
    other = Ema(model, decay=0.75)
    other.load_state_dict(state)
    assert other.steps == 2 and torch.equal(other.averaged()[0], ema.averaged()[0])


def test_ema_is_evaluated_beside_raw_weights_without_changing_them(tiny_models, imdb_dir, tmp_path):
    model = tiny_models("bert")
    assert main(train_args(model, imdb_dir, tmp_path / "plain")) == 0
    assert main(train_args(model, imdb_dir, tmp_path / "ema", "--ema-decay", "0.9")) == 0
    plain, ema = rows(tmp_path / "plain"), rows(tmp_path / "ema")
    for a, b in zip(plain, ema):  # training never reads the average: raw figures are bit-identical
        assert {k: b[k] for k in a} == a
        assert 0 <= b["ema_val_accuracy"] <= 1 and b["weights"] in ("raw", "ema")
    info = json.loads((tmp_path / "ema" / "run.json").read_text())
    best = next(r for r in ema if r["epoch"] == info["best_epoch"])
    prefix = "ema_" if info["kept_weights"] == "ema" else ""
    assert info["kept_weights"] == best["weights"] and info["val_accuracy"] == best[prefix + "val_accuracy"]
    assert "EMA Val Acc" in (tmp_path / "ema" / "results.md").read_text()
    assert "Weights kept" in (tmp_path / "ema" / "results.md").read_text()
    # what was saved scores what run.json says it scored on validation
    clf = Classifier.load(str(tmp_path / "ema"), device="cpu")
    assert clf.info["val_accuracy"] == pytest.approx(_val_accuracy(tmp_path / "ema"), abs=1e-9)


def _val_accuracy(run) -> float:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["evaluate", str(run), "--split", "val", "--device", "cpu", "--json"]) == 0
    return json.loads(buf.getvalue())["accuracy"]


def test_winning_average_is_what_is_saved(tiny_models, imdb_dir, tmp_path, monkeypatch):
    real = Trainer.evaluate

    def ema_always_wins(self, seqs, labels, name, after_batch=None):
        loss, acc, logits = real(self, seqs, labels, name, after_batch)
        return (loss, 2.0 if "EMA" in name else acc, logits)  # an accuracy no raw epoch can reach

    monkeypatch.setattr(Trainer, "evaluate", ema_always_wins)
    import imdb_lora.training.posthoc as posthoc

    raw_weights = []
    real_restore = posthoc.restore_kept_weights

    def spy(model, run, method):
        raw_weights.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        real_restore(model, run, method)

    monkeypatch.setattr(posthoc, "restore_kept_weights", spy)
    trainers = []
    real_setup = Trainer.setup
    monkeypatch.setattr(Trainer, "setup", lambda self: trainers.append(self) or real_setup(self))
    args = train_args(tiny_models("mpnet"), imdb_dir, tmp_path / "r", "--ema-decay", "0.8", "--epochs", "1")
    assert main(args) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["kept_weights"] == "ema" and info["val_accuracy"] == 2.0
    assert info["test_accuracy"] == rows(tmp_path / "r")[0]["ema_test_accuracy"]
    (trainer,) = trainers
    saved = Classifier.load(str(tmp_path / "r"), device="cpu", raw=True)
    ids, pad = saved.encode(TEXTS), saved.tokenizer.pad_token_id
    with trainer.ema.applied():
        averaged = batched_logits(trainer.model, ids, pad, 4, torch.device("cpu"))
    assert torch.allclose(saved.logits(TEXTS), averaged, atol=1e-6)  # the average is what was saved
    # the last raw weights differ from it; after training the model holds the kept (averaged) weights,
    # so the calibration is fitted on what was saved
    last_raw = raw_weights[0]
    assert any(not torch.allclose(a, b) for a, b in zip(last_raw, trainer.ema.averaged()))
    now = [p.detach() for p in trainer.ema.params]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(now, trainer.ema.averaged()))


class Crash(Exception):
    pass


def test_resume_restores_the_average(tiny_models, imdb_dir, tmp_path, monkeypatch):
    def args(out):
        return train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "2", "--ema-decay", "0.7")

    assert main(args(tmp_path / "straight")) == 0
    steps = {"n": 0}

    def crash_after_7(self):
        steps["n"] += 1
        if steps["n"] == 7:  # epoch 2, mid-epoch, just after a checkpoint
            raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash_after_7)
    with pytest.raises(Crash):
        main(args(tmp_path / "crashed"))
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(tmp_path / "crashed"), "--resume"]) == 0
    assert rows(tmp_path / "straight") == rows(tmp_path / "crashed")
    a = Classifier.load(str(tmp_path / "straight")).logits(TEXTS)
    b = Classifier.load(str(tmp_path / "crashed")).logits(TEXTS)
    assert torch.equal(a, b)


def test_ema_decay_is_validated(capsys):
    assert main(["train", "--ema-decay", "1.0"]) == 2
    assert "--ema-decay" in capsys.readouterr().err
