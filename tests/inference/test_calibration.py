"""Calibration: the math on hand-made examples, the fit, one temperature on every inference path, and the
labeled-file evaluation (label spellings, confusion matrix, the most confident mistakes)."""

import json
import os
import shutil

import pytest
import torch
from conftest import train_args, without_startup

from imdb_lora.calibration import (
    brier,
    ece,
    figures,
    fit_temperature,
    most_confident_mistakes,
    reliability_bins,
)
from imdb_lora.cli import main
from imdb_lora.data.files import load_labeled_file
from imdb_lora.errors import UserError
from imdb_lora.inference.classifier import Classifier

TEXTS = [
    "great wonderful film i loved it",
    "awful boring plot and terrible acting",
    "the movie was a story and the acting was really " * 12,
    "superb moving brilliant",
    "a dull waste",
]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the math


def test_ece_and_brier_on_a_hand_made_example():
    probs = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.4, 0.6], [0.7, 0.3]])
    labels = [1, 0, 1, 0]  # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.7 (right)
    # bins: {0.9, 0.9} accuracy 0.5; {0.6} accuracy 1; {0.7} accuracy 1
    want = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert ece(probs, labels) == pytest.approx(want, abs=1e-6)
    assert brier(probs, labels) == pytest.approx((0.01 + 0.81 + 0.16 + 0.09) / 4, abs=1e-6)
    bins = reliability_bins(probs, labels)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    assert [b["count"] for b in bins if b["count"]] == [1, 1, 2]  # 0.6, 0.7, 0.9: ascending bins
    # a perfectly confident, always-right model is perfectly calibrated; confidence 1.0 lands in the last bin
    assert ece(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), [1, 0]) == 0
    assert reliability_bins(torch.tensor([[0.0, 1.0]]), [1])[-1]["count"] == 1


def overconfident_logits(n=400, seed=0):
    """An 80%-accurate classifier whose logits are 6x too large: confident and often wrong."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    signal = (2 * labels - 1).float() * 1.0 + torch.randn(n, generator=g) * 1.2
    logits = torch.stack([-signal, signal], -1) * 6
    return logits, labels


def test_fit_lowers_nll_and_ece_of_an_overconfident_model_and_never_moves_a_label():
    logits, labels = overconfident_logits()
    t = fit_temperature(logits, labels)
    before, after = figures(logits, labels), figures(logits, labels, t)
    assert t > 3  # the logits were 6x too large
    assert after["nll"] < before["nll"] - 0.2 and after["ece"] < before["ece"] / 2
    assert after["accuracy"] == before["accuracy"]
    assert torch.equal((logits / t).argmax(-1), logits.argmax(-1))
    # and an under-confident one gets a temperature below 1
    assert fit_temperature(logits / 40, labels) < 1


@pytest.mark.parametrize("seed", range(5))
def test_no_temperature_moves_the_argmax(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1000, 2, generator=g) * 5
    for t in (0.05, 0.3, 1.0, 2.7, 20.0):
        assert torch.equal((logits / t).softmax(-1).argmax(-1), logits.argmax(-1))


def test_most_confident_mistakes_come_first():
    probs = torch.tensor([[0.2, 0.8], [0.05, 0.95], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = [0, 0, 1, 1, 0]  # wrong: 0 (0.8), 1 (0.95), 2 (0.9); right: 3, 4
    assert most_confident_mistakes(probs, labels, 2) == [1, 2]
    assert most_confident_mistakes(probs, labels, 10) == [1, 2, 0]


# ---------------------------------------------------------------- labeled files


def test_label_spellings_and_columns(tmp_path):
    f = tmp_path / "mine.tsv"
    rows = ["0", "1", "negative", "POSITIVE", " Neg ", "pos", "Negative", "pOs"]
    f.write_text("review\tstars\n" + "".join(f"text {i}\t{y}\n" for i, y in enumerate(rows)))
    data = load_labeled_file(f, "--file", text_column="review", label_column="stars")
    assert data.labels == [0, 1, 0, 1, 0, 1, 0, 1] and data.texts[2] == "text 2"
    j = tmp_path / "mine.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "neg"}\n{"text": "c", "label": 0.0}\n')
    assert load_labeled_file(j).labels == [1, 0, 0]
    f.write_text("review\tstars\nfine\t1.0\nbad\t0.0\n")  # pandas writes a label column with a gap as floats
    assert load_labeled_file(f, "--file", text_column="review", label_column="stars").labels == [1, 0]
    for odd in ("0.5", "2.0", "true"):  # still refused: no label, or no agreed one
        f.write_text(f"review\tstars\nfine\t{odd}\n")
        with pytest.raises(UserError, match=f"line 2 has label '{odd}'"):
            load_labeled_file(f, "--file", text_column="review", label_column="stars")
    f.write_text("review\tstars\nfine\tmaybe\n")
    with pytest.raises(UserError, match=r"line 2 has label 'maybe'; labels must be 0 \(negative\)"):
        load_labeled_file(f, "--file", text_column="review", label_column="stars")
    with pytest.raises(UserError, match=r"--file: .* lacks column\(s\) \['text', 'label'\]"):
        load_labeled_file(f, "--file")


def mislabeled_csv(path, clf):
    """The probe texts, each labeled with the model's own prediction except two rows flipped."""
    pred = clf.logits(TEXTS).argmax(-1).tolist()
    labels = [1 - p if i in (0, 3) else p for i, p in enumerate(pred)]
    names = ["negative", "positive"]
    path.write_text("text,label\n" + "".join(f'"{t}",{names[y]}\n' for t, y in zip(TEXTS, labels)))
    return labels


