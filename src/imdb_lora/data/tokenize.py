"""Tokenization: truncation (head or head+tail) and overlapping windows for whole-review reading."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError

# Texts per tokenizer call: thousands keep the fast tokenizer's threads busy (no measurable cost over
# one call for the whole list) while a progress bar still moves every second or so.
ENCODE_CHUNK = 2048

# Characters of one text that truncated reading (encode) tokenizes: a text over this is read as its first
# and last MAX_TEXT_CHARS // 2 characters joined by a space. encode keeps at most max_length tokens from
# a text's start and end (head, head_tail), so this only bounds the time and memory one huge text costs
# (a 47 MB line took `predict` 1 min 43 s and 6.9 GB): 50,000 characters are thousands of tokens on each
# side, and the longest IMDB review has about 14,000. Windows (encode_windows) are asked for to read
# the whole text, and still do.
MAX_TEXT_CHARS = 100_000


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence (e.g. [CLS] ... [SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def window_layout(tokenizer, max_length: int) -> tuple[list[int], list[int], int]:
    """A max_length sequence's special-token ids before and after the review, and how many review
    tokens fit between them."""
    prefix, suffix = special_tokens_around(tokenizer)
    return prefix, suffix, max_length - len(prefix) - len(suffix)


def record_max_length(folder: Path, max_length: int) -> None:
    """Write the run's max_length as the saved tokenizer's model_max_length.

    imdb-lora cuts texts itself (encode), but transformers' pipeline() and a plain
    `tokenizer(text, truncation=True)` cut at model_max_length: left as the base model's (1e30 when it
    had none, 512 for MiniLM's), a long review went past the model's positions (an IndexError in
    pipeline(), onnxruntime's GatherElements error) or read more tokens than the run was trained on.
    With it, truncation=True gives the ids of --truncation head; head_tail cannot be said in this file.
    """
    path = folder / "tokenizer_config.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["model_max_length"] = max_length
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def bounded(text: str) -> str:
    """The text, or for one over MAX_TEXT_CHARS its first and last MAX_TEXT_CHARS // 2 characters
    joined by a space (the end too: head_tail reads it, and reviews often end with their verdict)."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    half = MAX_TEXT_CHARS // 2
    return text[:half] + " " + text[-half:]


def token_bodies(tokenizer, texts: Sequence[str], progress=None) -> list[list[int]]:
    """Each text's token ids without special tokens, tokenized in chunks; `progress` (e.g. a tqdm bar)
    is advanced by the number of texts after each chunk."""
    out: list[list[int]] = []
    for i in range(0, len(texts), ENCODE_CHUNK):
        chunk = list(texts[i : i + ENCODE_CHUNK])
        out += tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        if progress is not None:
            progress.update(len(chunk))
    return out


def encode(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    truncation: str = "head",
    head_tokens: int = 128,
    progress=None,
) -> list[list[int]]:
    """Token ids per text, special tokens included, cut to max_length.

    head keeps the first tokens (the same ids as the tokenizer's own truncation); head_tail keeps the
    first `head_tokens` and fills the rest of the budget from the end of the review, where reviews
    often state their verdict. A text over MAX_TEXT_CHARS is tokenized as its start and end only
    (bounded). `progress`, if given, is advanced by the number of texts tokenized.
    """
    prefix, suffix, budget = window_layout(tokenizer, max_length)
    bodies = token_bodies(tokenizer, [bounded(t) for t in texts], progress)
    out = []
    for ids in bodies:
        if len(ids) > budget:
            if truncation == "head_tail":
                ids = ids[:head_tokens] + ids[len(ids) - (budget - head_tokens) :]
            else:
                ids = ids[:budget]
        out.append(prefix + ids + suffix)
    return out


def recorded_stride(stride: int | None) -> int:
    """A window stride as every JSON record gives it (evaluate and select's --json, score's marker): one
    truncated window, None in memory, is 0, as the flag says it. Readers pass a record's value through
    it too: records written before (score's marker until 090718f) hold null for it."""
    return stride or 0


def check_window_stride(
    tokenizer, max_length: int, stride: int | None, flag: str = "--window-stride", whose: str = ""
) -> None:
    """A stride (None: no windows) fits the review tokens of one max_length window, or one line naming
    the flag (and `whose` windows, where several runs are checked)."""
    budget = window_layout(tokenizer, max_length)[2]
    if stride is not None and not 0 < stride <= budget:
        raise UserError(
            f"{flag} must be in (0, {budget}] for {whose}max length {max_length} (0: no windows), got {stride}"
        )


def encode_windows(
    tokenizer, texts: Sequence[str], max_length: int, stride: int
) -> tuple[list[list[int]], list[int]]:
    """Every text as overlapping windows of at most max_length tokens (special tokens included).

    Windows start every `stride` body tokens and the last one is aligned to the end of the review, so
    every token is seen. Returns the windows and, for each, the index of the text it came from.
    """
    prefix, suffix, budget = window_layout(tokenizer, max_length)
    check_window_stride(tokenizer, max_length, stride)
    bodies = token_bodies(tokenizer, texts)
    windows, owner = [], []
    for i, ids in enumerate(bodies):
        starts = list(range(0, max(1, len(ids) - budget + 1), stride))
        if starts[-1] + budget < len(ids):
            starts.append(len(ids) - budget)
        for s in starts:
            windows.append(prefix + ids[s : s + budget] + suffix)
            owner.append(i)
    return windows, owner
