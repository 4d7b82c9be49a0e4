import sys
from types import SimpleNamespace

import pytest
from conftest import train_args

import imdb_lora.runs.compare
from imdb_lora.cli import main


def train_in_this_process(argv: list[str], env: dict[str, str]) -> int:
    """compare's `python -m imdb_lora train ...` without the ~10 s start of a fresh Python with torch."""
    assert argv[:3] == [sys.executable, "-m", "imdb_lora"] and argv[3] == "train"
    return main(argv[3:])


@pytest.mark.parametrize("process", ["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_compare_writes_both_rows(process, tiny_models, imdb_dir, tmp_path, capsys, monkeypatch):
    if process == "in-process":
        monkeypatch.setattr(imdb_lora.runs.compare, "subprocess", SimpleNamespace(call=train_in_this_process))
    flags = train_args(tiny_models("bert"), imdb_dir, tmp_path / "unused", "--epochs", "1")
    flags = flags[1:]  # drop "train"
    i = flags.index("--output-dir")
    del flags[i : i + 2]
    code = main(["compare", "--output-dir", str(tmp_path / "cmp"), "--full-lr", "1e-4", *flags])
    assert code == 0, capsys.readouterr().err
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    lora_row = next(line for line in table.splitlines() if line.startswith("| LoRA |"))
    full_row = next(line for line in table.splitlines() if line.startswith("| Full fine-tuning |"))
    lora_trainable = int(lora_row.split("|")[2].strip().replace(",", ""))
    full_trainable = int(full_row.split("|")[2].strip().replace(",", ""))
    assert 0 < lora_trainable < full_trainable
    assert (tmp_path / "cmp" / "lora" / "adapter").is_dir() and (tmp_path / "cmp" / "full" / "model").is_dir()
    assert (
        "1e-4" in (tmp_path / "cmp" / "full" / "config.yaml").read_text()
        or "0.0001" in (tmp_path / "cmp" / "full" / "config.yaml").read_text()
    )


def test_compare_refuses_method_flag(tmp_path, capsys):
    assert main(["compare", "--output-dir", str(tmp_path), "--method", "full"]) == 2
    assert "compare sets --method" in capsys.readouterr().err
