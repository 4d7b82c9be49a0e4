import os

import pytest
from conftest import ROBERTA_BASE, needs_shared

from imdb_lora.data import tokcache
from imdb_lora.data.tokenize import encode
from imdb_lora.modeling.load import load_tokenizer

TEXTS = ["A wonderful film, moving and funny. " * 30, "Dull.", "", "Not bad, not great. " * 10]


@pytest.fixture(params=["roberta", "bert"])
def tok(request, tiny_models):
    """roberta-base's real tokenizer (from ../shared) and the tiny bert one, which every machine has."""
    if request.param == "roberta":
        needs_shared()
        return load_tokenizer(str(ROBERTA_BASE))
    return load_tokenizer(str(tiny_models("bert")))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMDB_LORA_CACHE", str(tmp_path))
    return tmp_path / "tokens"


def entries(cache):
    return sorted(cache.glob("*.safetensors")) if cache.is_dir() else []


def test_second_call_reads_the_cache_and_gives_the_same_ids(tok, cache, monkeypatch):
    first = tokcache.cached_encode(tok, TEXTS, 64, "head_tail", 16)
    assert first == encode(tok, TEXTS, 64, "head_tail", 16)
    assert len(entries(cache)) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tokcache, "encode", no_tokenizing)
    assert tokcache.cached_encode(tok, TEXTS, 64, "head_tail", 16) == first


@pytest.mark.parametrize(
    "change", [dict(max_length=32), dict(truncation="head"), dict(head_tokens=8), dict(texts=TEXTS[:3])]
)
def test_any_change_of_settings_or_texts_is_a_new_entry(tok, cache, change):
    args = dict(texts=TEXTS, max_length=64, truncation="head_tail", head_tokens=16) | change
    base = dict(texts=TEXTS, max_length=64, truncation="head_tail", head_tokens=16)
    tokcache.cached_encode(tok, **base)
    ids = tokcache.cached_encode(tok, **args)
    assert ids == encode(tok, args["texts"], args["max_length"], args["truncation"], args["head_tokens"])
    assert len(entries(cache)) == 2


def test_a_different_tokenizer_is_a_different_entry(tok, cache, tiny_models):
    other = load_tokenizer(str(tiny_models("mpnet")))
    assert tokcache.tokenizer_fingerprint(other) != tokcache.tokenizer_fingerprint(tok)
    tokcache.cached_encode(tok, TEXTS, 64)
    assert tokcache.cached_encode(other, TEXTS, 64) == encode(other, TEXTS, 64)
    assert len(entries(cache)) == 2


def test_a_damaged_entry_is_recomputed_and_replaced(tok, cache):
    good = tokcache.cached_encode(tok, TEXTS, 64)
    (entry,) = entries(cache)
    entry.write_bytes(entry.read_bytes()[:20])
    assert tokcache.cached_encode(tok, TEXTS, 64) == good
    assert tokcache.cached_encode(tok, TEXTS, 64) == good  # the rewritten entry reads back


def test_disabled_or_unwritable_cache_still_tokenizes(tok, cache):
    assert tokcache.cached_encode(tok, TEXTS, 64, enabled=False) == encode(tok, TEXTS, 64)
    assert entries(cache) == []
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the folder should be")
    assert tokcache.cached_encode(tok, TEXTS, 64) == encode(tok, TEXTS, 64)
    assert os.listdir(cache.parent) == ["tokens"]


def test_a_full_cache_disk_still_tokenizes(tiny_models, cache, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, which stopped training with a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, path, *args, **kw):
        open(path, "wb").write(b"half")  # what the writer had managed before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    tok = load_tokenizer(str(tiny_models("bert")))  # built before the disk "fills"
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert tokcache.cached_encode(tok, TEXTS, 64) == encode(tok, TEXTS, 64)
    assert os.listdir(cache) == []  # no entry, and no half-written one left behind


def test_train_can_turn_the_cache_off(tiny_models, imdb_dir, tmp_path, cache):
    from conftest import train_args

    from imdb_lora.cli import main

    args = train_args(tiny_models("bert"), imdb_dir, tmp_path / "run", "--epochs", "1")
    assert main([*args, "--no-token-cache"]) == 0
    assert entries(cache) == []
    assert main([*args, "--overwrite"]) == 0
    assert len(entries(cache)) == 3  # train, validation, test


def test_tokenizing_in_chunks_gives_the_same_ids_and_advances_the_bar(tok, monkeypatch):
    from imdb_lora.data import tokenize

    whole = encode(tok, TEXTS, 64, "head_tail", 16)
    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 3)  # 4 texts: chunks of 3 and 1
    counted = []
    progress = type("Bar", (), {"update": lambda self, n: counted.append(n)})()
    assert encode(tok, TEXTS, 64, "head_tail", 16, progress=progress) == whole
    assert counted == [3, 1]
