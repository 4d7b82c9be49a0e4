"""`imdb-lora score`: the local engine on small files (fast), and both engines against `predict` on 1,000
real IMDB test reviews (slow: a local Ray cluster starts in tens of seconds on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, train_args

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier
from imdb_lora.scale.batch import ScoreBatch
from imdb_lora.scale.engines import Summary, schema_clash_inside

pa = pytest.importorskip("pyarrow")  # the scale extra (part of dev)
pq = pytest.importorskip("pyarrow.parquet")

DATA = Path(os.environ.get("IMDB_LORA_DATA", SHARED / "data" / "aclImdb-labeled.tar.xz"))
PRED = ["label", "label_id", "confidence", "prob_negative", "prob_positive"]


def write_inputs(folder: Path) -> dict[str, str | None]:
    """A JSONL, a CSV and a Parquet file with ids, good rows and every kind of bad row: id -> text."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        {"id": "j1", "text": "great wonderful film", "label": 1},
        {"id": "j2", "text": 5},
        {"id": "j3", "text": None},
        {"id": "j4"},
        None,  # a line that is not JSON
        {"id": "j6", "text": "   "},
        {"id": "j7", "text": "awful boring waste. the plot was dull and poor", "label": 0},
    ]
    (folder / "a.jsonl").write_text(
        "".join(("{not json\n" if r is None else json.dumps(r) + "\n") for r in lines)
    )
    (folder / "b.csv").write_text('id,text\nc1,loved it. brilliant\nc2,\nc3,"dull, poor, awful"\n')
    pq.write_table(
        pa.table({"rid": ["p1", "p2"], "text": ["superb moving story", None]}), folder / "c.parquet"
    )
    return {
        "j1": "great wonderful film", "j7": "awful boring waste. the plot was dull and poor",
        "c1": "loved it. brilliant", "c3": "dull, poor, awful", "p1": "superb moving story",
    }  # fmt: skip


