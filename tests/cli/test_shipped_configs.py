"""Every YAML config shipped in the package (src/imdb_lora/configs, so in the wheel too) is accepted by
`imdb-lora train --config` as a user would pass it: by its path, or by its name from any directory."""

import pytest

from imdb_lora.cli import main
from imdb_lora.config import SHIPPED_CONFIGS, shipped_configs

SHIPPED = sorted(SHIPPED_CONFIGS.glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {
        "reference.yaml",
        "full-finetune.yaml",
        "minilm-quick.yaml",
        "mpnet-default.yaml",
    }
    assert shipped_configs() == [p.stem for p in SHIPPED]


def stops_at_the_model(args: list[str], tmp_path, capsys) -> None:
    # parsed and validated, then stopped at the first setup check (a model folder that does not exist)
    code = main(
        ["train", *args, "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--model: no such directory" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_train_accepts_each_shipped_config(path, tmp_path, capsys):
    stops_at_the_model(["--config", str(path)], tmp_path, capsys)


@pytest.mark.parametrize("name", ["reference", "minilm-quick.yaml"])
def test_a_shipped_config_is_named_from_any_directory(name, tmp_path, monkeypatch, capsys):
    # an installed package has no configs/ folder beside the user: `--config configs/reference.yaml`
    # worked only inside a checkout
    monkeypatch.chdir(tmp_path)
    stops_at_the_model(["--config", name], tmp_path, capsys)


def test_a_file_of_that_name_wins_over_the_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").write_text("train: {epochs: 0}\n")
    assert main(["train", "--config", "reference", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "reference: train.epochs must be >= 1 (got 0)" in err, err  # the file's key, as it set it


def test_a_missing_config_says_what_is_shipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs/reference.yaml"]) == 2
    assert capsys.readouterr().err == (
        "imdb-lora: error: --config: no such file: configs/reference.yaml; the shipped one is --config"
        f" reference (shipped configs: {', '.join(shipped_configs())})\n"
    )
    assert main(["train", "--config", "nope"]) == 2
    assert capsys.readouterr().err.startswith(
        "imdb-lora: error: --config: no such file: nope (shipped configs: "
    )
    assert main(["train", "--config", "minilm-quik"]) == 2  # a shipped name mistyped: the close one named
    assert capsys.readouterr().err.startswith(
        "imdb-lora: error: --config: no such file: minilm-quik; did you mean minilm-quick? (shipped configs: "
    )
    (tmp_path / "configs").mkdir()  # a folder is not a missing file
    assert main(["train", "--config", "configs"]) == 2
    assert capsys.readouterr().err.startswith(
        "imdb-lora: error: --config: configs is a folder, not a YAML file (shipped configs: "
    )
