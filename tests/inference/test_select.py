"""select: candidates are chosen on validation only; test is read once for the winner and the control."""

import json
from types import SimpleNamespace

import pytest

import imdb_lora.data.tokenize as tokenize
import imdb_lora.inference.selection as selection
from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.errors import UserError


def fake_runs(monkeypatch, val: dict, test: dict, keys: dict | None = None):
    """Runs whose validation and test accuracies are given per (run, stride); records every read."""
    reads = []

    def load(run, device="auto", **options):
        cfg = Config()
        cfg.train.seed = (keys or {}).get(run, 42)
        return SimpleNamespace(name=run, config=cfg, tokenizer=None)

    def evaluate(clf, split, max_samples, batch_size, stride, data, cache=None):
        reads.append((split, clf.name, stride))
        acc = (val if split == "val" else test)[(clf.name, stride)]
        return 1 - acc, acc, 100, 0.1

    monkeypatch.setattr(selection.Classifier, "load", load)
    monkeypatch.setattr(selection, "evaluate_split", evaluate)
    monkeypatch.setattr(tokenize, "window_layout", lambda tokenizer, max_length: ([0], [2], max_length - 2))
    return reads


def test_choice_uses_validation_only_and_test_is_read_once(monkeypatch):
    val = {("default", None): 0.90, ("default", 256): 0.91, ("ema", None): 0.93, ("ema", 256): 0.92}
    # test would prefer another candidate: it must not matter
    test = {("default", None): 0.95, ("default", 256): 0.99, ("ema", None): 0.80, ("ema", 256): 0.99}
    reads = fake_runs(monkeypatch, val, test)
    out = selection.select(["default", "ema"], [None, 256], log=lambda *_: None)
    assert out["chosen"] == {"run": "ema", "window_stride": 0, "val_accuracy": 0.93}
    assert [r for r in reads if r[0] == "test"] == [("test", "ema", None), ("test", "default", None)]
    assert all(r[0] == "val" for r in reads[:4])  # every validation read comes before any test read
    assert [t["role"] for t in out["test"]] == ["chosen", "control"]
    assert out["test"][0]["accuracy"] == 0.80


def test_ties_keep_the_earlier_candidate_and_the_control_is_not_read_twice(monkeypatch):
    val = {("default", None): 0.9, ("default", 128): 0.9, ("other", None): 0.9, ("other", 128): 0.9}
    reads = fake_runs(monkeypatch, val, {("default", None): 0.5})
    out = selection.select(["default", "other"], [None, 128], log=lambda *_: None)
    assert out["chosen"]["run"] == "default" and out["chosen"]["window_stride"] == 0
    assert [r for r in reads if r[0] == "test"] == [("test", "default", None)]


def test_runs_on_different_validation_splits_are_refused(monkeypatch):
    fake_runs(monkeypatch, {}, {}, keys={"a": 1, "b": 2})
    with pytest.raises(UserError, match="do not share one validation split"):
        selection.select(["a", "b"], [None], log=lambda *_: None)


def test_a_run_given_twice_is_refused_before_loading(monkeypatch, tmp_path):
    reads = fake_runs(monkeypatch, {}, {})
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="is given twice"):
        selection.select([str(tmp_path / "a"), str(tmp_path / "b"), f"{tmp_path}/./a"], [None])
    assert reads == []


def test_a_stride_too_long_for_a_run_is_refused_before_any_read(monkeypatch):
    reads = fake_runs(monkeypatch, {("a", None): 0.9, ("a", 510): 0.9}, {("a", None): 0.9})
    with pytest.raises(
        UserError,
        match=r"--window-strides must be in \(0, 510\] for a's max length 512 \(0: no windows\), got 511",
    ):
        selection.select(["a"], [None, 510, 511], log=lambda *_: None)
    assert reads == []
    selection.select(["a"], [None, 510], log=lambda *_: None)  # the whole window is a valid stride


@pytest.mark.parametrize(
    "text, error", [("x", "expected integers"), ("-1", "negative"), (",", "at least one")]
)
def test_bad_strides(text, error):
    with pytest.raises(UserError, match=error):
        selection.parse_strides(text)


def test_select_end_to_end(trained_run, capsys):
    assert selection.parse_strides("0,16,16") == [None, 16]
    args = ["select", str(trained_run), "--window-strides", "0,16", "--device", "cpu", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # standard output is the JSON alone; each split's line and the winner's: stderr
    chosen = result["chosen"]  # the JSON and the lines say one truncated window the same way: stride 0
    assert err.splitlines()[-1].startswith(
        f"chosen on validation: {trained_run} window_stride={chosen['window_stride']} ("
    )
    assert [(v["split"], v["window_stride"]) for v in result["validation"]] == [("val", 0), ("val", 16)]
    assert all(t["split"] == "test" for t in result["test"]) and len(result["test"]) in (1, 2)
    info = json.loads((trained_run / "run.json").read_text())
    assert result["validation"][0]["accuracy"] == pytest.approx(info["val_accuracy"])


def test_an_export_is_refused_before_loading(monkeypatch, tmp_path):
    reads = fake_runs(monkeypatch, {}, {})
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "imdb_lora_export.json").write_text("{}")
    with pytest.raises(UserError, match="is an export; select chooses among run directories"):
        selection.select(["a", str(tmp_path / "ex")], [None])
    assert reads == []
