"""Labeled texts: the one in-memory form every data source is read into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LABEL_NAMES = ("NEGATIVE", "POSITIVE")


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: Sequence[int]) -> LabeledTexts:
        return LabeledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class Splits:
    train: LabeledTexts
    val: LabeledTexts
    test: LabeledTexts
    source: dict[str, Any] = field(default_factory=dict)  # where the data came from (path/URL, sha256)
