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
    for (_fmt, bs), r in rows.items():
        assert r["reviews"] == 12 and r["reviews_per_s"] > 0
        # latency is per call and throughput is reviews over the summed call times: the slowest call
        # (p99 of at most 12 calls) is at least the mean call, and the median at most the whole pass
        mean_call_ms = 1000 * 12 / r["reviews_per_s"] / (12 // bs)
        assert r["latency_ms"]["p99"] >= 0.99 * mean_call_ms - 0.1
        assert r["latency_ms"]["p50"] <= 1000 * 12 / r["reviews_per_s"] + 0.1
        assert r["agreement_with_first"] == 1.0  # fp32 ONNX labels every review as the run does
        # speed-up: this path's reviews/s over the run's at the same batch size
        want = r["reviews_per_s"] / rows[("run", bs)]["reviews_per_s"]
        assert r["speedup"] == pytest.approx(want, rel=2e-3, abs=2e-3)
    # accuracy: the same 12 reviews labeled by the run directly
    from imdb_lora.bench.common import test_reviews
    from imdb_lora.inference.classifier import Classifier

    clf = Classifier.load(str(trained_run), device="cpu")
    reviews, source = test_reviews(clf, str(imdb_dir), 12, 0)
    assert source == f"IMDB test reviews ({imdb_dir.resolve()})"
    labels = clf.logits(reviews.texts).argmax(-1).tolist()
    want = sum(p == y for p, y in zip(labels, reviews.labels)) / 12
    assert rows[("run", 1)]["accuracy"] == rows[("onnx", 4)]["accuracy"] == want
    code, out, _ = bench(capsys, *args, "--batch-sizes", "4")
    assert code == 0 and "reviews/s" in out and "speed-up" in out


def test_bench_predict_default_batch_sizes_fit_a_small_samples(trained_run, imdb_dir, capsys):
    """1,32 by default; under 32 samples the larger is the samples (it was refused, naming a flag not given)."""
    code, out, err = bench(
        capsys, "predict", str(trained_run), "--data", str(imdb_dir), "--samples", "3", "--json"
    )
    assert code == 0, err
    assert [r["batch_size"] for r in json.loads(out)["results"]] == [1, 3]


def test_bench_serve_reports_zero_errors(trained_run, imdb_dir, capsys):
    code, out, err = bench(
        capsys, "serve", str(trained_run), "--data", str(imdb_dir), "--clients", "8", "--requests", "24",
        "--samples", "16", "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["errors"] == 0 and r["requests"] == 24 and r["requests_per_s"] > 0
    assert r["requests_per_s"] == pytest.approx(24 / r["seconds"], rel=0.01)
    # latencies are per request, in ms: none is longer than the whole load, and 8 busy clients spend
    # most of it waiting for responses, so the 24 requests' times add up to at least half of it
    # (p99 of 24 values is the slowest)
    wall_ms = 1000 * r["seconds"]
    assert 0 < r["latency_ms"]["p50"] and r["latency_ms"]["p99"] <= wall_ms + 1
    assert 24 * r["latency_ms"]["p99"] >= 0.5 * wall_ms
    assert r["model_calls"] < 24  # concurrent clients were batched together
    assert r["connect_failures_before_start"] == 0 and r["load_generator_cpu_seconds"] > 0
    from imdb_lora.bench.serve import format_serve_report

    assert "CPU seconds: load generator" in format_serve_report(r)


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "/no/such/run"], "no such run directory"),
        (["predict", "RUN", "--samples", "0"], "positive integer"),
        (["predict", "RUN", "--samples", "100000"], "the test split has only"),
        (["predict", "RUN", "--batch-sizes", "1,1"], "expected distinct positive integers"),
        (["predict", "RUN", "--batch-sizes", ","], "expected distinct positive integers"),
        # it timed one batch of the 4 reviews and reported it as batch size 8
        (
            ["predict", "RUN", "--samples", "4", "--batch-sizes", "1,8"],
            "--batch-sizes 8 is more than the 4 reviews",
        ),
        (["predict", "RUN", "RUN/"], "is the same model as"),
        # every client opened a connection first (10**12 of them hung); the report named idle clients
        (["serve", "RUN", "--clients", "9", "--requests", "8"], "--clients 9 is more than --requests 8"),
        (
            ["serve", "RUN", "--texts-per-request", str(10**12)],
            "--texts-per-request 1000000000000 is more than the 256 reviews",
        ),
        # the tiny bert reads 128 positions; the tests' short reviews would not show it until real data
        (["predict", "RUN", "--max-length", "512"], "--max-length 512 exceeds what"),
    ],
)
def test_bench_mistakes_exit_2(trained_run, imdb_dir, capsys, args, message):
    args = [a.replace("RUN", str(trained_run)) for a in args]
    code, _, err = bench(capsys, *args, "--data", str(imdb_dir))
    assert code == 2 and message in err


def test_bench_predict_max_length_keeps_room_for_head_tail(trained_run):
    from imdb_lora.bench.predict import override_max_length
    from imdb_lora.errors import UserError
    from imdb_lora.inference.classifier import Classifier

    clf = Classifier.load(str(trained_run), device="cpu")
    clf.config.data.truncation, clf.config.data.head_tokens = "head_tail", 40
    # 40 head tokens leave no room in 24: encode() would keep 42 tokens, more than asked for
    with pytest.raises(UserError, match="--max-length 24 leaves no room"):
        override_max_length("RUN", clf, 24)
    override_max_length("RUN", clf, 48)
    assert max(map(len, clf.encode(["great " * 200]))) == 48


def test_reports_name_where_the_reviews_came_from(trained_run, tmp_path):
    from imdb_lora.bench.common import test_reviews
    from imdb_lora.inference.classifier import Classifier

    rows = "".join(f"{'good fine film' if i % 2 else 'bad dull film'} {i},{i % 2}\n" for i in range(40))
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("text,label\n" + rows)
    clf = Classifier.load(str(trained_run), device="cpu")
    data = clf.config.data
    data.path, data.train_file, data.test_file = None, str(tmp_path / "train.csv"), str(tmp_path / "test.csv")
    assert test_reviews(clf, None, 4, 0)[1] == f"reviews of the test file {tmp_path / 'test.csv'}"
    data.test_file = None  # the run's "test" is a held-out slice of its train file: said so, never "IMDB"
    assert (
        test_reviews(clf, None, 4, 0)[1]
        == f"held-out reviews of {tmp_path / 'train.csv'} (the run has no test file)"
    )
