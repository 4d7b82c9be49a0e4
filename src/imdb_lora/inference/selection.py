"""Choosing among finished runs and inference settings on validation, then reading test once.

`imdb-lora select RUN... --window-strides 0,256`: every (run, window stride) pair is a candidate; each
is scored on the validation split the runs share (carved from train), the best validation accuracy wins
(ties: the earlier candidate, so list the default run first and the cheaper inference first), and only
then is the test split read: once for the winner and once for the first run as trained (the control).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.splits import load_splits, stratified_subset
from ..data.tokenize import check_window_stride, recorded_stride
from ..errors import UserError, counted
from ..metrics import loss_and_accuracy
from .classifier import Classifier
from .exported import is_export


@dataclass
class Score:
    run: str
    window_stride: int | None  # None: one truncated window, as in training
    split: str
    accuracy: float
    loss: float
    examples: int
    seconds: float


def evaluate_split(
    clf: Classifier,
    split: str,
    max_samples: int | None = None,
    batch_size: int = 64,
    window_stride: int | None = None,
    data: str | None = None,
    cache: dict | None = None,
) -> tuple[float, float, int, float]:
    """(loss, accuracy, examples, seconds) of a loaded run on its test or validation split (whole, or a
    stratified subset); the seconds are those of the model, data loading excluded."""
    from tqdm.auto import tqdm

    part = split_of(clf, split, max_samples, data, cache)
    t0 = time.time()
    with tqdm(total=len(part), desc=f"evaluate {split}", unit="review", leave=False) as bar:
        logits = clf.logits(part.texts, batch_size, bar, window_stride=window_stride)
    loss, acc = loss_and_accuracy(logits, part.labels)
    return loss, acc, len(part), time.time() - t0


def split_of(
    clf: Classifier,
    split: str,
    max_samples: int | None,
    data: str | None = None,
    cache=None,
    file_flag: bool = False,
):
    """A run's test or validation split as evaluate reads it: the whole split (the training-time
    subset does not apply) or a stratified subset; `data` replaces the run's data source. `cache`
    keeps loaded splits between calls (reading the IMDB archive takes seconds each time). A saved data
    setting that no longer loads is named as config.yaml's key, with the way to the data
    (moved_data); `file_flag`: the command has --file (evaluate) to read a labeled file where it is now."""
    data_cfg = clf.config.data
    if data:
        data_cfg.path, data_cfg.train_file, data_cfg.test_file = data, None, None
    data_cfg.max_eval_samples = None
    key = validation_key(clf)
    where = None if data else clf.data_where  # a typed --data is named as typed
    try:
        splits = (cache or {}).get(key) or load_splits(data_cfg, clf.config.train.seed, where=where)
    except UserError as e:
        raise moved_data(e, where, data_cfg, file_flag) from None
    if cache is not None:
        cache[key] = splits
    part = splits.test if split == "test" else splits.val
    return part.take(stratified_subset(part.labels, max_samples, clf.config.train.seed))


def moved_data(
    e: UserError, where: Callable[[str], str] | None, data_cfg, file_flag: bool = False
) -> UserError:
    """`e` with the way to the data where it names a saved data setting (the data moved or was replaced
    since training): --data for IMDB; a run's labeled files only load from where they were, as no flag
    moves them (--data reads IMDB instead, and evaluate's --file reads a labeled file where it is now)."""
    keys = ("data.path", "data.train_file", "data.test_file")
    key = next((k for k in keys if where and str(e).startswith(f"{where(k)}: ")), None)
    if key is None:  # a typed --data, $IMDB_LORA_DATA, the download: their lines say what to do
        return e
    if key == "data.path":
        return UserError(f"{e}; pass --data with where the IMDB data is now")
    if Path(getattr(data_cfg, key.split(".")[1])).is_absolute():
        way = "put the file back there (a symlink will do)"
    else:  # an export's config.yaml names a file, never this machine's path (export/portable.py)
        way = "the export names the file only: run the command in the folder that holds it"
    if file_flag:
        way += ", or evaluate a labeled file where it is now with --file"
    return UserError(f"{e}; {way}")


def validation_key(clf: Classifier) -> tuple:
    """What decides a run's validation split: candidates are comparable only if this is equal."""
    d, t = clf.config.data, clf.config.train
    return (d.path, d.train_file, d.test_file, d.val_size, t.seed)


def select(
    runs: list[str],
    strides: list[int | None],
    data: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    log=print,
) -> dict[str, Any]:
    """Score every (run, stride) on validation, choose, then read test for the choice and the control."""
    if not runs:
        raise UserError("give at least one run directory")
    resolved = [Path(run).resolve() for run in runs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise UserError(f"{runs[i]} is given twice; list each run directory once")
        if is_export(path):  # an export keeps no validation split to choose on
            raise UserError(
                f"{runs[i]} is an export; select chooses among run directories (their validation split)"
            )
    loaded: dict[str, Classifier] = {}
    for run in runs:
        loaded[run] = Classifier.load(run, device=device, base_flag=False)
    check_strides_fit(loaded, strides)
    keys = {validation_key(c) for c in loaded.values()}
    cache: dict = {}
    if len(keys) > 1 and data is None:
        raise UserError(
            "the runs do not share one validation split (their data, --val-size or --seed differ); "
            "compare runs trained on the same split"
        )

    def score(run: str, stride: int | None, split: str) -> Score:
        loss, acc, n, seconds = evaluate_split(
            loaded[run], split, max_samples, batch_size, stride, data, cache
        )
        s = Score(run, stride, split, acc, loss, n, seconds)
        log(
            f"{split} {run} window_stride={recorded_stride(stride)}: accuracy {100 * acc:.2f}% | loss {loss:.4f} | {counted(n, 'review')}"
        )
        return s

    val = [score(run, stride, "val") for run in runs for stride in strides]
    chosen = max(val, key=lambda s: s.accuracy)  # max keeps the first of equal scores
    control = (runs[0], None)
    test = [score(chosen.run, chosen.window_stride, "test")]
    if (chosen.run, chosen.window_stride) != control:
        test.append(score(*control, "test"))
    return {
        "validation": [score_json(s) for s in val],
        "chosen": {
            "run": chosen.run,
            "window_stride": recorded_stride(chosen.window_stride),
            "val_accuracy": chosen.accuracy,
        },
        "test": [score_json(s) | {"role": "chosen" if i == 0 else "control"} for i, s in enumerate(test)],
    }


def score_json(s: Score) -> dict:
    """A score as the JSON gives it: one truncated window is stride 0, as the flag and the lines say it."""
    return asdict(s) | {"window_stride": recorded_stride(s.window_stride)}


def check_strides_fit(loaded: dict[str, Classifier], strides: list[int | None]) -> None:
    """Every stride fits every run's windows: refused before anything is scored, not midway."""
    for run, clf in loaded.items():
        for stride in strides:
            check_window_stride(
                clf.tokenizer, clf.config.data.max_length, stride, "--window-strides", f"{run}'s "
            )


def parse_strides(text: str) -> list[int | None]:
    """'0,256' -> [None, 256]: 0 means one truncated window, as in training."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--window-strides: expected integers, got {part!r}") from None
        if value < 0:
            raise UserError(f"--window-strides: {value} is negative")
        out.append(value or None)
    if not out:
        raise UserError("--window-strides: give at least one stride (0 = one truncated window)")
    return list(dict.fromkeys(out))
