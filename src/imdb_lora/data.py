"""Data: IMDB (folder, archive, download) or labeled CSV/TSV/JSONL files; splits; tokenization; batches.

Labels are 0 = negative, 1 = positive everywhere. Validation is carved from train (stratified, seeded);
the test split is only ever reported, never used to choose anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
DATA_ENV = "IMDB_LORA_DATA"
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


# ---------------------------------------------------------------- IMDB in its aclImdb layout


def _imdb_member(parts: list[str]) -> tuple[str, int] | None:
    """(split, label) for a path like aclImdb/train/pos/123_9.txt, else None."""
    if len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-2] in ("pos", "neg"):
        if parts[-1].endswith(".txt"):
            return parts[-3], int(parts[-2] == "pos")
    return None


def _decode(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"review file is not UTF-8: {name} ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"review file is empty: {name}")
    return text


def _collect(items: Iterator[tuple[str, bytes]], source: str) -> dict[str, LabeledTexts]:
    found: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    for name, raw in items:
        split, label = _imdb_member(name.split("/"))  # type: ignore[misc]
        found[split].append((name, _decode(raw, name), label))
    out = {}
    for split, rows in found.items():
        if not rows or len({r[2] for r in rows}) < 2:
            raise UserError(
                f"{source} is not an aclImdb dataset: no {split}/pos and {split}/neg review files found"
            )
        rows.sort(key=lambda r: r[0])  # archive order varies; sorted names make runs reproducible
        out[split] = LabeledTexts([r[1] for r in rows], [r[2] for r in rows])
    return out


def _iter_dir(root: Path) -> Iterator[tuple[str, bytes]]:
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            d = root / split / label
            if d.is_dir():
                for p in sorted(d.glob("*.txt")):
                    yield str(p), p.read_bytes()


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile() and _imdb_member(m.name.split("/")):
                    f = tf.extractfile(m)
                    yield m.name, f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read archive {path}: {e} (corrupt or not a .tar/.tar.gz/.tar.xz)") from None


def load_imdb(path: str | os.PathLike) -> dict[str, LabeledTexts]:
    """Read IMDB train/test from an aclImdb folder (or its parent) or a tar archive of it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data: no such file or directory: {p}")
    if p.is_dir():
        root = p / "aclImdb" if (p / "aclImdb").is_dir() else p
        return _collect(_iter_dir(root), str(p))
    return _collect(_iter_tar(p), str(p))


def download_imdb(cache_dir: Path) -> Path:
    """Fetch the official archive once into cache_dir; fails cleanly without network."""
    dest = cache_dir / "aclImdb_v1.tar.gz"
    if dest.is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(IMDB_URL, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"no --data given and IMDB could not be downloaded ({e}); "
            f"pass --data PATH (an aclImdb folder or archive) or set {DATA_ENV}"
        ) from None
    tmp.replace(dest)
    return dest


def resolve_imdb_path(path: str | None) -> str:
    """--data, else $IMDB_LORA_DATA, else a download into the user cache."""
    if path:
        return path
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imdb-lora"
    return str(download_imdb(cache))


# ---------------------------------------------------------------- generic labeled files


