"""export: merged and ONNX exports predict what the run predicts; int8 stays close; user mistakes exit 2."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.errors import UserError
from imdb_lora.export.exporter import check_options
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
    session's temporary root; the home, repository and Python installation folders are checked too."""
    from conftest import REPO

    site_packages = str(Path(torch.__file__).parents[1])  # where a graph's stack traces would point
    temp = str(tmp_path_factory.getbasetemp().parent)  # every xdist worker's and the shared folders
    machine = [temp, str(Path.home()), str(REPO), site_packages]
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
    "fmt, quantize, error",
    [
        ("onx", None, "--format: unknown format 'onx'; choose from merged, onnx; did you mean onnx?"),
        ("onnx", "in8", "--quantize: unknown quantization 'in8'; choose from int8; did you mean int8?"),
        ("tflite", None, "--format: unknown format 'tflite'; choose from merged, onnx"),  # nothing close
    ],
)
def test_a_mistyped_format_names_the_close_one(fmt, quantize, error):
    with pytest.raises(UserError) as e:
        check_options(fmt, quantize)
    assert str(e.value) == error


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


def test_overwrite_never_deletes_the_run_it_exports_nor_the_current_directory(
    trained_run, tmp_path, monkeypatch, capsys
):
    """An export folder that holds the run being exported (or the shell's directory) is not replaced:
    the swap would delete the run, and the folder the user stands in."""
    import shutil

    outer = tmp_path / "outer"
    assert export(trained_run, outer) == 0
    inner_run = Path(shutil.copytree(trained_run, outer / "my-run"))
    capsys.readouterr()
    assert export(inner_run, outer, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds the run directory" in err and err.count("\n") == 1
    assert (inner_run / "adapter" / "adapter_model.safetensors").is_file()  # the run is intact

    monkeypatch.chdir(outer)
    for to in (".", "", str(outer)):
        assert export(trained_run, to, "--overwrite") == 2
        err = capsys.readouterr().err
        assert "holds the current directory" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (outer / MARKER).is_file() and (outer / "my-run").is_dir()


def test_an_export_into_the_empty_current_directory_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    """The swap moved the (empty) current folder away: the export landed, then os.getcwd() raised
    FileNotFoundError as a traceback, and the shell was left in a deleted folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for to in (".", "", str(here)):
        assert export(trained_run, to) == 2
        err = capsys.readouterr().err
        assert "holds the current directory" in err and err.count("\n") == 1 and "Traceback" not in err
    assert os.getcwd() == str(here) and not any(here.iterdir())


def test_a_second_export_into_the_same_folder_is_refused_and_steps_are_shown(trained_run, tmp_path, capsys):
    """Two exports into one folder would wipe each other's staging folder (both crashed with a
    traceback) or the later one would silently replace the earlier one's export: the second is refused
    in one line naming the first one's pid. Each slow step is said on stderr as it starts."""
    import fcntl
    import os

    dest = tmp_path / "x"
    lock = tmp_path / ".x.export-lock"
    with open(lock, "a+") as held:  # what a running export holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert export(trained_run, dest, "--format", "onnx") == 2
        err = capsys.readouterr().err
        assert "being written by another imdb-lora export (pid 4242)" in err and err.count("\n") == 1
        assert not dest.exists() and not (tmp_path / ".x.export-tmp").exists()
    # a failure once the folders above --to were made (here: no model at --base-model) removes them
    assert export(trained_run, tmp_path / "new" / "deep" / "x", "--base-model", str(tmp_path)) == 2
    assert "--base-model" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert export(trained_run, dest, "--format", "onnx", "--quantize", "int8") == 0
    out, err = capsys.readouterr()
    assert out.startswith("exported to") and out.count("\n") == 1  # stdout: the summary alone
    steps = ["loading", "writing the merged model", "exporting to ONNX", "fusing", "int8", "checking"]
    lines = err.splitlines()
    assert len(lines) == len(steps) and all(s in line for s, line in zip(steps, lines)), err
    assert sorted(os.listdir(tmp_path)) == ["x"]  # no lock file nor staging folder left beside it


