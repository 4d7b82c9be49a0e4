"""--max-length and the tokenizer are checked against the model (its position embeddings, its vocabulary)
before anything is written."""

import pytest
from conftest import build_tiny, train_args

from imdb_lora.cli import main
from imdb_lora.errors import UserError
from imdb_lora.modeling.load import check_max_length, position_limit


@pytest.fixture(scope="module")
def bert_512(tmp_path_factory):
    """A tiny bert with MiniLM's position limit (512 tokens)."""
    from transformers import AutoConfig

    folder = build_tiny("bert", tmp_path_factory.mktemp("bert512") / "bert")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.max_position_embeddings = 512
    cfg.save_pretrained(folder)  # the weights' position table is never loaded: this test fails before
    return folder


def test_too_long_max_length_fails_with_one_line_before_any_directory(bert_512, imdb_dir, tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    assert main(train_args(bert_512, imdb_dir, out, "--max-length", "2048")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--max-length 2048 exceeds" in err[0] and "512 tokens" in err[0] and "--max-length 512" in err[0]
    assert not (tmp_path / "runs").exists()  # not even the parent was created


def test_roberta_and_mpnet_positions_lose_the_padding_offset(tiny_models):
    from transformers import AutoConfig

    # max_position_embeddings 130 with pad_token_id 1: positions 2..129 are usable, 128 tokens
    assert position_limit(AutoConfig.from_pretrained(tiny_models("mpnet"))) == 128
    assert position_limit(AutoConfig.from_pretrained(tiny_models("bert"))) == 128
    check_max_length(str(tiny_models("mpnet")), 128)
    with pytest.raises(UserError, match="129 exceeds .*128 tokens"):
        check_max_length(str(tiny_models("mpnet")), 129)


def test_a_tokenizer_from_another_model_fails_with_one_line_before_any_directory(imdb_dir, tmp_path, capsys):
    """A folder whose tokenizer emits ids past the model's embeddings trained into torch's IndexError."""
    from transformers import AutoConfig

    folder = build_tiny("bert", tmp_path / "bert")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.vocab_size = 50  # the tiny bert's tokenizer has more tokens than this
    cfg.save_pretrained(folder)
    out = tmp_path / "runs" / "r"
    assert main(train_args(folder, imdb_dir, out, "--random-init")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "its tokenizer has" in err[0] and "more than the 50 rows" in err[0]
    assert not (tmp_path / "runs").exists()
