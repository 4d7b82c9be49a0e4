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
    assert r["batching"] == batching and r["tokens_per_second"] > 0
    # the CPU's peak is measured: on a busy machine it can read below the model's rate, and then no MFU
    assert 0 < r["mfu"] < 1 if r["mfu"] is not None else r["mfu_peak_source"].endswith("; no MFU")
    assert r["epoch_seconds_estimate"] > 0 and r["peak_memory_bytes"] > 0
    assert 0 < r["first_step_seconds"] == r["warmup_seconds"]  # one warm-up step: what --compile pays first


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_bench_eval_reports_throughput(tiny_models, imdb_dir, capsys, batching):
    args = ["bench", "eval", "--model", str(tiny_models("mpnet")), "--data", str(imdb_dir), "--samples", "30",
            "--batch-size", "8", "--max-length", "64", "--device", "cpu", "--batching", batching]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "tokens_per_second" in out and "test_set_seconds_estimate" in out
    assert re.search(rf"^batching\s+{batching}$", out, re.M)
    # the rates come from the second pass, and the report says so; both passes show a bar on stderr
    assert re.search(r"^warm_seconds\s+[\d.]+$", out, re.M) and "timed_seconds" not in out
    assert "reading " in err and "cold pass" in err and "warm pass" in err


def test_bench_train_says_what_it_does_on_stderr_and_keeps_stdout_json(tiny_models, imdb_dir, capsys):
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--steps", "2",
            "--warmup", "1", "--batch-size", "4", "--max-length", "64", "--samples", "20", "--device", "cpu",
            "--json"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "reading " in err and "warm-up steps" in err and "timed steps" in err


def test_cuda_graphs_off_the_gpu_says_it_has_no_effect(tiny_models, imdb_dir, capsys):
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--steps", "1",
            "--warmup", "0", "--batch-size", "4", "--max-length", "64", "--samples", "8", "--device", "cpu",
            "--batching", "flat", "--cuda-graphs", "--json"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["cuda_graphs"] is False and "--cuda-graphs: no effect on cpu (CUDA only)" in err
    assert json.loads(out)["first_step_seconds"] is None  # --warmup 0: no untimed step


@pytest.mark.parametrize("flags", [["--bf16-working-copies"], ["--bf16-working-copies", "--fused-qkv"]])
def test_bench_train_takes_the_working_copies_on_the_flat_path_only(tiny_models, imdb_dir, capsys, flags):
    """--bf16-working-copies (and --fused-qkv) run the flat step with them (fp32 copies on the CPU, as
    the report says) and are refused in one line without --batching flat."""
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--steps", "1",
            "--warmup", "1", "--batch-size", "4", "--max-length", "64", "--samples", "8", "--device", "cpu",
            *flags, "--json"]  # fmt: skip
    assert main([*args, "--batching", "flat"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["working_copies"] == "float32" and report["fused_qkv"] == ("--fused-qkv" in flags)
    assert main(args) == 2
    assert "--bf16-working-copies needs --batching flat and --method lora" in capsys.readouterr().err


def test_small_figures_keep_their_digits():
    from imdb_lora.bench.train import format_report

    text = format_report(
        {"model_tflops_per_second": 0.0307, "timed_seconds": 8.43, "tokens_per_second": 3597.3}
    )
    assert re.search(r"model_tflops_per_second\s+0\.0307$", text, re.M)
    assert re.search(r"timed_seconds\s+8\.43$", text, re.M) and "3,597.3" in text


def test_counts_have_thousands_separators_as_the_estimates_beside_them():
    from imdb_lora.bench.train import format_report

    text = format_report(
        {"epoch_reviews": 23750, "epoch_tokens": 2938673, "batch_size": 8, "compiled": False}
    )
    assert re.search(r"epoch_reviews\s+23,750$", text, re.M) and re.search(
        r"epoch_tokens\s+2,938,673$", text, re.M
    )
    assert re.search(r"batch_size\s+8$", text, re.M) and re.search(r"compiled\s+False$", text, re.M)


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
    assert "profile of 5 steps, per step:" in out and re.search(r"host_ops_per_step\s+[\d,]+", out)
    assert "costliest ops" in out


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--profile", "-1", "--profile must be >= 0"),
        ("--warmup", "-1", "--warmup must be >= 0"),
        ("--peak-tflops", "-5", "argument --peak-tflops: expected a number > 0"),
        ("--peak-tflops", "nan", "argument --peak-tflops: expected a number > 0"),
        ("--peak-tflops", "inf", "argument --peak-tflops: expected a number > 0"),  # was MFU 0.00%
        # the tiny bert reads 128 positions: refused before any data is read, as `train` does
        ("--max-length", "512", "--max-length 512 exceeds what bert can read (128 tokens"),
        # a step cannot draw 64 of 20 reviews; it used to run 20 and report 64
        ("--batch-size", "64", "--batch-size 64 is more than the 20 reviews drawn"),
    ],
)
def test_bench_rejects_values_out_of_range(tiny_models, imdb_dir, capsys, flag, value, message):
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--samples", "20",
            "--steps", "1", "--warmup", "0", "--max-length", "64", "--device", "cpu", flag, value]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "reading " not in err  # found before reading the data


@pytest.mark.parametrize("name", ["train", "eval"])
def test_bench_more_samples_than_the_split_is_refused(tiny_models, imdb_dir, capsys, name):
    args = ["bench", name, "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--samples", "200",
            "--batch-size", "4", "--max-length", "64", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2  # 200 asked, but each tiny split has 48: it used to time 48 and not say so
    err = capsys.readouterr().err
    assert f"--samples 200: the {'train' if name == 'train' else 'test'} split has only 48 reviews" in err


def test_bench_train_batch_larger_than_the_data_is_refused(tiny_models, imdb_dir, capsys):
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir),
            "--batch-size", "64", "--max-length", "64", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2  # no --samples: the whole tiny train split, 48 reviews
    assert (
        "--batch-size 64 is more than the 48 reviews drawn (the whole train split)" in capsys.readouterr().err
    )


@pytest.mark.parametrize("args", [["--max-length", "512"], ["--steps", "5"], ["--warmup", "2"]])
def test_bench_eval_refuses_what_it_cannot_honour(tiny_models, imdb_dir, capsys, args):
    # eval times two whole passes: --steps/--warmup are train's, not silently ignored
    argv = ["bench", "eval", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--samples", "8",
            "--device", "cpu", *args]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("exceeds what bert can read" if args[0] == "--max-length" else "unrecognized arguments") in err
