"""Labeled texts: the one in-memory form every data source is read into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LABEL_NAMES = ("NEGATIVE", "POSITIVE")


def has_content(text: str) -> bool:
    """Whether a text holds anything to read: not empty, not only whitespace or control characters
    ("\u0000" is no review either). The one rule for predict, evaluate, score and the service."""
    return any(c.isprintable() and not c.isspace() for c in text)


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[int]
    # The 1-based line each text starts on in the file it was read from (a CSV's header is line 1, so
    # this is also a spreadsheet's row number), for messages and error reports; None for IMDB itself.
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: Sequence[int]) -> LabeledTexts:
        lines = None if self.lines is None else [self.lines[i] for i in idx]
        return LabeledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx], lines)


@dataclass
class Splits:
    train: LabeledTexts
    val: LabeledTexts
    test: LabeledTexts
    source: dict[str, Any] = field(default_factory=dict)  # where the data came from (path/URL, sha256)
    # Each split's size before --max-train-samples / --max-eval-samples: what a subset was taken from.
    available: dict[str, int] = field(default_factory=dict)
