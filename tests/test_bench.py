"""bench: `bench predict` compares paths on the same reviews; `bench serve` runs a bounded load with no errors."""

import json

import pytest

from imdb_lora.bench.common import percentile
from imdb_lora.cli import main


def bench(capsys, *args):
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_bench_predict_compares_run_and_export_side_by_side(trained_run, imdb_dir, tmp_path, capsys):
    onnx = tmp_path / "onnx"
    assert main(["export", str(trained_run), "--to", str(onnx), "--format", "onnx"]) == 0
    capsys.readouterr()
    args = ["predict", str(trained_run), str(onnx), "--data", str(imdb_dir), "--samples", "12"]
    code, out, _ = bench(capsys, *args, "--batch-sizes", "1,4", "--json")
    assert code == 0
    report = json.loads(out)
    rows = {(r["format"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {("run", 1), ("run", 4), ("onnx", 1), ("onnx", 4)}
    for r in rows.values():
        assert r["reviews"] == 12 and r["reviews_per_s"] > 0
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert r["agreement_with_first"] == 1.0  # fp32 ONNX labels every review as the run does
    assert rows[("run", 1)]["speedup"] == 1.0 and rows[("run", 4)]["speedup"] == 1.0
    assert rows[("run", 1)]["accuracy"] == rows[("onnx", 4)]["accuracy"]
    code, out, _ = bench(capsys, *args, "--batch-sizes", "4")
    assert code == 0 and "reviews/s" in out and "speed-up" in out


def test_bench_serve_reports_zero_errors(trained_run, imdb_dir, capsys):
    code, out, err = bench(
        capsys, "serve", str(trained_run), "--data", str(imdb_dir), "--clients", "8", "--requests", "24",
        "--samples", "16", "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["errors"] == 0 and r["requests"] == 24 and r["requests_per_s"] > 0
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert r["model_calls"] < 24  # concurrent clients were batched together


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "/no/such/run"], "no such run directory"),
        (["predict", "RUN", "--samples", "0"], "positive integer"),
        (["predict", "RUN", "--samples", "100000"], "the test split has only"),
    ],
)
def test_bench_mistakes_exit_2(trained_run, imdb_dir, capsys, args, message):
    args = [str(trained_run) if a == "RUN" else a for a in args]
    code, _, err = bench(capsys, *args, "--data", str(imdb_dir))
    assert code == 2 and message in err
