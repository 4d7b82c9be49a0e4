"""bench train: MFU against the detected GPU's data-sheet peak; the recipe's own step; the epoch estimate
from the train split's size."""

import json
import re

import pytest
import torch

import imdb_lora.bench.train as bench_train
from imdb_lora.bench.train import device_peak_flops
from imdb_lora.cli import main


@pytest.mark.parametrize(
    "name, tflops, key",
    [
        ("NVIDIA H200", 989, "H200"),
        ("NVIDIA H100 80GB HBM3", 989, "H100"),
        ("NVIDIA H100 PCIe", 756, "H100 PCIe"),
        ("NVIDIA GH200 480GB", 989, "GH200"),
        ("NVIDIA A100-SXM4-80GB", 312, "A100"),
        ("NVIDIA A100 80GB PCIe", 312, "A100"),
        ("NVIDIA A10G", 125, "A10G"),
        ("NVIDIA L4", 121, "L4"),
        ("NVIDIA L40S", 362, "L40S"),
        ("Tesla T4", 65, "T4"),
    ],
)
def test_mfu_peak_is_the_detected_gpus(monkeypatch, name, tflops, key):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = device_peak_flops(torch.device("cuda"), None)
    assert peak == tflops * 1e12 and source == f"{key} dense bf16 data sheet"


def test_unknown_gpu_has_no_mfu_unless_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future Accelerator")
    peak, source = device_peak_flops(torch.device("cuda"), None)
    assert peak is None and "--peak-tflops" in source
    assert device_peak_flops(torch.device("cuda"), 500.0) == (500e12, "given")


def test_bench_train_runs_the_recipes_step_and_sizes_the_epoch_by_the_train_split(
    tiny_models, imdb_dir, monkeypatch, capsys
):
    calls = []
    real = bench_train.train_step
    monkeypatch.setattr(bench_train, "train_step", lambda *a, **k: calls.append(a[8]) or real(*a, **k))
    args = ["bench", "train", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--steps", "3",
            "--warmup", "2", "--batch-size", "4", "--max-length", "64", "--samples", "20", "--device", "cpu",
            "--json"]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(calls) == 5 and set(calls) == {4e-4}  # warm-up + timed steps, at the recipe's default lr
    # 48 train reviews less the 5% validation (1 per class) that `train` holds out: 46, not 25,000
    assert r["epoch_reviews"] == 46
    assert r["epoch_tokens"] == pytest.approx(r["mean_review_tokens"] * 46, abs=1)
    assert r["epoch_seconds_estimate"] == pytest.approx(r["epoch_tokens"] / r["tokens_per_second"], rel=1e-3)


def test_the_cpu_peak_is_the_best_of_several_trials(monkeypatch):
    # the first trial is slowed by other work (1 s for one 2.1 GFLOP matmul), the later ones are not
    ticks = iter([0.0, 1.0, 10.0, 10.01, 20.0, 20.02, 30.0, 30.05, 40.0, 40.1])
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    peak, source = device_peak_flops(torch.device("cpu"), None)
    assert peak == pytest.approx(2 * 1024**3 / 0.01)  # the best trial, not the one slowed
    assert source == "CPU fp32 matmul measured (best of 5, 2 threads)"


def test_a_peak_below_the_models_own_rate_gives_no_mfu_and_says_why(
    tiny_models, imdb_dir, capsys, monkeypatch
):
    measured_low = (1e6, "CPU fp32 matmul measured (best of 5, 1 thread)")  # a CPU busy with other work
    monkeypatch.setattr(bench_train, "device_peak_flops", lambda device, given: measured_low)
    args = ["bench", "eval", "--model", str(tiny_models("bert")), "--data", str(imdb_dir), "--samples", "8",
            "--batch-size", "8", "--max-length", "32", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mfu\s+–$", out, re.M)  # never 1.3885, as if the model beat the CPU's peak
    assert re.search(
        r"^mfu_peak_source\s+CPU fp32 matmul measured .*beat this peak .*too low.*; no MFU$", out, re.M
    )
    assert bench_train.mfu_of(5e11, 1e12, "given") == (0.5, "given")  # under the peak: the ratio, unchanged
