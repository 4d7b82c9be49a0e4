"""Golden per-step losses: the training computation pinned to numbers recorded from a known-good run.

Every other training test compares a run with another run of the same code (resume, flat against
padded, EMA beside raw), so a change to the computation itself - the loss, label smoothing, gradient
clipping, AdamW's weight decay, the learning-rate schedule, the data order, LoRA's initialisation and
scale, the per-epoch loss accounting, the evaluation - passes them all. This one fails.

The model's weights are written by the test from its own generator (not by transformers' initialisers,
which may change between versions), and the settings are chosen so that each term bites within ten
steps: label smoothing, a weight decay and a clipping norm that are active at this size. If the recipe
changes on purpose, re-record GOLDEN (`pytest -s` prints the new values) and say why in the commit.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_imdb

from imdb_lora.config import Config
from imdb_lora.training.trainer import Trainer

# (mean loss of the batch, learning rate) for each of the 2 x 5 optimizer steps
GOLDEN_STEPS = [
    (0.690817, 0.0015), (0.719813, 0.003), (0.683047, 0.003), (0.661422, 0.002625), (0.739767, 0.00225),
    (0.714934, 0.001875), (0.640766, 0.0015), (0.682725, 0.001125), (0.653203, 0.00075), (0.608976, 0.000375),
]  # fmt: skip
# per epoch: train loss and accuracy (the epoch's reviews), validation loss and accuracy
GOLDEN_EPOCHS = [(0.69444, 16 / 36, 0.674472, 6 / 12), (0.665804, 21 / 36, 0.634536, 11 / 12)]
TOL = 2e-5  # far below what any term above moves (see the module docstring), far above fp32 noise


@pytest.fixture(scope="module")
def golden_model(tiny_models, tmp_path_factory):
    """The tiny bert architecture with weights from a fixed generator (same on every library version)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tiny_models("bert")
    dest = tmp_path_factory.mktemp("golden-model")
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
    g = torch.Generator().manual_seed(20261130)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if name.endswith("LayerNorm.weight") else noise)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


class Recording(Trainer):
    """The trainer, noting each step's mean loss and learning rate as the step returns them."""

    steps: list[tuple[float, float]]

    def _step(self, idx):
        out = super()._step(idx)
        self.steps.append((out[0].item() / len(idx), float(self.optimizer.param_groups[0]["lr"])))
        return out


def test_per_step_losses_match_the_recorded_run(golden_model, tmp_path):
    cfg = Config()
    cfg.model.name = str(golden_model)
    d, t = cfg.data, cfg.train
    d.path, d.max_length, d.val_size = str(write_imdb(tmp_path / "data")), 64, 0.25
    t.epochs, t.batch_size, t.lr, t.device, t.seed = 2, 8, 3e-3, "cpu", 7
    t.label_smoothing, t.weight_decay, t.max_grad_norm, t.warmup_ratio = 0.1, 0.5, 0.5, 0.2
    t.calibration, t.eval_test_each_epoch, t.checkpoint_every = False, False, 0
    trainer = Recording(cfg.validate(), tmp_path / "run")
    trainer.steps = []
    trainer.setup().train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["train_loss"], r["train_accuracy"], r["val_loss"], r["val_accuracy"]) for r in rows]
    print("\nGOLDEN_STEPS =", [(round(loss, 6), lr) for loss, lr in trainer.steps])
    print("GOLDEN_EPOCHS =", [tuple(round(x, 6) for x in e) for e in epochs])

    assert len(trainer.steps) == len(GOLDEN_STEPS) == 10
    for i, ((loss, lr), (want_loss, want_lr)) in enumerate(zip(trainer.steps, GOLDEN_STEPS)):
        assert lr == pytest.approx(want_lr, rel=1e-9), f"step {i}: learning rate"
        assert loss == pytest.approx(want_loss, abs=TOL), f"step {i}: loss"
    for e, (got, want) in enumerate(zip(epochs, GOLDEN_EPOCHS, strict=True), 1):
        assert got == pytest.approx(want, abs=TOL), f"epoch {e}: train loss, train acc, val loss, val acc"
    # an epoch's train loss is the mean over its reviews of what the steps computed (36 reviews: 4 x 8 + 4)
    sizes = [8, 8, 8, 8, 4]
    for e in range(2):
        losses = [loss for loss, _ in trainer.steps[5 * e : 5 * e + 5]]
        assert rows[e]["train_loss"] == pytest.approx(
            sum(x * n for x, n in zip(losses, sizes)) / 36, rel=1e-6
        )
