"""train's startup says what it is doing on stderr: reading the data, tokenizing (on a cold token cache
only) and loading the model, so a slow start on the full IMDB data is not mistaken for a hang."""

from conftest import train_args

from imdb_lora.cli import main


def test_startup_lines_and_a_tokenization_bar_only_on_a_cold_cache(
    tiny_models, imdb_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("IMDB_LORA_CACHE", str(tmp_path / "cache"))  # cold: this test's own cache
    model = tiny_models("bert")

    def train(out: str) -> str:
        code = main(train_args(model, imdb_dir, tmp_path / out, "--epochs", "1"))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "reading" not in captured.out and "tokenize" not in captured.out  # stdout: results only
        return captured.err

    cold = train("cold")
    assert f"reading IMDB from {imdb_dir} ..." in cold
    assert "data ready in " in cold and " train, " in cold and " test reviews" in cold
    assert f"loading model {model} ..." in cold
    assert all(f"tokenize {split}" in cold for split in ("train", "val", "test"))
    assert cold.index("reading IMDB") < cold.index("tokenize train") < cold.index("loading model")

    warm = train("warm")  # the same texts and tokenizer: every split comes from the cache
    assert f"reading IMDB from {imdb_dir} ..." in warm and "data ready in " in warm
    assert "tokenize" not in warm
