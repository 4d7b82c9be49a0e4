"""A finished run or export keeps working when it is shared: readable by other users (its weights are not
0600), its adapter free of this machine's paths, and a file this user may not read is named in one line."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import snapshot, train_args

from imdb_lora.cli import main
from imdb_lora.inference.classifier import Classifier
from imdb_lora.runs.rundir import portable_adapter

TEXTS = ["great wonderful film i loved it", "awful boring plot and terrible acting"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_runs_weights_are_as_readable_as_its_other_files(tiny_models, imdb_dir, tmp_path, umask_022):
    """safetensors writes 0600: another user (a group sharing the run, a container running as non-root)
    could read config.yaml but not the weights, and transformers then said "No such file or directory"."""
    runs = {
        "lora": tmp_path / "lora",
        "random": tmp_path / "random",
        "full": tmp_path / "full",
    }
    model = tiny_models("bert")
    assert main(train_args(model, imdb_dir, runs["lora"], "--epochs", "1")) == 0
    assert main(train_args(model, imdb_dir, runs["random"], "--epochs", "1", "--random-init")) == 0
    assert main(train_args(model, imdb_dir, runs["full"], "--epochs", "1", "--method", "full")) == 0
    weights = [
        runs["lora"] / "adapter" / "adapter_model.safetensors",
        runs["lora"] / "checkpoint.safetensors",
        runs["random"] / "base_model" / "model.safetensors",
        runs["full"] / "model" / "model.safetensors",
    ]
    for f in weights:
        assert mode(f) == 0o644, f"{f.relative_to(tmp_path)}: {oct(mode(f))}"
    dest = tmp_path / "export"
    assert main(["export", str(runs["lora"]), "--to", str(dest)]) == 0
    modes = {p.relative_to(dest).as_posix(): oct(mode(p)) for p in dest.rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_the_adapter_names_a_local_base_by_its_folder_name(trained_run, tiny_models, tmp_path_factory):
    """PEFT writes the absolute path the base was loaded from into adapter_config.json and its README's
    hub metadata; both travel (and get uploaded) with the adapter. The run still finds its base."""
    adapter = trained_run / "adapter"
    record = json.loads((adapter / "adapter_config.json").read_text())
    assert record["base_model_name_or_path"] == "./bert"  # the tiny model's folder, as a relative path
    assert record["revision"] is None  # a local folder has no hub commit
    assert record["target_modules"] == sorted(record["target_modules"])  # still byte-stable
    base = str(tmp_path_factory.getbasetemp().parent)  # every xdist worker's and the shared folders
    for f in adapter.iterdir():
        if f.suffix in (".json", ".md"):
            assert base not in f.read_text(), f.name
    card = (adapter / "README.md").read_text()
    assert "base_model:" not in card  # the hub would read a folder's name as a hub id

    # plain PEFT with an explicit base, as README.md shows, computes what imdb-lora computes
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"), num_labels=2), str(adapter)
    ).eval()
    tok = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    with torch.no_grad():
        got = plain(**tok(TEXTS, return_tensors="pt", padding=True)).logits
    clf = Classifier.load(str(trained_run), device="cpu", raw=True)
    assert torch.allclose(got, clf.logits(TEXTS), atol=1e-5)


def test_portable_adapter_keeps_hub_ids_and_drops_only_the_path(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = str(tmp_path / "models" / "all-MiniLM-L6-v2")  # a local base folder, wherever it sits
    card = f"---\nbase_model: {path}\nlibrary_name: peft\ntags:\n- base_model:adapter:{path}\n- lora\n---\n\n# Card\n"
    (folder / "README.md").write_text(card + f"Trained from {path}.\n")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": path, "r": 8}))
    portable_adapter(folder)
    assert json.loads((folder / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": "./all-MiniLM-L6-v2",
        "r": 8,
    }
    assert (folder / "README.md").read_text() == (
        "---\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Card\nTrained from ./all-MiniLM-L6-v2.\n"
    )
    hub = {"base_model_name_or_path": "FacebookAI/roberta-base", "r": 8}
    (folder / "adapter_config.json").write_text(json.dumps(hub))
    (folder / "README.md").write_text("---\nbase_model: FacebookAI/roberta-base\n---\n")
    portable_adapter(folder)
    assert json.loads((folder / "adapter_config.json").read_text()) == hub
    assert (folder / "README.md").read_text() == "---\nbase_model: FacebookAI/roberta-base\n---\n"


def test_auto_peft_loads_the_adapter_beside_its_base_and_names_the_folder_elsewhere(
    trained_run, tiny_models, tmp_path, monkeypatch
):
    """peft's AutoPeftModelForSequenceClassification loads the base that adapter_config.json names.
    Recorded as the bare folder name, a missing base was asked of the hub (offline: "couldn't connect to
    huggingface.co"; online: whatever model bears that name). As ./NAME it loads the folder beside
    which the user runs, and elsewhere fails naming './bert', with no hub request."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    adapter = (trained_run / "adapter").resolve()
    monkeypatch.chdir(tiny_models("bert").parent)
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    with torch.no_grad():
        got = model(**tok(TEXTS, return_tensors="pt", padding=True)).logits
    raw = Classifier.load(str(trained_run), device="cpu", raw=True).logits(TEXTS)
    assert torch.allclose(got, raw, atol=1e-5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=r"'\./bert'"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(adapter))


def test_the_adapter_records_the_hub_revision_its_base_was_loaded_from(tiny_models, monkeypatch):
    """run.json had the base's hub commit (model_revision) but adapter_config.json did not, so peft's
    AutoPeftModel* loaded the hub's latest base, not the one the adapter was trained on. peft keeps the
    base's revision in the adapter config's `revision`; a random-init base has none to give."""
    from imdb_lora.config import Config
    from imdb_lora.modeling import lora

    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(lora, "hub_revision", lambda name: commit)  # as if loaded from the hub cache
    cfg = Config.from_dict({"model": {"name": str(tiny_models("bert"))}}).validate()
    model, info = lora.build_model(cfg)
    assert info["model_revision"] == commit
    assert model.peft_config["default"].revision == commit
    model, _ = lora.build_model(cfg, random_init=True)
    assert model.peft_config["default"].revision is None


def test_the_runs_tokenizer_truncates_where_the_run_does(trained_run):
    """The saved tokenizer kept its base's model_max_length (1e30 for the tiny models, 512 for MiniLM's
    while the run reads 128): truncation=True outside imdb-lora cut nothing, or cut elsewhere than the
    run. It is the run's max_length now, so the ids are the run's own (--truncation head)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    assert tok.model_max_length == 64  # train_args' --max-length
    long = "the movie was great and the acting was wonderful " * 40
    clf = Classifier.load(str(trained_run), device="cpu")
    assert tok(long, truncation=True)["input_ids"] == clf.encode([long])[0]


def test_a_moved_run_predicts_from_any_path(trained_run, tmp_path, monkeypatch, capsys):
    """Spaces and non-ASCII characters in the path, a symlink to its folder, a relative path."""
    assert main(["predict", str(trained_run), "--json", *TEXTS]) == 0
    expected = capsys.readouterr().out
    parent = tmp_path / "my runs é ü"
    moved = Path(shutil.copytree(trained_run, parent / "tiny copy ñ"))
    (tmp_path / "link").symlink_to(parent)
    monkeypatch.chdir(tmp_path)
    for path in (
        moved,
        tmp_path / "link" / moved.name,
        Path("link") / moved.name,
        Path(parent.name) / moved.name,
    ):
        assert main(["predict", str(path), "--json", *TEXTS]) == 0, path
        assert capsys.readouterr().out == expected


def test_a_file_this_user_may_not_read_is_named_in_one_line(trained_run, monkeypatch, capsys):
    """What root never sees: a run or export of another user's, or one written 0600 by an earlier
    version, read without permission (here simulated where the model is loaded)."""
    weights = trained_run / "adapter" / "adapter_model.safetensors"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(weights))

    monkeypatch.setattr(Classifier, "load", denied)
    assert main(["predict", str(trained_run), "a text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"imdb-lora: error: permission denied: {weights}; ")


def test_a_moved_base_is_one_line_naming_a_way_out_in_score_and_select(
    trained_run, tiny_models, tmp_path, capsys
):
    """score takes --base-model as predict does, and checks the base before its output is touched;
    select and bench, which have no such flag, do not suggest it."""
    import yaml

    run = Path(shutil.copytree(trained_run, tmp_path / "r"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    inputs, out = tmp_path / "in.jsonl", tmp_path / "scored"
    inputs.write_text('{"text": "great film"}\n')
    score = ["score", str(run), "--input", str(inputs), "--output", str(out)]
    assert main(score) == 2
    err = capsys.readouterr().err
    assert "is no longer there; pass --base-model with where it is now" in err and err.count("\n") == 1
    assert not out.exists()
    assert main([*score, "--base-model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(
        f"imdb-lora: error: --base-model: no such directory: {tmp_path}"
    )
    assert not out.exists()
    assert main([*score, "--base-model", str(tiny_models("bert"))]) == 0
    assert list(out.glob("*.parquet"))
    loaded = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loaded ")]
    assert f"(from --base-model {tiny_models('bert')}) (torch, cpu)" in loaded[0]  # said where it loaded
    capsys.readouterr()
    for command in (["select", str(run)], ["bench", "predict", str(run), "--samples", "2"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "is no longer there; put it back there (a symlink will do)" in err, err
        assert err.count("\n") == 1


def test_a_copy_taken_while_training_went_on_says_it_is_not_finished(trained_run, tmp_path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "my copy"))
    for name in ("adapter", "README.md", "results.md", "calibration.json"):
        (shutil.rmtree if (run / name).is_dir() else Path.unlink)(run / name)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    for command in (["predict", str(run), "x"], ["export", str(run), "--to", str(tmp_path / "e")]):
        assert main(command) == 2
        line = capsys.readouterr().err.splitlines()[-1]  # export first says what it loads
        assert line.startswith("imdb-lora: error:") and "stopped or copied before it finished" in line
        assert f"--output-dir '{run}' --resume" in line  # the command to run, with this copy's path
    (run / "checkpoint.safetensors").unlink()
    assert main(["predict", str(run), "x"]) == 2
    assert "it holds no checkpoint to resume from yet" in capsys.readouterr().err


def test_reading_a_run_or_export_writes_nothing_into_it(trained_run, imdb_dir, tmp_path, capsys):
    """A read-only copy (a mount, an archive unpacked by another user) works because reading never
    writes: no lock file, no cache, no report is made or touched in the folder read."""

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    (run / ".lock").unlink(missing_ok=True)  # a copy made without it must not get one by being read
    assert main(["export", str(run), "--to", str(tmp_path / "export")]) == 0
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text('{"text": "great film", "label": 1}\n{"text": "awful plot", "label": 0}\n')
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "great film"}\n')
    for folder in (run, tmp_path / "export"):
        before = snapshot(folder)
        commands = [
            ["predict", str(folder), "great film"],
            ["evaluate", str(folder), "--file", str(labeled)],
            ["score", str(folder), "--input", str(inputs), "--output", str(tmp_path / f"s-{folder.name}")],
        ]
        if folder == run:
            commands += [
                ["select", str(folder)],
                ["export", str(folder), "--to", str(tmp_path / "again")],
            ]
        for command in commands:
            assert main(command) == 0, command
        assert snapshot(folder) == before
    capsys.readouterr()
