"""A run directory describes itself (data source and sha256, versions, absolute paths) and works from
any working directory; an older run's config.yaml (with model.num_labels: 2) still loads."""

import hashlib
import json
import tarfile

import peft
import pytest
import torch
import transformers
import yaml
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.config import Config
from imdb_lora.errors import UserError


@pytest.fixture(scope="module")
def relative_run(tiny_models, imdb_dir, tmp_path_factory):
    """A one-epoch run trained from relative --model and --data paths (an archive), inside its own cwd."""
    root = tmp_path_factory.mktemp("relative")
    (root / "models").symlink_to(tiny_models("bert").parent, target_is_directory=True)
    with tarfile.open(root / "imdb.tar.gz", "w:gz") as tf:
        tf.add(imdb_dir, arcname="aclImdb")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(train_args("models/bert", "imdb.tar.gz", "runs/r", "--epochs", "1")) == 0
    return root


def test_run_json_records_data_source_software_and_absolute_paths(relative_run, tiny_models):
    info = json.loads((relative_run / "runs" / "r" / "run.json").read_text())
    archive = relative_run / "imdb.tar.gz"
    assert info["data_source"] == {
        "kind": "imdb",
        "path": str(archive.resolve()),
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }  # no "url": this archive is not the official download
    sw = info["software"]
    assert (sw["torch"], sw["transformers"], sw["peft"]) == (
        torch.__version__,
        transformers.__version__,
        peft.__version__,
    )
    assert sw["git_commit"] is None or len(sw["git_commit"]) == 40
    assert "model_revision" in info and info["model_revision"] is None  # a local folder has no hub commit
    cfg = yaml.safe_load((relative_run / "runs" / "r" / "config.yaml").read_text())
    assert cfg["model"]["name"] == str((relative_run / "models" / "bert").resolve())
    assert cfg["data"]["path"] == str(archive.resolve())
    assert info["model"] == cfg["model"]["name"]


def test_evaluate_and_predict_work_from_another_directory(relative_run, tmp_path, monkeypatch, capsys):
    run = relative_run / "runs" / "r"
    monkeypatch.chdir(relative_run)
    assert main(["evaluate", "runs/r", "--json"]) == 0
    here = json.loads(capsys.readouterr().out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(run), "--json"]) == 0
    there = json.loads(capsys.readouterr().out)
    assert (there["examples"], there["accuracy"], there["loss"]) == (48, here["accuracy"], here["loss"])
    assert main(["predict", str(run), "--json", "great wonderful film"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("POSITIVE", "NEGATIVE")


def test_a_run_written_before_num_labels_was_retired_still_loads(trained_run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    raw["model"]["num_labels"] = 2  # what earlier versions wrote
    (old / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert Config.load(old / "config.yaml").to_dict() == Config.load(trained_run / "config.yaml").to_dict()
    assert main(["evaluate", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 48
    raw["model"]["num_labels"] = 3  # never supported: an error naming the field, not a silent 2
    (old / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match="unknown field model.num_labels"):
        Config.load(old / "config.yaml")


def test_num_labels_flag_is_gone(capsys):
    assert main(["train", "--num-labels", "2"]) == 2
    assert "unrecognized arguments: --num-labels" in capsys.readouterr().err
