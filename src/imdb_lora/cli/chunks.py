"""Inputs taken a chunk at a time, read as they are asked for: predict's texts (stdin, a --file, a pipe
whose writer waits for answers) and evaluate --file's, so that a long input's texts, token ids and
results never all live at once."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Texts read, computed (and, by predict, printed) at a time: enough for the length-sorted micro-batches
# to pad little, few enough that their token ids and results stay a few MB (tokenizing a 1 GB file's
# texts at once took gigabytes).
CHUNK = 2048


def chunks(items: Iterable[T], size: int | None = None) -> Iterator[tuple[list[T], bool]]:
    """(up to `size` items, CHUNK if None; whether they are the last), each read when it is asked for:
    one item ahead, to know whether a chunk is the last (predict says its blank lines there)."""
    size = CHUNK if size is None else size  # read here, not at import: tests make it small
    if size < 1:
        raise ValueError(f"chunk size {size} < 1")
    it = iter(items)
    chunk = list(itertools.islice(it, size))
    while chunk:
        ahead = list(itertools.islice(it, 1))
        yield chunk, not ahead
        chunk = [*ahead, *itertools.islice(it, size - 1)] if ahead else []
