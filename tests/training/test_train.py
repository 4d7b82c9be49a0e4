import json
import math
from pathlib import Path

import pytest
import torch
from conftest import train_args, write_imdb
from safetensors import safe_open

from imdb_lora import config
from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.inference.classifier import Classifier
from imdb_lora.training.schedule import lr_at
from imdb_lora.training.trainer import Trainer

TEXTS = ["great wonderful film", "awful boring waste", "the plot was dull and poor", "loved it. brilliant"]


def test_run_directory_layout(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "run.json", "adapter", "tokenizer", "metrics.jsonl", "results.md", "curves.png",
            "README.md", "checkpoint.safetensors"} <= names  # fmt: skip
    assert not any(n.endswith(".old") or ".tmp" in n for n in names)
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= set(
        rows[0]
    )
    info = json.loads((trained_run / "run.json").read_text())
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert info["status"] == "finished" and info["best_epoch"] == best["epoch"]
    assert info["test_accuracy"] == best["test_accuracy"]  # the headline is the chosen checkpoint's test
    results = (trained_run / "results.md").read_text()
    for needle in ("Per-epoch results", "Training time", "Time per epoch", "Best epoch", "Final test accuracy",
                   "Trainable parameters", "Adapter size on disk", "Peak memory"):  # fmt: skip
        assert needle in results
    assert (trained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert Config.load(trained_run / "config.yaml").train.epochs == 2


def test_run_json_and_card_say_how_much_data_on_what_machine_and_when(trained_run):
    info = json.loads((trained_run / "run.json").read_text())
    assert info["examples_available"] == info["examples"]  # no subset flags: every review of each split
    assert info["finished_at"].endswith("Z") and info["finished_at"][:2] == "20"
    assert info["machine"]["cpus"] >= 1 and info["machine"]["torch_threads"] >= 1
    card = (trained_run / "README.md").read_text()
    assert f"- Trained on: CPU ({info['machine']['cpu']}, " in card and info["finished_at"] in card
    assert "subset" not in card


def test_adapter_is_standard_peft(trained_run, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"), num_labels=2)
    model = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    clf = Classifier.load(str(trained_run), device="cpu", raw=True)  # plain PEFT knows no temperature
    enc = clf.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.allclose(direct, clf.logits(TEXTS), atol=1e-5)


def test_merged_equals_unmerged(trained_run):
    plain = Classifier.load(str(trained_run), device="cpu").logits(TEXTS)
    merged = Classifier.load(str(trained_run), device="cpu", merge=True).logits(TEXTS)
    assert torch.allclose(plain, merged, atol=1e-5)


@pytest.mark.parametrize("kind, method", [("roberta", "lora"), ("mpnet", "lora"), ("bert", "full")])
def test_save_then_reload_gives_identical_logits(tiny_models, imdb_dir, tmp_path, kind, method):
    cfg = Config()
    cfg.model.name = str(tiny_models(kind))
    cfg.data.path, cfg.data.max_length, cfg.data.val_size = str(imdb_dir), 64, 0.25
    cfg.train.method, cfg.train.epochs, cfg.train.batch_size, cfg.train.device = method, 1, 8, "cpu"
    trainer = Trainer(cfg.validate(), tmp_path / "run").setup()
    trainer.train()
    clf = Classifier.load(str(tmp_path / "run"), device="cpu", raw=True)
    enc = clf.encode(TEXTS)
    from imdb_lora.modeling.forward import batched_logits

    in_memory = batched_logits(trainer.model, enc, clf.tokenizer.pad_token_id, 2, torch.device("cpu"))
    assert torch.equal(in_memory, clf.logits(TEXTS, batch_size=2))
    assert (tmp_path / "run" / ("adapter" if method == "lora" else "model")).is_dir()


def test_random_init_run_is_reloadable_and_marked(tiny_models, imdb_dir, tmp_path, capsys):
    out = tmp_path / "ri"
    assert main(train_args(tiny_models("roberta"), imdb_dir, out, "--random-init", "--epochs", "1")) == 0
    assert (out / "base_model" / "model.safetensors").is_file()
    assert "RANDOM INIT" in (out / "results.md").read_text()
    assert "Random initialisation" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert "RANDOM-INIT" in capsys.readouterr().out


class Crash(Exception):
    pass


@pytest.mark.parametrize("batching", ["auto", "flat", "flat-working-copies", "flat-fused-working"])
def test_resume_after_a_mid_epoch_crash_matches_an_uninterrupted_run(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys, batching
):
    """flat-working-copies: --bf16-working-copies (fp32 copies on the CPU) saves and resumes its fp32
    masters, and the run's figures equal those of the same run without it (the same computation).
    flat-fused-working: the same with --fused-qkv too (q/k/v's copies packed), which resumes exactly;
    its figures differ from the plain run's (one LoRA dropout mask for q, k and v) but its files do not:
    the same names, the adapter and the checkpoint with the same tensors (keys, shapes, dtypes)."""
    working = batching in ("flat-working-copies", "flat-fused-working")
    fused = batching == "flat-fused-working"

    def args(out, working=working, fused=fused):
        return train_args(
            tiny_models("bert"),
            imdb_dir,
            out,
            "--checkpoint-every",
            "2",
            "--epochs",
            "2",
            "--batching",
            "flat" if batching.startswith("flat") else batching,
            *(["--bf16-working-copies"] if working else []),
            *(["--fused-qkv"] if fused else []),
        )

    assert main(args(tmp_path / "straight")) == 0

    steps = {"n": 0}

    def crash_after_7(self):
        steps["n"] += 1
        if steps["n"] == 7:  # epoch 2, step 2 of 5, just after its mid-epoch checkpoint (every 2 steps)
            raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash_after_7)
    with pytest.raises(Crash):
        main(args(tmp_path / "crashed"))
    monkeypatch.undo()
    info = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert info["status"] == "running" and info["epochs_done"] == 1
    assert main(["evaluate", str(tmp_path / "crashed")]) == 2  # not a finished run

    capsys.readouterr()
    assert main(["train", "--output-dir", str(tmp_path / "crashed"), "--resume"]) == 0
    train_path = json.loads((tmp_path / "crashed" / "run.json").read_text())["train_path"]
    assert train_path.startswith("padded" if batching == "auto" else "flat")
    assert ("fp32 working copies" in train_path) == working
    assert ("one LoRA dropout mask shared by q, k, v" in train_path) == fused
    assert "at epoch 2, step 2" in capsys.readouterr().out  # resumed mid-epoch, not at the epoch's start
    a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    drop = ("train_seconds", "eval_seconds")
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    if working and not fused:  # without the working copies: the same figures
        assert main(args(tmp_path / "plain", working=False)) == 0
        assert strip((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()) == strip(a)
    if fused:  # the same files, adapter and checkpoint tensors as an unfused run
        assert main(args(tmp_path / "plain", working=False, fused=False)) == 0
        assert same_files(tmp_path / "plain", tmp_path / "straight")
    pa = Classifier.load(str(tmp_path / "straight")).logits(TEXTS)
    pb = Classifier.load(str(tmp_path / "crashed")).logits(TEXTS)
    assert torch.equal(pa, pb)


def same_files(a: Path, b: Path) -> bool:
    """Two run folders hold the same file names, and their safetensors files the same tensor names,
    shapes and dtypes."""
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))  # noqa: E731
    if names(a) != names(b):
        return False
    for f in a.rglob("*.safetensors"):
        with safe_open(f, "pt") as x, safe_open(b / f.relative_to(a), "pt") as y:
            if sorted(x.keys()) != sorted(y.keys()):
                return False
            if any(x.get_slice(k).get_shape() != y.get_slice(k).get_shape() for k in x.keys()):
                return False
            if any(x.get_slice(k).get_dtype() != y.get_slice(k).get_dtype() for k in x.keys()):
                return False
    return True


