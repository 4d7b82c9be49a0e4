"""The one chunker of predict and evaluate --file: (up to CHUNK items, whether they are the last), each
chunk read only when it is asked for (predict answers a pipe's first texts before the pipe ends)."""

import pytest

from imdb_lora.cli import chunks
from imdb_lora.cli.chunks import chunks as chunked


def test_empty_input_has_no_chunk():
    assert list(chunked([], 3)) == []


def test_an_exact_multiple_ends_on_a_full_last_chunk():
    assert list(chunked(range(6), 3)) == [([0, 1, 2], False), ([3, 4, 5], True)]


def test_a_remainder_is_the_short_last_chunk():
    assert list(chunked(range(7), 3)) == [([0, 1, 2], False), ([3, 4, 5], False), ([6], True)]
    assert list(chunked(range(2), 3)) == [([0, 1], True)]


def test_none_is_an_item_like_any_other():
    """The old predict peeked with next(it, None): a None item would have ended its input there."""
    assert list(chunked([1, None, None, 2], 2)) == [([1, None], False), ([None, 2], True)]


def test_the_size_is_chunk_unless_given(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 2)  # read when called: how the CLI tests make chunks small
    assert [len(c) for c, _ in chunked(range(5))] == [2, 2, 1]
    with pytest.raises(ValueError, match="chunk size 0"):
        next(chunked(range(5), 0))


def test_a_chunk_is_read_when_asked_for_with_one_item_ahead():
    read: list[int] = []

    def items():
        for i in range(10):
            read.append(i)
            yield i

    it = chunked(items(), 3)
    assert read == []  # nothing before the first chunk is asked for
    assert next(it) == ([0, 1, 2], False) and read == [0, 1, 2, 3]  # one ahead: whether it is the last
    assert next(it) == ([3, 4, 5], False) and len(read) == 7
    assert list(it) == [([6, 7, 8], False), ([9], True)] and len(read) == 10
