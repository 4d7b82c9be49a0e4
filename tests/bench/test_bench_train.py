import json
import re

import pytest

from imdb_lora.cli import main


@pytest.mark.parametrize("kind, batching", [("roberta", "packed"), ("bert", "padded")])
def test_bench_train_reports_throughput(tiny_models, imdb_dir, capsys, kind, batching):
    args = ["bench", "train", "--model", str(tiny_models(kind)), "--data", str(imdb_dir), "--steps", "2",
            "--warmup", "1", "--batch-size", "4", "--max-length", "64", "--samples", "20", "--device", "cpu",
            "--batching", batching, "--json"]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batching"] == batching and r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1
    assert r["epoch_seconds_estimate"] > 0 and r["peak_memory_bytes"] > 0


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_bench_eval_reports_throughput(tiny_models, imdb_dir, capsys, batching):
    args = ["bench", "eval", "--model", str(tiny_models("mpnet")), "--data", str(imdb_dir), "--samples", "30",
            "--batch-size", "8", "--max-length", "64", "--device", "cpu", "--batching", batching]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tokens_per_second" in out and "test_set_seconds_estimate" in out
    assert re.search(rf"^batching\s+{batching}$", out, re.M)


def test_bench_train_random_init_on_real_roberta_config(imdb_dir, capsys):
    from conftest import ROBERTA_BASE, needs_shared

    needs_shared()
    args = ["bench", "train", "--model", str(ROBERTA_BASE), "--random-init", "--data", str(imdb_dir),
            "--steps", "1", "--warmup", "0", "--batch-size", "2", "--max-length", "32", "--samples", "8",
            "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"].endswith("(random init)") and r["model_type"] == "roberta"


def test_bench_train_profile_counts_host_ops(tiny_models, imdb_dir, capsys):
    args = ["bench", "train", "--model", str(tiny_models("roberta")), "--data", str(imdb_dir), "--steps", "1",
            "--warmup", "1", "--batch-size", "4", "--max-length", "64", "--samples", "20", "--device", "cpu",
            "--profile", "2", "--json"]  # fmt: skip
    assert main(args) == 0
    p = json.loads(capsys.readouterr().out)["profile"]
    # a 2-layer LoRA model still dispatches hundreds of ops per step (forward, backward, optimizer)
    assert p["steps"] == 2 and p["host_ops_per_step"] > 100 and p["wall_ms_per_step"] > 0
    assert 0 < len(p["top"]) <= 10 and all(r["name"].startswith("aten::") for r in p["top"])
    costs = [r["ms_per_step"] for r in p["top"]]
    assert costs == sorted(costs, reverse=True)


def test_bench_eval_profile_prints_table(tiny_models, imdb_dir, capsys):
    args = ["bench", "eval", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--samples", "12",
            "--batch-size", "4", "--max-length", "64", "--device", "cpu", "--profile", "5"]  # fmt: skip
    assert main(args) == 0  # 5 batches asked, 3 exist: the longest batch is reused
    out = capsys.readouterr().out
    assert "profile of 5 step(s), per step:" in out and re.search(r"host_ops_per_step\s+[\d,]+", out)
    assert "costliest ops" in out


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--profile", "-1", "--profile must be >= 0"),
        ("--warmup", "-1", "--warmup must be >= 0"),
        ("--peak-tflops", "-5", "--peak-tflops must be > 0"),
        ("--peak-tflops", "nan", "--peak-tflops must be > 0"),
    ],
)
def test_bench_rejects_values_out_of_range(tiny_models, imdb_dir, capsys, flag, value, message):
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), flag, value,
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err
