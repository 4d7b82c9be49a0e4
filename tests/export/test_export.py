"""export: merged and ONNX exports predict what the run predicts; int8 stays close; user mistakes exit 2."""

import json
from pathlib import Path

import pytest
import torch
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.inference.classifier import Classifier
from imdb_lora.inference.exported import MARKER

TEXTS = [
    "great wonderful film i loved it",
    "awful boring plot and terrible acting",
    "the movie was a story and the acting was really " * 12,  # long: padding inside a batch
    "a",
]


def export(run, dest, *extra) -> int:
    return main(["export", str(run), "--to", str(dest), *extra])


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """merged, onnx and onnx-int8 exports of the tiny LoRA run."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, extra in (
        ("merged", []),
        ("onnx", ["--format", "onnx"]),
        ("int8", ["--format", "onnx", "--quantize", "int8"]),
    ):
        assert export(trained_run, root / name, *extra) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def reference(trained_run):
    return Classifier.load(str(trained_run), device="cpu").logits(TEXTS, batch_size=3)


@pytest.mark.parametrize("name", ["merged", "onnx"])
def test_fp32_exports_predict_what_the_run_predicts(exports, reference, name):
    clf = Classifier.load(str(exports[name]))
    got = clf.logits(TEXTS, batch_size=3)
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()
    assert clf.backend == ("torch" if name == "merged" else "onnxruntime")


def test_int8_export_stays_close(exports, reference):
    got = Classifier.load(str(exports["int8"])).logits(TEXTS)
    assert (got.softmax(-1) - reference.softmax(-1)).abs().max() < 0.02


def test_export_folder_is_self_contained_and_safe(exports, trained_run):
    for name, folder in exports.items():
        marker = json.loads((folder / MARKER).read_text())
        assert marker["format"] == ("merged" if name == "merged" else "onnx")
        assert marker["check"]["labels_agree"] == marker["check"]["texts"]
        assert (folder / "config.yaml").is_file() and (folder / "run.json").is_file()
        assert (folder / "tokenizer").is_dir()
        files = {p.suffix for p in folder.rglob("*") if p.is_file()}
        assert not files & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, files  # safetensors/onnx only
    assert (exports["merged"] / "model" / "model.safetensors").is_file()
    assert (exports["onnx"] / "model.onnx").is_file() and not (exports["onnx"] / "model").exists()
    int8 = json.loads((exports["int8"] / MARKER).read_text())
    assert int8["quantize"] == "int8" and int8["quantization"]["excluded"]  # the head stays fp32
    assert (exports["int8"] / "model.onnx").stat().st_size < (exports["onnx"] / "model.onnx").stat().st_size


def test_no_file_of_an_export_holds_a_machine_path(exports, tmp_path_factory):
    """Every file an export writes (config, record, marker, tokenizer, weights, ONNX graph) is free of
    the paths of this machine: the run's, the base model's and the data's folders all live under the
    session's base temp folder; the home, repository and Python installation folders are checked too."""
    from conftest import REPO

    site_packages = str(Path(torch.__file__).parents[1])  # where a graph's stack traces would point
    machine = [str(tmp_path_factory.getbasetemp()), str(Path.home()), str(REPO), site_packages]
    for folder in exports.values():
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"config.yaml", "run.json", MARKER}
        for p in files:
            data = p.read_bytes()
            found = [m for m in machine if m.encode() in data]
            assert not found, f"{p.relative_to(folder)} holds {found}"
    cfg = Config.load(exports["onnx"] / "config.yaml")
    assert cfg.model.name == "bert" and cfg.data.path is None  # named, not located
    info = json.loads((exports["onnx"] / "run.json").read_text())
    assert info["data_source"]["path"] == "aclImdb" and info["model"] == "bert"


def test_predict_and_evaluate_accept_an_export(exports, trained_run, imdb_dir, capsys):
    assert main(["predict", str(exports["onnx"]), "--json", TEXTS[0]]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["predict", str(trained_run), "--json", TEXTS[0]]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_export["label"] == from_run["label"]
    assert abs(from_export["confidence"] - from_run["confidence"]) < 1e-5
    # evaluate takes its data settings from the config.yaml saved in the export
    assert main(["evaluate", str(exports["int8"]), "--data", str(imdb_dir), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(trained_run), "--data", str(imdb_dir), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert ev["examples"] == run["examples"] == 48
    # int8 may flip a review whose probability sits at 0.5, not more; the loss moves by hundredths
    assert abs(ev["accuracy"] - run["accuracy"]) <= 1 / 48 and abs(ev["loss"] - run["loss"]) < 0.01


def test_roberta_onnx_export_fuses_and_matches(tiny_models, imdb_dir, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(tiny_models("roberta"), imdb_dir, run, "--epochs", "1")) == 0
    assert export(run, tmp_path / "onnx", "--format", "onnx") == 0
    marker = json.loads((tmp_path / "onnx" / MARKER).read_text())
    assert marker["fusions"].get("Attention") == 2  # the fast fused path, not just a correct graph
    want = Classifier.load(str(run), device="cpu").logits(TEXTS)
    got = Classifier.load(str(tmp_path / "onnx")).logits(TEXTS)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite"], "unknown format 'tflite'"),
        (["--format", "onnx", "--quantize", "int4"], "unknown quantization 'int4'"),
        (["--quantize", "int8"], "needs --format onnx"),
    ],
)
def test_bad_options_exit_2_with_one_line(trained_run, tmp_path, capsys, args, message):
    assert export(trained_run, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_run_exits_2(tmp_path, capsys):
    assert export(tmp_path / "nope", tmp_path / "out") == 2
    assert "no such run directory" in capsys.readouterr().err


def test_existing_folder_needs_overwrite_and_overwrite_replaces_only_exports(
    exports, trained_run, tmp_path, capsys
):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert export(trained_run, busy) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export(trained_run, busy, "--overwrite") == 2  # never wipes a folder export did not write
    assert "not an imdb-lora export" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    assert export(trained_run, again) == 0
    assert export(trained_run, again, "--format", "onnx", "--overwrite") == 0
    assert (again / "model.onnx").is_file() and not (again / "model").exists()
    assert not list(tmp_path.glob(".*export-*"))  # no staging leftovers


def test_exporting_an_export_or_into_the_run_is_refused(exports, trained_run, tmp_path, capsys):
    assert export(exports["merged"], tmp_path / "x") == 2
    assert "already an export" in capsys.readouterr().err
    assert export(trained_run, trained_run / "inside") == 2
    assert "outside the run directory" in capsys.readouterr().err


def test_onnx_export_refuses_cuda(exports):
    from imdb_lora.errors import UserError

    with pytest.raises(UserError, match="run on the CPU"):
        Classifier.load(str(exports["onnx"]), device="cuda")
