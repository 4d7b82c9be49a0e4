"""An on-disk cache of tokenized texts: the same texts, tokenizer and truncation are tokenized once.

Tokenizing IMDB's 50,000 reviews costs more than a whole fast training epoch on a GPU, and every run of
an experiment series tokenizes the same reviews again. The cache key covers everything the ids depend
on: the tokenizer's full serialized definition (vocabulary, normalizer, pre-tokenizer, special tokens),
the truncation settings and the texts themselves, so a stale entry cannot be read. Entries are
safetensors files (flat int32 ids + offsets), written atomically; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .tokenize import encode

CACHE_ENV = "IMDB_LORA_CACHE"
FORMAT_VERSION = 1  # bump when the stored layout or encode()'s output changes

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$IMDB_LORA_CACHE/tokens, else ~/.cache/imdb-lora/tokens (XDG_CACHE_HOME respected)."""
    base = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imdb-lora"
    )
    return Path(base) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of the tokenizer's whole definition, or None for tokenizers without a serialized form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(fingerprint: str, texts: Sequence[str], settings: dict) -> str:
    h = hashlib.sha256(
        json.dumps({"v": FORMAT_VERSION, "tok": fingerprint, **settings}, sort_keys=True).encode()
    )
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:  # length-prefixed, so no two different lists of texts hash alike
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def cached_encode(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    truncation: str = "head",
    head_tokens: int = 128,
    enabled: bool = True,
    progress: str | None = None,
) -> list[list[int]]:
    """encode() through the cache: the same ids, computed once per texts/tokenizer/settings.

    With `progress` (a description), texts that are actually tokenized (not read from the cache) show
    a progress bar on stderr: tokenizing 50,000 reviews takes a minute on a CPU.
    """
    fingerprint = tokenizer_fingerprint(tokenizer) if enabled and texts else None
    if fingerprint is None:
        return _encode_with_bar(tokenizer, texts, max_length, truncation, head_tokens, progress)
    settings = {"max_length": max_length, "truncation": truncation, "head_tokens": head_tokens}
    path = cache_root() / f"{cache_key(fingerprint, texts, settings)}.safetensors"
    ids = _read(path, len(texts))
    if ids is None:
        ids = _encode_with_bar(tokenizer, texts, max_length, truncation, head_tokens, progress)
        _write(path, ids)
    return ids


def _encode_with_bar(
    tokenizer, texts: Sequence[str], max_length: int, truncation: str, head_tokens: int, desc: str | None
) -> list[list[int]]:
    from tqdm.auto import tqdm

    with tqdm(
        total=len(texts), desc=desc, unit="review", dynamic_ncols=True, leave=False, disable=desc is None
    ) as bar:
        return encode(tokenizer, texts, max_length, truncation, head_tokens, progress=bar)


def _read(path: Path, expected: int) -> list[list[int]] | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(path)
        flat, offsets = t["ids"].tolist(), t["offsets"].tolist()
    except Exception as e:  # a truncated or foreign file: recompute and overwrite it
        log.warning("token cache %s unreadable (%s); tokenizing again", path.name, type(e).__name__)
        return None
    if len(offsets) != expected + 1 or offsets[-1] != len(flat):
        return None
    return [flat[offsets[i] : offsets[i + 1]] for i in range(expected)]


def _write(path: Path, ids: list[list[int]]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    lengths = torch.tensor([0] + [len(s) for s in ids], dtype=torch.int64)
    tensors = {
        "ids": torch.tensor([t for s in ids for t in s], dtype=torch.int32),
        "offsets": lengths.cumsum(0),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a read-only or full cache disk must not stop training
        # (safetensors reports a full disk as a SafetensorError, "... (os error 28)", not an OSError)
        log.warning("cannot write token cache %s: %s", path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
