"""IMDB in its aclImdb layout: a folder, a tar archive of it, or the official download."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from .labeled import LabeledTexts

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
DATA_ENV = "IMDB_LORA_DATA"


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
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        why = str(e).splitlines()[0].rstrip(":.") if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read archive {path}: {why} (corrupt, or not a .tar/.tar.gz/.tar.xz)"
        ) from None


def load_imdb(path: str | os.PathLike) -> dict[str, LabeledTexts]:
    """Read IMDB train/test from an aclImdb folder (or its parent) or a tar archive of it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data: no such file or directory: {p}")
    if p.is_dir():
        root = p / "aclImdb" if (p / "aclImdb").is_dir() else p
        return _collect(_iter_dir(root), str(p))
    return _collect(_iter_tar(p), str(p))


def download_imdb(cache_dir: Path, url: str = IMDB_URL) -> Path:
    """Fetch the official archive once into cache_dir (progress bar, sha256 checked); one clear line offline."""
    from tqdm.auto import tqdm

    dest = cache_dir / "aclImdb_v1.tar.gz"
    if dest.is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download IMDB", leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, a bad URL
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"no --data given and IMDB could not be downloaded from {url} ({reason}); "
            f"pass --data PATH (an aclImdb folder or archive) or set {DATA_ENV}"
        ) from None
    if digest.hexdigest() != IMDB_SHA256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"the IMDB download from {url} is corrupt (sha256 mismatch); run the command again")
    tmp.replace(dest)
    return dest


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imdb-lora"


def resolve_imdb_path(path: str | None) -> str:
    """--data, else $IMDB_LORA_DATA, else the official archive, downloaded once into the user cache."""
    if path:
        return path
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    return str(download_imdb(cache_dir()))


def describe_source(path: str) -> dict[str, Any]:
    """What a run records about its IMDB data: the absolute path (or download URL) and an archive's sha256."""
    p = Path(path).expanduser().resolve()
    out: dict[str, Any] = {"kind": "imdb", "path": str(p)}
    if p.is_file():
        out["sha256"] = file_sha256(p)
        if out["sha256"] == IMDB_SHA256:
            out["url"] = IMDB_URL
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