def read_output(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*.parquet")):  # file-name order is input order
        rows += pq.read_table(f).to_pylist()
    return rows


def row_id(r: dict) -> str:
    return r.get("id") or r.get("rid") or f"{Path(r['source_file']).name}:{r['source_row']}"


def test_the_summary_says_row_for_one_error_rows_otherwise():
    one, two = Summary(rows=2, errors=1, seconds=1.0, examples=[]), Summary(2, 2, 1.0, [])
    assert "; 1 row with an error;" in one.text("out/") and "; 2 rows with an error;" in two.text("out/")
    single = Summary(rows=1, errors=0, seconds=1.0, examples=[], kept=(0, 1)).text("out/")
    assert single.startswith("scored 1 row in 1.0 s") and "(resumed: 0 of 1 input file kept" in single


def test_local_engine_scores_files_keeps_ids_and_reports_bad_rows(trained_run, tmp_path, capsys):
    good = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["score", str(trained_run), "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    summary, err = capsys.readouterr()
    assert "scored 12 rows" in summary and "7 rows with an error" in summary and "loaded" not in summary
    base = json.loads((trained_run / "run.json").read_text())["model"]
    assert f"loaded {trained_run}: lora run of {base} (torch, cpu), calibrated: temperature " in err
    rows = read_output(out)
    assert [(Path(r["source_file"]).name, r["source_row"]) for r in rows] == [
        ("a.jsonl", i) for i in range(7)
    ] + [("b.csv", i) for i in range(3)] + [("c.parquet", i) for i in range(2)]
    ok = {row_id(r): r for r in rows if r["error"] is None}
    assert set(ok) == set(good)
    preds = Classifier.load(str(trained_run), device="cpu").predict(list(good.values()))
    for key, p in zip(good, preds):
        assert ok[key]["label"] == p.label and ok[key]["label_id"] == p.label_id
        assert ok[key]["prob_positive"] == pytest.approx(p.positive, abs=1e-6)
        assert ok[key]["prob_negative"] == pytest.approx(p.negative, abs=1e-6)
        assert ok[key]["confidence"] == pytest.approx(p.confidence, abs=1e-6)
    errors = {row_id(r): r["error"] for r in rows if r["error"] is not None}
    assert errors == {
        "j2": "'text' is a JSON int, not text",
        "j3": "no 'text' value",
        "j4": "no 'text' value",
        "a.jsonl:4": "line 5 is not JSON (Expecting property name enclosed in double quotes)",
        "j6": "empty text",
        "c2": "empty text",
        "p2": "no 'text' value",
    }
    assert all(r[c] is None for r in rows if r["error"] for c in PRED)
    assert rows[0]["input_label"] == 1 and "text" not in rows[0]  # the input's label kept apart; no text


def test_a_type_clash_inside_ray_becomes_one_line_naming_the_column():
    ray_error = RuntimeError("ray.data task failed")
    ray_error.__cause__ = pa.ArrowTypeError(
        "Unable to merge: Field id has incompatible types: int64 vs string"
    )
    err = schema_clash_inside(ray_error)
    assert "column 'id' (int64 vs string)" in str(err) and "\n" not in str(err)
    assert schema_clash_inside(RuntimeError("something else")) is None


def test_a_row_the_model_fails_on_costs_only_itself(trained_run):
    scorer = ScoreBatch(str(trained_run), device="cpu")
    real = scorer.clf.predict

    def fragile(texts, *a, **kw):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("cannot read BOOM")
        return real(texts, *a, **kw)

    scorer.clf.predict = fragile
    out = scorer(pa.table({"id": [1, 2, 3], "text": ["great film", "BOOM", "awful film"]})).to_pylist()
    assert [r["error"] for r in out] == [None, "RuntimeError: cannot read BOOM", None]
    assert out[0]["label"] and out[2]["label"] and out[1]["label"] is None


def test_score_refuses_what_it_cannot_do(trained_run, tmp_path, capsys):
    write_inputs(tmp_path / "in")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_text("earlier output")
    (tmp_path / "notext.csv").write_text("id,body\n1,hello\n")
    run, inp = str(trained_run), str(tmp_path / "in")
    cases = [
        (["--input", inp, "--output", str(tmp_path / "full")], "exists and is not empty; pass --overwrite"),
        (["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "no such file or folder"),
        (["--input", str(tmp_path / "notext.csv"), "--output", str(tmp_path / "o")], "--text-column"),
        (
            ["--input", inp, "--output", str(tmp_path / "o"), "--workers", "2"],
            "--workers applies to --engine ray only",
        ),
    ]
    for args, needle in cases:
        assert main(["score", run, *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["score", str(tmp_path), "--input", inp, "--output", str(tmp_path / "o")]) == 2  # not a run
    capsys.readouterr()
    # the model as a URI (docs/scale.md's cluster example gave one): said so, not "no such run directory"
    assert main(["score", "s3://bucket/exports/minilm", "--input", inp, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "MODEL s3://bucket/exports/minilm: the model is read from a local folder" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert (tmp_path / "full" / "x.parquet").read_text() == "earlier output"  # nothing replaced


def test_batch_flags_mean_what_they_mean_in_predict(trained_run, tmp_path, capsys, monkeypatch):
    import imdb_lora.scale.engines as engines

    write_inputs(tmp_path / "in")
    jobs = []
    monkeypatch.setattr(
        engines, "run_local", lambda job, device: jobs.append(job) or engines.Summary(0, 0, 1, [])
    )
    base = ["score", str(trained_run), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    flags = ["--rows-per-batch", "7", "--batch-size", "3", "--max-batch-tokens", "96"]
    assert main([*base, *flags]) == 0
    (job,) = jobs
    assert (job.rows_per_batch, job.model_batch_size, job.max_batch_tokens) == (7, 3, 96)
    scorer = ScoreBatch(**job.scorer_args("cpu"))  # what a worker loads: predict's caps, not the rows
    assert (scorer.batch_size, scorer.clf.max_batch_tokens) == (3, 96)
    capsys.readouterr()
    assert main([*base, "--overwrite", "--model-batch-size", "8"]) == 2  # the old name: one line, not ignored
    err = capsys.readouterr().err
    assert "--model-batch-size: was renamed: use --batch-size" in err and "Traceback" not in err


def test_local_engine_never_imports_ray(trained_run, tmp_path, capsys):
    if "ray" in sys.modules:
        pytest.skip("an earlier test of this session imported ray")
    write_inputs(tmp_path / "in")
    assert (
        main(["score", str(trained_run), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")])
        == 0
    )
    assert "ray" not in sys.modules


def test_raw_ignores_the_calibration_as_predict_does(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = json.loads((run / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({**record, "temperature": 3.0}))  # a visible one
    good = write_inputs(tmp_path / "in")
    texts, seen = list(good.values()), []
    for flags, clf in (([], Classifier.load(str(run))), (["--raw"], Classifier.load(str(run), raw=True))):
        out = tmp_path / f"out{len(flags)}"
        assert main(["score", str(run), "--input", str(tmp_path / "in"), "--output", str(out), *flags]) == 0
        ok = {row_id(r): r for r in read_output(out) if r["error"] is None}
        want = [p.positive for p in clf.predict(texts)]
        assert [ok[k]["prob_positive"] for k in good] == pytest.approx(want, abs=1e-6)
        seen.append(want)
    assert max(abs(a - b) for a, b in zip(*seen)) > 1e-6  # the temperature shows: --raw is not a no-op


# ---------------------------------------------------------------- real reviews, both engines


@pytest.fixture(scope="module")
def roberta_run(tiny_models, imdb_dir, tmp_path_factory) -> Path:
    """A tiny roberta run: the real roberta tokenizer reads real reviews as they are."""
    out = tmp_path_factory.mktemp("score") / "roberta"
    assert main(train_args(tiny_models("roberta"), imdb_dir, out, "--epochs", "1")) == 0
    return out


@pytest.fixture(scope="module")
def real_reviews(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """1,000 real IMDB test reviews (stratified) in a JSONL and a Parquet file, plus 4 bad rows."""
    from imdb_lora.data.imdb import load_imdb
    from imdb_lora.data.splits import stratified_subset

    if not DATA.is_file():
        pytest.skip(f"IMDB archive not found at {DATA}")
    test = load_imdb(DATA)["test"]
    idx = stratified_subset(test.labels, 1000, seed=0)
    rows = [{"review_id": f"r{i:05d}", "text": test.texts[i], "label": test.labels[i]} for i in idx]
    folder = tmp_path_factory.mktemp("reviews")
    with open(folder / "part1.jsonl", "w") as f:
        bad = [{"review_id": "bad1", "text": ""}, {"review_id": "bad2", "text": 42}]
        bad += [{"review_id": "bad4", "text": "great " * 20_000}]  # 120,000 characters: over --max-chars
        for r in rows[:600] + bad:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[600:] + [{"review_id": "bad3", "text": None, "label": 0}]),
                   folder / "part2.parquet")  # fmt: skip
    return folder, [(r["review_id"], r["text"]) for r in rows]


@pytest.fixture(scope="module")
def predicted(roberta_run, real_reviews, tmp_path_factory) -> dict[str, dict]:
    """`imdb-lora predict --json` on the same reviews: the reference."""
    folder, reviews = real_reviews
    texts = tmp_path_factory.mktemp("predict") / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in reviews))
    r = subprocess.run(
        [sys.executable, "-m", "imdb_lora", "predict", str(roberta_run), "--file", str(texts), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return {rid: json.loads(line) for (rid, _), line in zip(reviews, r.stdout.splitlines())}


def check_against_predict(out: Path, reviews: list[tuple[str, str]], predicted: dict[str, dict]) -> None:
    rows = read_output(out)
    ids = [r["review_id"] for r in rows]
    assert ids == [rid for rid, _ in reviews[:600]] + ["bad1", "bad2", "bad4"] + [
        rid for rid, _ in reviews[600:]
    ] + ["bad3"]  # every id kept, in input order
    by_id = {r["review_id"]: r for r in rows}
    assert {k: by_id[k]["error"] for k in ("bad1", "bad2", "bad3", "bad4")} == {
        "bad1": "empty text",
        "bad2": "'text' is a JSON int, not text",
        "bad3": "no 'text' value",
        "bad4": "text longer than 100,000 characters (120,000; --max-chars)",
    }
    # The marker beside the parts (never read as one): the job finished, with what the summary said.
    done = json.loads((out / "_imdb_lora_score.json").read_text())
    assert (done["status"], done["rows"], done["errors"]) == ("finished", 1004, 4)
    worst = 0.0
    for rid, _ in reviews:
        got, want = by_id[rid], predicted[rid]
        assert got["error"] is None and got["label"] == want["label"], rid
        for side in ("negative", "positive"):
            worst = max(worst, abs(got[f"prob_{side}"] - want["probabilities"][side]))
    assert worst <= 1e-6  # predict prints 6 decimals
    assert all(isinstance(by_id[rid]["input_label"], int) for rid, _ in reviews)


@pytest.mark.slow
def test_local_engine_matches_predict_on_real_reviews(roberta_run, real_reviews, predicted, tmp_path, capsys):
    folder, reviews = real_reviews
    args = ["score", str(roberta_run), "--input", str(folder), "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert "scored 1,004 rows" in capsys.readouterr().out
    check_against_predict(tmp_path / "out", reviews, predicted)


@pytest.mark.slow  # a real `imdb-lora score --engine ray` process starting its own Ray (~15-30 s)
def test_a_ray_job_whose_workers_cannot_load_the_model(trained_run, tmp_path):
    """Each actor's traceback was printed on the console some six times (its own output, forwarded to the
    driver), and the job ended in Ray's ActorDiedError traceback with exit status 1, its output "failed"
    with no part, refused to the rerun unless given --overwrite. Now: score's one line; no worker line;
    the workers' output is in Ray's session logs; the rerun on the mended model needs no --overwrite."""
    pytest.importorskip("ray")
    import imdb_lora

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    reviews = tmp_path / "in.jsonl"
    reviews.write_text('{"text": "great film"}\n{"text": "awful"}\n')
    src = str(Path(imdb_lora.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_LOG_TO_DRIVER", None)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "imdb_lora", "score", str(run), "--input", str(reviews),
               "--output", str(out), "--engine", "ray", "--workers", "2"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("imdb-lora:")]
    assert done.returncode == 2 and errors == [
        f"imdb-lora: error: the adapter weights in {run / 'adapter'} are damaged "
        "(Error while deserializing header: header too large)"
    ], done.stderr
    assert "(MapWorker(" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert json.loads((out / "_imdb_lora_score.json").read_text())["status"] == "failed"
    weights.write_bytes(good)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "scored 2 rows" in done.stdout, done.stderr


@pytest.mark.slow
def test_ray_engine_matches_predict_on_real_reviews(roberta_run, real_reviews, predicted, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    folder, reviews = real_reviews
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        args = ["score", str(roberta_run), "--input", str(folder), "--output", str(tmp_path / "out"),
                "--engine", "ray", "--rows-per-batch", "128"]  # fmt: skip
        assert main(args) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "scored 1,004 rows" in out and "4 rows with an error" in out
    check_against_predict(tmp_path / "out", reviews, predicted)


def test_ray_data_tracebacks_stay_off_the_console(capsys):
    import io
    import logging

    from imdb_lora.scale.engines import console_without_tracebacks

    logger = logging.getLogger("imdb-lora-test.ray.data")
    logger.propagate = False
    session_file = io.StringIO()  # Ray's session log file: keeps the whole traceback
    logger.handlers = [logging.StreamHandler(session_file), logging.StreamHandler()]  # the console: stderr
    console_without_tracebacks(logger)
    console_without_tracebacks(logger)  # once per handler, however many jobs ran
    assert len(logger.handlers[1].filters) == 1 and not logger.handlers[0].filters
    try:
        raise ValueError("inside a Ray task")
    except ValueError:
        logger.exception("An exception was raised from a task")
    logger.warning("no traceback here")
    err = capsys.readouterr().err
    assert err.splitlines() == ["An exception was raised from a task", "no traceback here"]
    assert "Traceback" in session_file.getvalue() and "inside a Ray task" in session_file.getvalue()


RAY_INTERNAL = "Exception occurred in Ray Data or Ray Core internal code. ... please open an issue"


def test_ray_datas_report_of_a_failure_score_says_in_one_line_stays_off_the_console(capsys, monkeypatch):
    """Ray Data (ray/data/exceptions.py) reports a failure it re-raises with two lines: the internal-code
    one (advice to open an issue with Ray) and "Full stack trace:" with the traceback. Without the
    traceback the second is bare (it was left on the console); the first is wrong for an input score
    cannot read, which score says in one line. Both stay in the session log; another failure (a Ray bug)
    keeps the advice."""
    import io
    import logging

    from imdb_lora.errors import UserError
    from imdb_lora.scale import engines

    parent = logging.getLogger("imdb-lora-test.ray.data")
    report = logging.getLogger("imdb-lora-test.ray.data.exceptions")  # ray.data.exceptions, in Ray
    monkeypatch.setattr(engines, "RAY_DATA_REPORT", report.name, raising=False)
    parent.propagate = False
    session_file = io.StringIO()
    parent.handlers = [logging.StreamHandler(session_file), logging.StreamHandler()]
    engines.console_without_tracebacks(parent)

    def ray_reports(failure: Exception) -> None:  # as ray.data.exceptions.omit_traceback_stdout does
        try:
            raise failure
        except Exception:
            report.error(RAY_INTERNAL)
            report.exception("Full stack trace:", exc_info=True)

    ray_reports(UserError("--input: cannot read b.csv after row 3 (CSV parse error)"))
    assert capsys.readouterr().err == ""
    assert session_file.getvalue().count(RAY_INTERNAL) == 1 and "Full stack trace:\nTraceback" in (
        session_file.getvalue()
    )
    ray_reports(RuntimeError("a bug in Ray"))
    assert capsys.readouterr().err.splitlines() == [RAY_INTERNAL]  # no bare "Full stack trace:"
    assert session_file.getvalue().count("Full stack trace:\nTraceback") == 2


def test_a_user_error_inside_ray_is_its_own_line_not_rays_traceback():
    """Ray re-raises a worker's UserError as a RayTaskError that is also a UserError, whose text is the
    worker's whole traceback; Ray Data appends its retry note to the error's own message. Real Ray
    classes, in a child process: this one never imports Ray (test_local_engine_never_imports_ray)."""
    pytest.importorskip("ray")
    code = """
import ray.exceptions
from imdb_lora.errors import UserError
from imdb_lora.scale.engines import user_error_inside
cause = UserError("--input: cannot read b.csv after row 3 (CSV parse error)")
cause.args = (cause.args[0] + "\\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",)
wrapped = ray.exceptions.RayTaskError("read_files", "Traceback (most recent call last):", cause)
print(repr(str(user_error_inside(wrapped.as_instanceof_cause()))))
"""
    import imdb_lora

    src = str(Path(imdb_lora.__file__).parents[1])  # this checkout's, as the tests import it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr("--input: cannot read b.csv after row 3 (CSV parse error)"), out.stdout
