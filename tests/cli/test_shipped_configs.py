"""Every YAML config shipped in configs/ is accepted by `imdb-lora train --config` as a user would pass it."""

import pytest
from conftest import REPO

from imdb_lora.cli import main

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {
        "reference.yaml",
        "full-finetune.yaml",
        "minilm-quick.yaml",
        "mpnet-default.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_train_accepts_each_shipped_config(path, tmp_path, capsys):
    # parsed and validated, then stopped at the first setup check (a model folder that does not exist)
    code = main(["train", "--config", str(path), "--model", str(tmp_path / "no-model"), "--output-dir",
                 str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--model: no such directory" in err, err
    assert not (tmp_path / "out").exists()
