"""Train/validation/test splits and stratified, seeded subsets."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import Given
from ..errors import UserError, counted
from .files import load_labeled_file
from .imdb import describe_source, file_sha256, load_imdb, resolve_imdb_source
from .labeled import LABEL_NAMES, Splits


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rest, held_out) index lists; held_out takes `fraction` of each class, chosen by seed."""
    rng = random.Random(seed)
    rest, held = [], []
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction))
        held += idx[:k]
        rest += idx[k:]
    return sorted(rest), sorted(held)


def stratified_subset(labels: Sequence[int], n: int | None, seed: int) -> list[int]:
    """n indices keeping the class balance (all of them if n is None or too large)."""
    if n is None or n >= len(labels):
        return list(range(len(labels)))
    rest, held = stratified_split(labels, n / len(labels), seed)
    # Rounding per class can miss n by one; move the difference deterministically.
    while len(held) > n:
        held.pop()
    while len(held) < n:
        held.append(rest.pop())
    return sorted(held)


def load_splits(
    data_cfg,
    seed: int,
    announce: Callable[[str], None] | None = None,
    where: Callable[[str], str] | None = None,
) -> Splits:
    """Train/validation/test for a run, from IMDB or labeled files, subsets applied.

    `announce` is told what is about to be read (reading the full IMDB archive takes tens of seconds).
    `where` names a setting in errors (config.Given.where: `--data`, or `my.yaml: data.path` when a
    --config file set it); None: by its flag.
    """
    say = announce or (lambda _line: None)
    where = where or Given().where  # by its flag
    if data_cfg.train_file:
        files = [f for f in (data_cfg.train_file, data_cfg.test_file) if f]
        say(f"reading {', '.join(files)} ...")
        train = load_labeled_file(data_cfg.train_file, where("data.train_file"))
        test = load_labeled_file(data_cfg.test_file, where("data.test_file")) if data_cfg.test_file else None
        source = {"kind": "files", "files": {f: file_sha256(Path(f).expanduser()) for f in files}}
        named = f"{where('data.train_file')} {data_cfg.train_file}"
    else:
        path, origin = resolve_imdb_source(data_cfg.path)  # a download has its own progress bar
        origin = where("data.path") if origin == "--data" else origin
        say(f"reading IMDB from {path} ...")
        imdb = load_imdb(path, origin)
        train, test = imdb["train"], imdb["test"]
        source = describe_source(path)
        # The refusals below name where the path came from: --data, $IMDB_LORA_DATA or the download
        named = f"{origin} {path}" if origin != "the IMDB download" else f"{origin} ({path})"
    given = len(train)
    rest, val_idx = stratified_split(train.labels, data_cfg.val_size, seed)
    val, train = train.take(val_idx), train.take(rest)
    carved = test is None
    if carved:  # no test file: report on a second held-out slice, never on validation
        rest, test_idx = stratified_split(train.labels, data_cfg.val_size, seed + 1)
        test, train = train.take(test_idx), train.take(rest)
    if not len(train):  # a run that trains on nothing would still finish, looking like a result
        raise UserError(_nothing_to_train(named, given, carved))
    if len(set(train.labels)) < 2:  # a classifier that never saw the other class would still finish
        raise UserError(_one_class(named, train.labels))
    available = {"train": len(train), "val": len(val), "test": len(test)}
    train = train.take(stratified_subset(train.labels, data_cfg.max_train_samples, seed))
    val = val.take(stratified_subset(val.labels, data_cfg.max_eval_samples, seed))
    test = test.take(stratified_subset(test.labels, data_cfg.max_eval_samples, seed))
    return Splits(train, val, test, source, available)


def _nothing_to_train(flag: str, given: int, carved: bool) -> str:
    """What to say when the held-out splits (at least one review of each class each) take every review;
    `flag` names where the reviews came from, with their path."""
    held = (
        "validation (--val-size, at least one review per class) and test slices"
        if carved
        else "validation split (--val-size, at least one review per class)"
    )
    return (
        f"{flag}: {counted(given, 'training review')}, all taken by the {held}, leaving none to train on; "
        "give more reviews"
    )


def _one_class(flag: str, labels: Sequence[int]) -> str:
    """What to say when every training review has one label: so in the file, or left so once a class's
    only reviews went to the held-out slices (each takes at least one review of each class)."""
    return (
        f"{flag}: every training review ({counted(len(labels), 'review')}) is "
        f"{LABEL_NAMES[labels[0]].lower()} (label {labels[0]}): a classifier never shown the other class cannot learn to tell them apart; "
        "give reviews of both classes"
    )