def test_a_tie_on_validation_keeps_the_earlier_epoch(tiny_models, imdb_dir, tmp_path, monkeypatch):
    real = Trainer.evaluate

    def same_every_epoch(self, seqs, labels, name, after_batch=None):
        loss, acc, logits = real(self, seqs, labels, name, after_batch)
        return (loss, 0.5 if name == "validation" else acc, logits)

    saved = []
    real_save = Trainer._save_weights
    monkeypatch.setattr(Trainer, "evaluate", same_every_epoch)
    monkeypatch.setattr(
        Trainer, "_save_weights", lambda self, *a: saved.append(self.state.epoch) or real_save(self, *a)
    )
    out = tmp_path / "tie"
    args = (
        "--no-calibration",
        "--no-eval-test-each-epoch",
        "--max-train-samples",
        "8",
        "--max-eval-samples",
        "4",
    )
    assert main(train_args(tiny_models("bert"), imdb_dir, out, *args)) == 0
    assert saved == [1] and json.loads((out / "run.json").read_text())["best_epoch"] == 1


def test_resume_refuses_changed_settings(tiny_models, imdb_dir, tmp_path, monkeypatch, capsys):
    def crash(self):
        raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash)
    with pytest.raises(Crash):
        main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "r", "--checkpoint-every", "0"))
    monkeypatch.undo()
    # the crash came before any checkpoint: nothing to resume, and the message says so
    assert main(["train", "--output-dir", str(tmp_path / "r"), "--resume"]) == 2
    assert "no resumable run" in capsys.readouterr().err