def test_evaluate_file_reports_and_writes_the_most_confident_mistakes(trained_run, tmp_path, capsys):
    clf = Classifier.load(str(trained_run), device="cpu")
    f = tmp_path / "mine.csv"
    labels = mislabeled_csv(f, clf)
    code, out, err = run(capsys, "evaluate", trained_run, "--file", f, "--errors", "1",
                         "--errors-dir", tmp_path / "errs", "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    probs = clf.logits(TEXTS).softmax(-1)
    assert r["rows"] == 5 and r["accuracy"] == pytest.approx(0.6)
    assert sum(map(sum, r["confusion"])) == 5 and r["confusion"][0][1] + r["confusion"][1][0] == 2
    assert r["temperature"] == clf.temperature and r["window_stride"] == 0  # one truncated window (was null)
    written = [
        json.loads(line) for line in (tmp_path / "errs" / "mine.csv.errors.jsonl").read_text().splitlines()
    ]
    wrong = [0, 3]
    top = max(wrong, key=lambda i: probs[i].max().item())
    assert len(written) == 1 and written[0]["row"] == top + 1 and written[0]["text"] == TEXTS[top]
    assert written[0]["line"] == top + 2  # the header is line 1; no cell of mine.csv spans lines
    assert written[0]["label"] == ["NEGATIVE", "POSITIVE"][labels[top]] != written[0]["predicted"]
    assert written[0]["confidence"] == pytest.approx(probs[top].max().item(), abs=1e-6)
    # never overwritten silently; --overwrite replaces (with all mistakes this time)
    code, _, err = run(
        capsys, "evaluate", trained_run, "--file", f, "--errors", "5", "--errors-dir", tmp_path / "errs"
    )
    assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1
    code, out, _ = run(capsys, "evaluate", trained_run, "--file", f, "--errors", "5",
                       "--errors-dir", tmp_path / "errs", "--overwrite")  # fmt: skip
    assert code == 0 and "2 most confident mistakes written to" in out and "NEGATIVE" in out
    assert len((tmp_path / "errs" / "mine.csv.errors.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "n, line", [(1, "1 most confident mistake written"), (2, "2 most confident mistakes written")]
)
def test_the_errors_line_says_mistake_for_one(n, line):
    from imdb_lora.cli.evaluate import _file_text

    r = {"file": "f.csv", "accuracy": 0.5, "loss": 0.7, "ece": 0.1, "brier": 0.25, "rows": 4,
         "confusion": [[1, 1], [1, 1]], "errors_file": "e.jsonl", "errors_written": n}  # fmt: skip
    assert _file_text(r).splitlines()[-1] == f"  {line} to e.jsonl"  # was "1 most confident mistakes"


def test_evaluate_file_says_row_for_a_one_row_file(trained_run, tmp_path, capsys):
    f = tmp_path / "one.csv"
    f.write_text("text,label\ngreat wonderful film,1\n")
    code, out, err = run(capsys, "evaluate", trained_run, "--file", f, "--device", "cpu")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(f"{f}: "))
    assert line.endswith("| 1 row"), out  # was "| 1 rows"


def test_an_errors_file_written_meanwhile_by_another_process_is_kept(
    trained_run, tmp_path, capsys, monkeypatch
):
    """Two `evaluate --errors-dir D` of one file name at once both passed the "exists" check before
    evaluating, and the later replaced the earlier's mistakes without a word."""
    import imdb_lora.calibration as calibration

    f, errs = tmp_path / "mine.csv", tmp_path / "errs"
    mislabeled_csv(f, Classifier.load(str(trained_run), device="cpu"))
    errs.mkdir()
    mistakes = calibration.most_confident_mistakes

    def another_evaluate_wrote_first(*args, **kw):
        (errs / "mine.csv.errors.jsonl").write_text("the other process's mistakes\n")
        return mistakes(*args, **kw)

    monkeypatch.setattr(calibration, "most_confident_mistakes", another_evaluate_wrote_first)
    code, _, err = run(capsys, "evaluate", trained_run, "--file", f, "--errors", "5", "--errors-dir", errs)
    assert code == 2 and err.splitlines()[-1] == (
        f"imdb-lora: error: --errors: {errs / 'mine.csv.errors.jsonl'} was written by another process during "
        "this evaluation; it is kept: pass --overwrite to replace it or choose another --errors-dir"
    )
    assert os.listdir(errs) == ["mine.csv.errors.jsonl"]  # no temporary copy left beside it
    assert (errs / "mine.csv.errors.jsonl").read_text() == "the other process's mistakes\n"
    # with --overwrite, the later evaluation's file replaces it, as asked
    code, _, _ = run(
        capsys, "evaluate", trained_run, "--file", f, "--errors", "5", "--errors-dir", errs, "--overwrite"
    )
    assert code == 0 and "the other" not in (errs / "mine.csv.errors.jsonl").read_text()


def test_evaluate_file_on_a_full_disk_is_one_line_and_keeps_the_old_errors_file(
    trained_run, tmp_path, capsys, monkeypatch
):
    """A full disk under the mistakes file ended in an OSError traceback and left a half-written
    mine.csv.errors.jsonl.tmp beside it."""
    import errno
    from pathlib import Path

    f, errs = tmp_path / "mine.csv", tmp_path / "errs"
    mislabeled_csv(f, Classifier.load(str(trained_run), device="cpu"))
    errs.mkdir()
    (errs / "mine.csv.errors.jsonl").write_text("the earlier mistakes\n")
    write_text = Path.write_text

    def full_disk(self, text, *args, **kw):
        write_text(self, text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, _, err = run(
        capsys, "evaluate", trained_run, "--file", f, "--errors", "5", "--errors-dir", errs, "--overwrite"
    )
    assert code == 2 and err.splitlines()[-1] == (
        f"imdb-lora: error: --errors: cannot write {errs / 'mine.csv.errors.jsonl'} (No space left on device); "
        "free some space or choose another --errors-dir"
    )
    assert os.listdir(errs) == ["mine.csv.errors.jsonl"]
    assert (errs / "mine.csv.errors.jsonl").read_text() == "the earlier mistakes\n"
    # an --errors-dir the failed write created is not left behind, empty
    code, _, _ = run(
        capsys, "evaluate", trained_run, "--file", f, "--errors", "5", "--errors-dir", tmp_path / "a/b"
    )
    assert code == 2 and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--file", "missing.csv"], "--file: no such file"),
        (["--file", "x.csv", "--split", "val"], "--split selects a split"),
        (["--errors", "3"], "need --file"),
        (["--file", "x.csv", "--errors", "0"], "expected a positive integer"),
        # without --errors it was ignored: no mistakes file was written, and nothing said so
        (["--file", "x.csv", "--errors-dir", "out"], "--errors-dir needs --errors"),
        (["--errors-dir", "out"], "--errors-dir needs --errors"),
    ],
)
def test_evaluate_file_mistakes_are_one_line(trained_run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("text,label\nfine,pos\n")
    code, _, err = run(capsys, "evaluate", trained_run, *extra)
    assert code == 2 and message in err.splitlines()[-1]


# ---------------------------------------------------------------- one temperature everywhere


@pytest.fixture(scope="module")
def hot_run(trained_run, tmp_path_factory):
    """A copy of the tiny run with a temperature far from 1, so that forgetting it anywhere shows."""
    dest = tmp_path_factory.mktemp("hot") / "run"
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns(".lock"))
    record = json.loads((trained_run / "calibration.json").read_text())
    (dest / "calibration.json").write_text(json.dumps({**record, "temperature": 0.25}))
    return dest


