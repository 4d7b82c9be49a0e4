"""Shared by the benchmarks: real test reviews, percentiles, a description of the machine."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..data.splits import load_splits, stratified_subset
from ..errors import UserError, counted
from ..inference.selection import moved_data

if TYPE_CHECKING:
    from ..data.labeled import LabeledTexts
    from ..inference.classifier import Classifier


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation, so p99 of 50 values is the maximum."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least the first
    return ordered[int(rank) - 1]


def test_reviews(clf: Classifier, data: str | None, n: int, seed: int) -> tuple[LabeledTexts, str]:
    """n real test reviews (stratified, then shuffled with `seed`): the same ones for every model, and
    what they are (reports name it: a run trained on labeled files reads their test file, not IMDB)."""
    data_cfg = clf.config.data
    if data:
        data_cfg.path, data_cfg.train_file, data_cfg.test_file = data, None, None
    data_cfg.max_eval_samples = None
    where = None if data else clf.data_where  # a saved data setting by the run's config.yaml key
    try:
        splits = load_splits(data_cfg, seed, where=where)
    except UserError as e:
        raise moved_data(e, where, data_cfg) from None
    test = splits.test
    if n > len(test):
        raise UserError(f"--samples {n}: the test split has only {counted(len(test), 'review')}")
    idx = stratified_subset(test.labels, n, seed)
    random.Random(seed).shuffle(idx)  # mixed lengths and labels, as requests would come
    return test.take(idx), describe_reviews(splits.source, data_cfg.test_file)


def describe_reviews(source: dict, test_file: str | None) -> str:
    """Where the reviews came from, for a report's header."""
    if source.get("kind") == "imdb":
        return f"IMDB test reviews ({source['path']})"
    if test_file:
        return f"reviews of the test file {test_file}"
    (train_file,) = source["files"]
    return f"held-out reviews of {train_file} (the run has no test file)"


def machine() -> str:
    """The machine, for a bench report's header: run.json's record of it (metrics.machine), in words."""
    import torch

    from ..metrics import machine as recorded

    m = recorded()
    return f"{m['cpus']} CPUs ({m['cpu']}), torch {torch.__version__} with {m['torch_threads']} threads"