def test_resume_accepts_how_but_not_what(tiny_models, imdb_dir, tmp_path, monkeypatch, capsys):
    steps = []

    def crash_at_third_step(self):
        steps.append(1)
        if len(steps) == 3:
            raise Crash

    monkeypatch.setattr(Trainer, "_after_step", crash_at_third_step)
    with pytest.raises(Crash):
        main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "r", "--checkpoint-every", "1"))
    monkeypatch.undo()
    resume = ["train", "--output-dir", str(tmp_path / "r"), "--resume"]
    assert main([*resume, "--lr", "1e-3"]) == 2
    assert "settings differ: --lr (train.lr: 0.003 saved, 0.001 given)" in capsys.readouterr().err
    # a YAML given with --resume is compared too: the run's own settings with another lr are refused
    edited = tmp_path / "edited.yaml"
    edited.write_text((tmp_path / "r" / "config.yaml").read_text().replace("lr: 0.003", "lr: 0.001"))
    assert main([*resume, "--config", str(edited)]) == 2
    assert "settings differ: --lr (train.lr: 0.003 saved, 0.001 given)" in capsys.readouterr().err
    assert main([*resume, "--overwrite"]) == 2
    assert "--overwrite and --resume contradict" in capsys.readouterr().err
    assert main([*resume, "--no-token-cache", "--device", "cpu"]) == 0


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 0.1) == 0.0


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_packed_batching_trains_and_is_recorded(tiny_models, imdb_dir, tmp_path, kind, monkeypatch):
    import torch

    import imdb_lora.modeling.forward as packing_module

    calls = []  # grad enabled: a training step; disabled: evaluation
    real = packing_module.packed_logits
    monkeypatch.setattr(
        packing_module, "packed_logits", lambda *a: calls.append(torch.is_grad_enabled()) or real(*a)
    )
    out = tmp_path / kind
    assert main(train_args(tiny_models(kind), imdb_dir, out, "--epochs", "1", "--batching", "packed")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train_path"].startswith("packed") and info["status"] == "finished"
    assert sum(calls) == 5  # every step of the epoch (36 reviews, batch 8) ran the packed forward
    assert False in calls  # and explicit --batching packed evaluates packed too
    assert "packed" in (out / "results.md").read_text()


def test_auto_batching_is_padded_on_cpu(trained_run):
    info = json.loads((trained_run / "run.json").read_text())
    assert info["train_path"].startswith("padded") and info["eval_path"].startswith("padded")
    assert "training padded (dynamic padding); evaluation padded" in (trained_run / "results.md").read_text()


def test_auto_on_cuda_trains_padded_and_evaluates_flat_with_the_same_metrics(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    """auto's CUDA choice (padded training, flat evaluation with LoRA merged), run on the CPU: the
    same training and the same evaluation figures as an all-padded run."""
    import imdb_lora.training.trainer as trainer_module

    assert main(train_args(tiny_models("roberta"), imdb_dir, tmp_path / "padded", "--epochs", "1")) == 0
    real = trainer_module.batching_path
    monkeypatch.setattr(
        trainer_module,
        "batching_path",
        lambda mode, model, _, training, **kw: real(mode, model, torch.device("cuda"), training, **kw),
    )
    assert main(train_args(tiny_models("roberta"), imdb_dir, tmp_path / "auto", "--epochs", "1")) == 0
    info = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert info["train_path"].startswith("padded") and info["eval_path"].startswith("flat")
    a, b = (
        json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("padded", "auto")
    )
    assert a["train_loss"] == b["train_loss"]  # training itself is untouched
    for key in ("val_loss", "test_loss"):
        assert abs(a[key] - b[key]) < 1e-4, key
    assert (a["val_accuracy"], a["test_accuracy"]) == (b["val_accuracy"], b["test_accuracy"])


@pytest.mark.parametrize("kind", ["roberta", "bert", "mpnet"])
def test_flat_batching_trains_and_is_recorded(tiny_models, imdb_dir, tmp_path, kind, monkeypatch):
    import imdb_lora.modeling.forward as forward_module

    calls = []  # grad enabled: a training step; disabled: evaluation
    real = forward_module.flat_logits
    monkeypatch.setattr(
        forward_module, "flat_logits", lambda *a: calls.append(torch.is_grad_enabled()) or real(*a)
    )
    out = tmp_path / kind
    assert main(train_args(tiny_models(kind), imdb_dir, out, "--epochs", "1", "--batching", "flat")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train_path"].startswith("flat") and info["eval_path"].startswith("flat")
    assert ("no attention dropout" in info["train_path"]) == (kind == "mpnet")
    assert sum(calls) == 5  # every step of the epoch (36 reviews, batch 8) ran the flat forward
    assert False in calls  # and evaluation too
    assert "training flat" in (out / "results.md").read_text()


def test_fused_qkv_needs_flat_lora_on_qkv_and_is_not_built_for_mpnet(tiny_models, imdb_dir, tmp_path, capsys):
    """Each refusal in one line, before the run folder is made (the model's type first, then its LoRA)."""
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "a", "--fused-qkv")) == 2
    assert "--fused-qkv needs --batching flat and --method lora" in capsys.readouterr().err
    flat = ("--batching", "flat", "--fused-qkv")
    assert main(train_args(tiny_models("mpnet"), imdb_dir, tmp_path / "m", *flat)) == 2
    assert "--fused-qkv is not built for mpnet's flat path" in capsys.readouterr().err
    ffn = ("--lora-targets", "ffn")
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "f", *flat, *ffn)) == 2
    err = capsys.readouterr().err
    assert "--fused-qkv needs LoRA on query, key and value of every self-attention" in err
    assert "Traceback" not in err
    assert not any((tmp_path / d).exists() for d in ("a", "m", "f"))