def test_every_path_applies_the_same_temperature(hot_run, tmp_path):
    from fastapi.testclient import TestClient

    from imdb_lora.serving.app import ServeSettings, create_app

    raw = Classifier.load(str(hot_run), device="cpu", raw=True)
    assert raw.temperature == 1.0
    want = (raw.logits(TEXTS) / 0.25).softmax(-1)
    clf = Classifier.load(str(hot_run), device="cpu")
    assert clf.temperature == 0.25 and "0.2500" in clf.calibration_note
    assert torch.allclose(clf.logits(TEXTS).softmax(-1), want, atol=1e-6)
    preds = clf.predict(TEXTS)
    assert torch.allclose(torch.tensor([[p.negative, p.positive] for p in preds]), want, atol=1e-6)
    assert (want - raw.logits(TEXTS).softmax(-1)).abs().max() > 1e-2  # forgetting the temperature shows
    for name, extra in (("merged", []), ("onnx", ["--format", "onnx"]), ("int8", ["--format", "onnx", "--quantize", "int8"])):  # fmt: skip
        assert main(["export", str(hot_run), "--to", str(tmp_path / name), *extra]) == 0
        assert json.loads((tmp_path / name / "calibration.json").read_text())["temperature"] == 0.25
        exported = Classifier.load(str(tmp_path / name))
        assert exported.temperature == 0.25
        got = exported.logits(TEXTS).softmax(-1)
        if name == "int8":  # quantized weights: the labels and the temperature, not the last digits
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            assert (
                Classifier.load(str(tmp_path / name), raw=True).logits(TEXTS) / 0.25 - exported.logits(TEXTS)
            ).abs().max() < 1e-4
        else:
            assert (got - want).abs().max() < 1e-4, name
    settings = ServeSettings(max_texts=8, max_chars=1000)
    with TestClient(create_app(clf, settings)) as c:
        body = c.post("/predict", json={"texts": TEXTS}).json()
    served = [[p["probabilities"]["negative"], p["probabilities"]["positive"]] for p in body["predictions"]]
    assert torch.allclose(torch.tensor(served), want, atol=1e-4)


