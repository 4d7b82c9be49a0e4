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


def test_software_versions_name_the_commit_and_whether_the_checkout_differs_from_it(tmp_path):
    import subprocess

    from imdb_lora.modeling.load import software_versions

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert (software_versions(tmp_path)["git_commit"], software_versions(tmp_path)["git_dirty"]) == (
        None,
        None,
    )
    git("init", "-q")
    (tmp_path / "__init__.py").write_text("x = 1\n")
    git("add", "__init__.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = software_versions(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False
    (tmp_path / "__init__.py").write_text("x = 2\n")  # the code that runs is no longer the commit's
    assert software_versions(tmp_path) == {**clean, "git_dirty": True}


def test_an_installed_copy_inside_another_repository_names_no_commit(tmp_path):
    # `pip install imdb-lora` into myproject/.venv: git finds myproject's repository from site-packages,
    # and run.json named myproject's commit (and its dirtiness) as the code that trained
    import subprocess

    from imdb_lora.modeling.load import software_versions

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "app.py").write_text("x = 1\n")
    git("add", ".gitignore", "app.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (tmp_path / "app.py").write_text("x = 2\n")
    package = tmp_path / ".venv" / "lib" / "site-packages" / "imdb_lora"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    versions = software_versions(package)
    assert (versions["git_commit"], versions["git_dirty"]) == (None, None)


def test_run_json_names_the_code_that_started_the_run_not_the_checkout_at_its_end(
    tiny_models, imdb_dir, tmp_path, monkeypatch
):
    import imdb_lora.training.trainer as trainer

    calls = []

    def versions() -> dict:  # a checkout that moves on (commit, rebase) while the run trains
        calls.append(1)
        return {"git_commit": f"commit-{len(calls)}", "git_dirty": False}

    monkeypatch.setattr(trainer, "software_versions", versions)
    out = tmp_path / "r"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1", "--no-calibration")) == 0
    assert json.loads((out / "run.json").read_text())["software"]["git_commit"] == "commit-1"