def test_bf16_working_copies_need_flat_lora_and_are_not_built_for_mpnet(
    tiny_models, imdb_dir, tmp_path, capsys
):
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "a", "--bf16-working-copies")) == 2
    assert "--bf16-working-copies needs --batching flat and --method lora" in capsys.readouterr().err
    full = ("--batching", "flat", "--method", "full", "--bf16-working-copies")
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "f", *full)) == 2
    assert "--bf16-working-copies needs --batching flat and --method lora" in capsys.readouterr().err
    args = train_args(
        tiny_models("mpnet"), imdb_dir, tmp_path / "m", "--batching", "flat", "--bf16-working-copies"
    )
    assert main(args) == 2
    assert "--bf16-working-copies is not built for mpnet's flat path" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_flat_mpnet_refusal_names_the_config_files_key(tiny_models, imdb_dir, tmp_path, capsys):
    """The trainer passes its names to the flat path's check: a --config file's setting by file and key."""
    (tmp_path / "my.yaml").write_text("train: {batching: flat, bf16_working_copies: true}\n")
    args = train_args(tiny_models("mpnet"), imdb_dir, tmp_path / "m", "--config", str(tmp_path / "my.yaml"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'my.yaml'}: train.bf16_working_copies is not built for mpnet's flat path" in err, err
    assert "set it false there or use --batching padded" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_flat_mpnet_refuses_cuda_graphs_and_cuda_graphs_need_flat(tiny_models, imdb_dir, tmp_path, capsys):
    args = train_args(tiny_models("mpnet"), imdb_dir, tmp_path / "m", "--batching", "flat", "--cuda-graphs")
    assert main(args) == 2
    assert "--cuda-graphs is not built for mpnet's flat path" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "g", "--cuda-graphs")) == 2
    assert "--cuda-graphs needs --batching flat" in capsys.readouterr().err
    flat = ("--batching", "flat", "--cuda-graphs", "--bf16-working-copies", "--epochs", "1")
    assert (
        main(train_args(tiny_models("bert"), imdb_dir, tmp_path / "c", *flat, "--no-eval-test-each-epoch"))
        == 0
    )
    err = capsys.readouterr().err
    assert "--cuda-graphs: no effect on cpu with the flat path (CUDA and flat only)" in err
    # fp32 copies on the CPU: run, but said to change nothing (it was in run.json's train_path only)
    assert "--bf16-working-copies: no effect on cpu (no autocast" in err