def test_old_run_without_calibration_file_uses_temperature_1(hot_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(hot_run, old)
    (old / "calibration.json").unlink()
    clf = Classifier.load(str(old), device="cpu")
    assert clf.temperature == 1.0
    raw = Classifier.load(str(hot_run), device="cpu", raw=True)
    assert torch.allclose(clf.logits(TEXTS), raw.logits(TEXTS))
    code, out, _ = run(capsys, "evaluate", old, "--split", "val")
    assert code == 0 and "no calibration.json (uncalibrated run): temperature 1" in out
    (old / "calibration.json").write_text("{not json")
    code, _, err = run(capsys, "predict", old, "fine")
    assert code == 2 and "calibration.json is unreadable" in err
    assert run(capsys, "predict", old, "fine", "--raw")[0] == 0  # --raw does not read it


def test_predict_raw_ignores_the_temperature(hot_run, capsys):
    code, out, _ = run(capsys, "predict", hot_run, "--json", *TEXTS[:2])
    hot = [json.loads(line)["confidence"] for line in out.splitlines()]
    code, out, _ = run(capsys, "predict", hot_run, "--json", "--raw", *TEXTS[:2])
    cold = [json.loads(line)["confidence"] for line in out.splitlines()]
    assert all(h >= c for h, c in zip(hot, cold)) and hot != cold  # T < 1 sharpens


# ---------------------------------------------------------------- training


def test_training_calibrates_the_kept_checkpoint_and_reports_eval_files(
    trained_run, tiny_models, imdb_dir, tmp_path, capsys
):
    info = json.loads((trained_run / "run.json").read_text())
    cal = info["calibration"]
    record = json.loads((trained_run / "calibration.json").read_text())
    assert cal["enabled"] and record["temperature"] == cal["temperature"] > 0
    for split in ("val", "test"):
        before, after = cal[split]["before"], cal[split]["after"]
        assert before["accuracy"] == after["accuracy"]  # temperature never moves a label
    assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"] + 1e-6  # fitted on validation
    # the figures are the kept checkpoint's: its validation accuracy is the record's
    assert cal["val"]["before"]["accuracy"] == pytest.approx(info["val_accuracy"], abs=1e-6)
    assert cal["test"]["before"]["accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-6)
    assert (trained_run / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Calibration" in (trained_run / "results.md").read_text()
    assert "- Calibration: temperature" in (trained_run / "README.md").read_text()

    # --no-calibration and --eval-file (three times, one of one row), 1 epoch
    f1, f2, f3 = tmp_path / "a.csv", tmp_path / "b.jsonl", tmp_path / "c.csv"
    f1.write_text("text,label\ngreat wonderful film,Positive\nawful boring,neg\nloved it,POS\n")
    f2.write_text('{"text": "terrible waste", "label": 0}\n{"text": "superb", "label": "positive"}\n')
    f3.write_text("text,label\ndull,0\n")
    out = tmp_path / "run"
    args = train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1", "--no-calibration",
                      "--eval-file", str(f1), "--eval-file", str(f2), "--eval-file", str(f3))  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval file ")]
    assert [line.rsplit("| ", 1)[1] for line in lines] == ["3 rows", "2 rows", "1 row"]  # was "1 rows"
    info = json.loads((out / "run.json").read_text())
    assert not (out / "calibration.json").exists() and not info["calibration"]["enabled"]
    assert "after" not in info["calibration"]["val"]
    assert [(f["file"], f["rows"]) for f in info["eval_files"]] == [
        ("a.csv", 3),
        ("b.jsonl", 2),
        ("c.csv", 1),
    ]
    for f in info["eval_files"]:
        assert sum(map(sum, f["confusion"])) == f["rows"] and 0 <= f["ece"] <= 1
    results = (out / "results.md").read_text()
    assert "Calibration off" in results and "| a.csv | 3 |" in results
    assert Classifier.load(str(out), device="cpu").temperature == 1.0


def test_the_temperature_is_fitted_on_validation_and_test_is_only_reported(tmp_path):
    """after_training on a stand-in trainer whose validation logits are 6x too confident and whose test
    logits are not confident enough: the temperature is validation's fit, whatever test would want."""
    from types import SimpleNamespace

    from imdb_lora.config import Config
    from imdb_lora.runs.rundir import RunDir
    from imdb_lora.training.posthoc import after_training

    val, val_y = overconfident_logits(seed=1)
    test, test_y = overconfident_logits(seed=2)
    test = test / 40
    val_ids, test_ids = [[0]] * len(val), [[1]] * len(test)
    logits_of = {id(val_ids): val, id(test_ids): test}
    passes = []  # the names their progress bars show
    tr = SimpleNamespace(
        cfg=Config().validate(),
        state=SimpleNamespace(history=[{"epoch": 1}], best_epoch=1, best_weights="raw"),
        run=RunDir(tmp_path), val_ids=val_ids, val_y=val_y, test_ids=test_ids, test_y=test_y,
        eval_files=[], eval_logits=lambda seqs, name: passes.append(name) or logits_of[id(seqs)],
        kept_logits=None,  # no epoch evaluation's logits in memory: both splits are evaluated
    )  # fmt: skip
    post = after_training(tr)
    assert passes == ["validation, kept checkpoint", "test, kept checkpoint"]  # not the epoch's bars again
    want = fit_temperature(val, val_y)
    assert want > 3 and fit_temperature(test, test_y) < 1
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert (
        record["temperature"] == post.summary["calibration"]["temperature"] == pytest.approx(want, rel=1e-6)
    )
    assert record["fitted_on"] == "validation" and record["epoch"] == 1
    for split, (logits, labels) in {"val": (val, val_y), "test": (test, test_y)}.items():
        assert record[split]["before"] == pytest.approx(figures(logits, labels))
        assert record[split]["after"] == pytest.approx(figures(logits, labels, want))


def test_a_bad_eval_file_fails_before_training(tiny_models, imdb_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,3\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(tiny_models("bert"), imdb_dir, out, "--eval-file", bad))
    err = without_startup(err)
    assert code == 2 and "--eval-file:" in err and "line 2 has label '3'" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_restoring_the_kept_checkpoint(tiny_models, tmp_path, method):
    from imdb_lora.config import Config
    from imdb_lora.modeling.lora import build_model
    from imdb_lora.runs.rundir import RunDir
    from imdb_lora.training.posthoc import restore_kept_weights

    cfg = Config()
    cfg.model.name, cfg.train.method = str(tiny_models("bert")), method
    model, _ = build_model(cfg.validate())
    run = RunDir(tmp_path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():
            p.add_(torch.randn_like(p))
    kept = {n: p.detach().clone() for n, p in trainable.items()}
    run.save_weights(model, method)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)  # the later, worse epoch
    restore_kept_weights(model, run, method)
    for n, p in trainable.items():
        assert torch.equal(p, kept[n]), n