def test_overwrite_through_a_symlink_replaces_the_export_it_points_to(trained_run, tmp_path):
    """The link itself was swapped out: the old export stayed where the link had pointed, a new folder
    took the link's place, and the link was left behind as a hidden .NAME.export-old."""
    assert export(trained_run, tmp_path / "real") == 0
    (tmp_path / "link").symlink_to("real")
    assert export(trained_run, tmp_path / "link", "--format", "onnx", "--overwrite") == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_an_export_killed_between_its_two_renames_loses_nothing(trained_run, tmp_path, capsys):
    """A SIGKILL after the old export was set aside (.x.export-old) and before the new one was moved in
    left x missing: predict said only "no such run directory", and the next export into x deleted the
    set-aside export unseen. Now it is named, then put back before anything replaces it."""
    import os
    import shutil

    dest, old = tmp_path / "x", tmp_path / ".x.export-old"
    assert export(trained_run, dest) == 0
    marker = (dest / MARKER).read_text()
    os.replace(dest, old)  # what the killed export left: its first rename done, its second not
    capsys.readouterr()
    assert main(["predict", str(dest), "great film"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run directory" in err and ".x.export-old" in err

    assert export(trained_run, dest, "--format", "onnx") == 2  # put back, so it needs --overwrite
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"restored {dest} from .x.export-old") and "pass --overwrite" in err[-1]
    assert (dest / MARKER).read_text() == marker and not old.exists()

    shutil.copytree(dest, old)  # killed after the swap, before the leftover's removal: both exist
    assert export(trained_run, dest, "--format", "onnx", "--overwrite") == 0
    assert (dest / "model.onnx").is_file() and sorted(os.listdir(tmp_path)) == ["x"]


def test_a_full_disk_is_one_line_naming_to_and_keeps_the_earlier_export(
    exports, trained_run, tmp_path, capsys, monkeypatch
):
    """A full disk under the export was safetensors' or onnx's traceback naming the hidden staging folder
    (or, for int8, a "corrupt model" from a copy onnx had written truncated)."""
    import shutil

    from safetensors import SafetensorError

    from imdb_lora.export import exporter

    def full_disk(*args, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    dest = Path(shutil.copytree(exports["merged"], tmp_path / "ex"))
    monkeypatch.setattr(exporter, "write_portable_record", full_disk)
    assert export(trained_run, dest, "--overwrite") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"imdb-lora: error: --to {dest}: cannot write (No space left on device); the export there is kept; "
        "free some space and export again"
    )
    assert sorted(os.listdir(tmp_path)) == ["ex"] and (dest / MARKER).is_file()


# ---------------------------------------------------------------- without imdb-lora: transformers, onnxruntime

LONG_REVIEW = "the movie was great and the acting was wonderful " * 40  # ~400 tokens: past 64 and past 128


def test_merged_export_in_a_plain_pipeline_names_its_labels_and_gives_predict_raw(exports):
    """pipeline("text-classification") on the merged export answered LABEL_0/LABEL_1 (config.json had
    no id2label) and failed on a long review even with truncation=True (the tokenizer's model_max_length
    was its base's, 1e30 here: an IndexError past the model's positions). Its probabilities are the
    run's raw ones (predict --raw); imdb-lora's calibrated ones divide the logits by the temperature."""
    from transformers import AutoConfig, pipeline

    folder = exports["merged"]
    config = AutoConfig.from_pretrained(folder / "model")
    assert config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert config.label2id == {"NEGATIVE": 0, "POSITIVE": 1}
    pipe = pipeline("text-classification", model=str(folder / "model"), tokenizer=str(folder / "tokenizer"))
    texts = [*TEXTS, LONG_REVIEW]
    got = pipe(texts, top_k=None, truncation=True)
    probs = torch.tensor(
        [[{d["label"]: d["score"] for d in row}[k] for k in ("NEGATIVE", "POSITIVE")] for row in got]
    )
    raw = Classifier.load(str(folder), raw=True).logits(texts).softmax(-1)
    assert torch.allclose(probs, raw, atol=1e-5), (probs - raw).abs().max()


@pytest.mark.parametrize("name", ["onnx", "int8"])
def test_onnx_export_runs_in_plain_onnxruntime_on_a_long_review(exports, name):
    """The graph takes int64 input_ids and attention_mask with dynamic batch and sequence axes; a long
    review cut by the export's own tokenizer (truncation=True) fits its positions (onnxruntime's
    GatherElements failed on it before) and gives the run's raw logits."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    folder = exports[name]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
    ]
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    enc = tok([TEXTS[0], LONG_REVIEW], truncation=True, padding=True, return_tensors="np")
    assert enc["input_ids"].shape[1] == 64  # the run's --max-length
    (logits,) = session.run(["logits"], {k: enc[k] for k in ("input_ids", "attention_mask")})
    want = Classifier.load(str(folder), raw=True).logits([TEXTS[0], LONG_REVIEW])
    tolerance = 1e-4 if name == "onnx" else 0.05
    assert np.abs(logits - want.numpy()).max() < tolerance
    # what onnxruntime cannot know from the graph rides in its metadata: labels, the cut, the temperature
    meta = session.get_modelmeta().custom_metadata_map
    clf = Classifier.load(str(folder))
    assert json.loads(meta["id2label"]) == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert (meta["max_length"], meta["truncation"]) == ("64", "head")
    assert float(meta["temperature"]) == clf.temperature != 1.0
    calibrated = torch.from_numpy(logits / float(meta["temperature"])).softmax(-1)
    assert torch.allclose(calibrated, clf.logits([TEXTS[0], LONG_REVIEW]).softmax(-1), atol=tolerance)


def test_int8_quantizing_on_a_full_disk_says_enospc_and_other_failures_stay_theirs(tmp_path, monkeypatch):
    """onnx's shape inference writes a truncated copy on a full disk and then fails reading it as a corrupt
    model: with no room left for a copy of the graph, that failure is the full disk's ENOSPC (which the
    CLI says in one line); with room, the original error is kept."""
    import errno
    import shutil
    from collections import namedtuple

    from imdb_lora.export import onnx as onnx_export

    graph = tmp_path / "fused.onnx"
    graph.write_bytes(b"x" * 1000)
    usage = namedtuple("usage", "total used free")

    def corrupt():
        with onnx_export._full_disk_as_oserror(graph):
            raise ValueError("Error parsing message with type 'onnx.ModelProto'")

    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 9_500, 500))
    with pytest.raises(OSError) as e:
        corrupt()
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 5_000, 5_000))
    with pytest.raises(ValueError, match="onnx.ModelProto"):
        corrupt()


def test_an_export_names_a_labeled_file_it_cannot_find_as_its_config_key(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """An export's config.yaml names a run's labeled files without this machine's path (t.csv): read in
    the current folder, so the line names the export's setting and says so; there, evaluate reads it."""
    (tmp_path / "data").mkdir()
    rows = "".join(f"a good film {i},1\na bad film {i},0\n" for i in range(12))
    (tmp_path / "data" / "t.csv").write_text(f"text,label\n{rows}")
    args = train_args(tiny_models("bert"), tmp_path, tmp_path / "run", "--epochs", "1")
    args[args.index("--data") : args.index("--data") + 2] = ["--train-file", str(tmp_path / "data" / "t.csv")]
    assert main(args) == 0 and export(tmp_path / "run", tmp_path / "exp") == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tmp_path / "exp"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"imdb-lora: error: {tmp_path / 'exp' / 'config.yaml'}: data.train_file: no such file: t.csv; the "
        "export names the file only: run the command in the folder that holds it, or evaluate a labeled "
        "file where it is now with --file\n"
    )
    monkeypatch.chdir(tmp_path / "data")
    assert main(["evaluate", str(tmp_path / "exp"), "--device", "cpu", "--json"]) == 0