@pytest.mark.parametrize("samples, what", [(16, "training"), (8, "validation")])
def test_a_diverging_training_is_one_line_naming_lr(
    tiny_models, imdb_dir, tmp_path, capsys, monkeypatch, samples, what
):
    """A far too large LoRA scale (or --lr) made the loss NaN: the epochs went on silently, and then
    calibration's LBFGS raised 'value cannot be converted to type float without overflow'. With one
    step (8 reviews) the training loss, computed before the update, stays finite: validation's shows it.
    --lora-alpha is bounded now (MAX_LORA_SCALE), and within the bound no setting diverged this tiny
    model: the bound is lifted here to reach the check that stays behind it."""
    monkeypatch.setattr(config, "MAX_LORA_SCALE", math.inf)
    out = tmp_path / "r"
    args = train_args(
        tiny_models("bert"), imdb_dir, out, "--epochs", "1", "--max-train-samples", str(samples)
    )
    args[args.index("--lr") + 1] = "0.9"
    args += ["--lora-alpha", "1e20"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"imdb-lora: error: training diverged: the {what} loss became nan"
    )
    assert "try a lower --lr (it is 0.9) or --lora-alpha (it is 1e+20)" in lines[0]


def test_a_lora_rank_above_the_wrapped_layers_dimension_is_one_line(tiny_models, imdb_dir, tmp_path, capsys):
    """--lora-r 10**12 failed allocating the matrices (a RuntimeError traceback); any rank above the
    tiny bert's hidden size (32) adds nothing."""
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--lora-r", "33")) == 2
    err = capsys.readouterr().err
    assert "imdb-lora: error: --lora-r 33 is more than 32, the smallest dimension of the layers" in err
    assert "Traceback" not in err and not out.exists()  # a failed setup leaves nothing behind


def test_settings_from_a_config_file_are_said_by_the_file_and_key(tiny_models, imdb_dir, tmp_path, capsys):
    """A --config file's settings that others leave without effect were not said at all (LoRA settings
    with method: full), or were named by flags never typed (--cuda-graphs off CUDA, the data refusals'
    --data): each now names the file and its key."""
    recipe = tmp_path / "my.yaml"
    recipe.write_text(
        "train: {method: full, batching: flat, cuda_graphs: true, max_steps: 1}\nlora: {r: 4}\n"
    )
    args = train_args(
        tiny_models("bert"), imdb_dir, tmp_path / "run", "--config", str(recipe), "--epochs", "1"
    )
    assert main([*args, "--no-eval-test-each-epoch"]) == 0
    err = capsys.readouterr().err
    assert f"{recipe}: lora.r has no effect with train.method: full (every weight trains; no adapters)" in err
    assert f"{recipe}: train.cuda_graphs: no effect on cpu with the flat path (CUDA and flat only)" in err
    assert f"{recipe}: train.max_steps 1 reached at step 1 (epoch 1, 1 of its" in err  # was `--max-steps 1`
    small = write_imdb(tmp_path / "small", per_class=1)  # too few reviews: the data refusal
    recipe.write_text(f"data: {{path: {small}}}\n")
    model = ["--model", str(tiny_models("bert")), "--device", "cpu", "--max-length", "64"]
    assert main(["train", "--config", str(recipe), *model, "--output-dir", str(tmp_path / "r2")]) == 2
    assert (
        f"{recipe}: data.path {small}: 2 training reviews, all taken by the validation"
        in capsys.readouterr().err
    )