def load_labeled_file(path: str | os.PathLike, flag: str = "--train-file") -> LabeledTexts:
    """CSV, TSV or JSONL with `text` and `label` columns; labels must be 0 or 1."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag}: no such file: {p}")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {p} is not UTF-8") from None
    rows: list[dict] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{flag}: {p} line {n} is not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{flag}: {p} line {n} is not a JSON object")
                rows.append(obj)
    else:
        delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
        rows = list(csv.DictReader(io.StringIO(content), delimiter=delimiter))
    if not rows:
        raise UserError(f"{flag}: {p} has no rows")
    missing = [c for c in ("text", "label") if c not in rows[0]]
    if missing:
        raise UserError(f"{flag}: {p} lacks column(s) {missing}; it needs 'text' and 'label'")
    texts, labels = [], []
    for n, row in enumerate(rows, 1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{flag}: {p} row {n} has an empty or missing text")
        try:
            y = int(str(label).strip())
        except ValueError:
            y = -1
        if y not in (0, 1):
            raise UserError(
                f"{flag}: {p} row {n} has label {label!r}; labels must be 0 (negative) or 1 (positive)"
            )
        texts.append(text)
        labels.append(y)
    return LabeledTexts(texts, labels)


# ---------------------------------------------------------------- splits and subsets


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


def load_splits(data_cfg, seed: int) -> Splits:
    """Train/validation/test for a run, from IMDB or labeled files, subsets applied."""
    if data_cfg.train_file:
        train = load_labeled_file(data_cfg.train_file, "--train-file")
        test = load_labeled_file(data_cfg.test_file, "--test-file") if data_cfg.test_file else None
    else:
        imdb = load_imdb(resolve_imdb_path(data_cfg.path))
        train, test = imdb["train"], imdb["test"]
    rest, val_idx = stratified_split(train.labels, data_cfg.val_size, seed)
    val, train = train.take(val_idx), train.take(rest)
    if test is None:  # no test file: report on a second held-out slice, never on validation
        rest, test_idx = stratified_split(train.labels, data_cfg.val_size, seed + 1)
        test, train = train.take(test_idx), train.take(rest)
    train = train.take(stratified_subset(train.labels, data_cfg.max_train_samples, seed))
    val = val.take(stratified_subset(val.labels, data_cfg.max_eval_samples, seed))
    test = test.take(stratified_subset(test.labels, data_cfg.max_eval_samples, seed))
    return Splits(train, val, test)


# ---------------------------------------------------------------- tokenization and batches


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence (e.g. [CLS] ... [SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def encode(
    tokenizer, texts: Sequence[str], max_length: int, truncation: str = "head", head_tokens: int = 128
) -> list[list[int]]:
    """Token ids per text, special tokens included, cut to max_length.

    head keeps the first tokens (the same ids as the tokenizer's own truncation); head_tail keeps the
    first `head_tokens` and fills the rest of the budget from the end of the review, where reviews
    often state their verdict.
    """
    prefix, suffix = special_tokens_around(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    bodies = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for ids in bodies:
        if len(ids) > budget:
            if truncation == "head_tail":
                ids = ids[:head_tokens] + ids[len(ids) - (budget - head_tokens) :]
            else:
                ids = ids[:budget]
        out.append(prefix + ids + suffix)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch: (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def token_budget_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Length-sorted batches of at most batch_size rows and max_tokens padded tokens.

    On a CPU a large batch buys little parallelism but pays for padding to its longest review; capping
    the padded size keeps long and short reviews in separate, nearly padding-free batches.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = batches[-1] if batches else None
        # the batch's first review is its longest, so its padded width is known
        if b and len(b) < batch_size and (len(b) + 1) * lengths[b[0]] <= max_tokens:
            b.append(i)
        else:
            batches.append([i])
    return batches


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding is small at inference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_windows(
    tokenizer, texts: Sequence[str], max_length: int, stride: int
) -> tuple[list[list[int]], list[int]]:
    """Every text as overlapping windows of at most max_length tokens (special tokens included).

    Windows start every `stride` body tokens and the last one is aligned to the end of the review, so
    every token is seen. Returns the windows and, for each, the index of the text it came from.
    """
    prefix, suffix = special_tokens_around(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if not 0 < stride <= budget:
        raise UserError(f"--window-stride must be in (0, {budget}] for max length {max_length}")
    bodies = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows, owner = [], []
    for i, ids in enumerate(bodies):
        starts = list(range(0, max(1, len(ids) - budget + 1), stride))
        if starts[-1] + budget < len(ids):
            starts.append(len(ids) - budget)
        for s in starts:
            windows.append(prefix + ids[s : s + budget] + suffix)
            owner.append(i)
    return windows, owner
