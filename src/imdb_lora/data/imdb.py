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

# Bounds on what --data may make us read, so a damaged or crafted archive (a "zip bomb") fails in one
# line instead of filling memory or decompressing for hours. aclImdb's labeled reviews (train and test)
# are 50,008 archive entries holding 65 MB, the longest review 13,704 bytes; each bound is far above.
MAX_REVIEW_BYTES = 1 << 20  # one review file: reviews are read whole into memory
MAX_ENTRIES = 1_000_000  # entries walked in an archive or review files in a folder (tarfile keeps each)
MAX_EXPANDED_BYTES = 4 << 30  # bytes an archive's entries hold in all: each is decompressed, even if skipped


def _imdb_member(parts: list[str]) -> tuple[str, int] | None:
    """(split, label) for a path like aclImdb/train/pos/123_9.txt, else None."""
    if len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-2] in ("pos", "neg"):
        if parts[-1].endswith(".txt"):
            return parts[-3], int(parts[-2] == "pos")
    return None


def _decode(raw: bytes, name: str, flag: str) -> str:
    try:
        # utf-8-sig: a byte order mark (Windows editors write one) is not part of the review's text
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag}: review file is not UTF-8: {name} ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{flag}: review file is empty: {name}")
    return text


def _collect(
    items: Iterator[tuple[str, bytes]], source: str, flag: str, archive: bool = False
) -> dict[str, LabeledTexts]:
    found: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    for name, raw in items:
        split, label = _imdb_member(name.split("/"))  # type: ignore[misc]
        where = f"{name} in {source}" if archive else name  # a member's name alone does not say which file
        found[split].append((name, _decode(raw, where, flag), label))
    out = {}
    for split, rows in found.items():
        if not rows or len({r[2] for r in rows}) < 2:
            raise UserError(
                f"{flag}: {source} is not an aclImdb dataset: no {split}/pos and {split}/neg review files found"
            )
        rows.sort(key=lambda r: r[0])  # archive order varies; sorted names make runs reproducible
        out[split] = LabeledTexts([r[1] for r in rows], [r[2] for r in rows])
    return out


def _check_review_size(size: int, name: str, flag: str, archive: Path | None = None) -> None:
    if size > MAX_REVIEW_BYTES:
        inside = f" in {archive}" if archive else ""
        raise UserError(
            f"{flag}: review file is larger than {MAX_REVIEW_BYTES >> 20} MiB: {name} ({size:,} bytes){inside}; "
            "aclImdb reviews are under 14 KB"
        )


def _iter_dir(root: Path, flag: str) -> Iterator[tuple[str, bytes]]:
    count = 0
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            d = root / split / label
            if d.is_dir():
                for p in sorted(d.glob("*.txt")):
                    count += 1
                    if count > MAX_ENTRIES:
                        raise UserError(
                            f"{flag}: {root} holds more than {MAX_ENTRIES:,} review files; is it aclImdb?"
                        )
                    yield str(p), _read_review(p, flag)


def _read_review(p: Path, flag: str) -> bytes:
    """A review file's bytes; a link to a device or FIFO (no size, maybe endless) is refused."""
    if not p.is_file():
        raise UserError(f"{flag}: review file is not a regular file: {p}")
    _check_review_size(p.stat().st_size, str(p), flag)
    with open(p, "rb") as f:  # read no more than the bound, even if the file grows meanwhile
        raw = f.read(MAX_REVIEW_BYTES + 1)
    _check_review_size(len(raw), str(p), flag)
    return raw


def _iter_tar(path: Path, flag: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each review member, read in place (nothing is extracted to disk)."""
    try:
        with tarfile.open(path) as tf:
            entries = expanded = 0
            seen: set[str] = set()
            for m in tf:
                entries, expanded = entries + 1, expanded + max(m.size, 0)
                _check_archive_bounds(path, entries, expanded, flag)
                if _imdb_member(m.name.split("/")):
                    _check_review_member(m, path, seen, flag)
                    _check_review_size(m.size, m.name, flag, path)
                    f = tf.extractfile(m)
                    yield m.name, f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        why = str(e).splitlines()[0].rstrip(":.") if str(e).strip() else type(e).__name__
        if _is_labeled_file(path):  # --data confused with the flags that take labeled files
            why += "; --data takes an aclImdb folder or archive: give labeled CSV/TSV/JSONL files to train "
            why += "as --train-file (and --test-file), to evaluate as --file, to score as --input"
            raise UserError(f"{flag}: cannot read archive {path}: {why}") from None
        raise UserError(
            f"{flag}: cannot read archive {path}: {why} (corrupt, or not a .tar/.tar.gz/.tar.xz)"
        ) from None


def _check_review_member(m: tarfile.TarInfo, path: Path, seen: set[str], flag: str) -> None:
    """A review member must be a regular file, once, under a relative name: a link or a second copy of
    a name was skipped or read twice without a word (tar itself would keep only the last copy when
    extracting), and a name that is absolute or climbs out with `..` (which tar refuses to extract) was
    read as a review although it lies outside any aclImdb folder."""
    parts = m.name.split("/")
    if m.name.startswith("/") or ".." in parts:
        kind = "an absolute name" if m.name.startswith("/") else "a '..' in its name"
        raise UserError(
            f"{flag}: archive {path}: review member {m.name} has {kind}; aclImdb archives hold relative "
            "names inside the archive"
        )
    if not m.isfile():
        kind = "a symbolic link" if m.issym() else "a hard link" if m.islnk() else "not a regular file"
        raise UserError(
            f"{flag}: archive {path}: review member {m.name} is {kind}; aclImdb archives hold regular "
            "files (re-create it with tar's --dereference and --hard-dereference)"
        )
    if m.name in seen:
        raise UserError(f"{flag}: archive {path} holds {m.name} twice; which copy is the review?")
    seen.add(m.name)


def _is_labeled_file(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _check_archive_bounds(path: Path, entries: int, expanded: int, flag: str) -> None:
    """Checked from each entry's header, before its content is read or skipped."""
    if entries > MAX_ENTRIES:
        raise UserError(
            f"{flag}: archive {path} holds more than {MAX_ENTRIES:,} entries; is it an aclImdb archive?"
        )
    if expanded > MAX_EXPANDED_BYTES:
        raise UserError(
            f"{flag}: archive {path} expands to more than {MAX_EXPANDED_BYTES >> 30} GiB; "
            "is it damaged, or not an aclImdb archive?"
        )


def load_imdb(path: str | os.PathLike, flag: str = "--data") -> dict[str, LabeledTexts]:
    """Read IMDB train/test from an aclImdb folder (or its parent) or a tar archive of it; every
    error starts with `flag`, where the path came from (--data, $IMDB_LORA_DATA, the download)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag}: no such file or directory: {p}")
    if p.is_dir():
        root = p / "aclImdb" if (p / "aclImdb").is_dir() else p
        return _collect(_iter_dir(root, flag), str(p), flag)
    if not p.is_file():  # a FIFO, socket or device: opening it as an archive blocked forever
        raise UserError(
            f"{flag}: {p} is not a regular file or a folder (a FIFO, socket or device?); give an aclImdb "
            "folder or a .tar/.tar.gz/.tar.xz of it"
        )
    return _collect(_iter_tar(p, flag), str(p), flag, archive=True)


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


def resolve_imdb_source(path: str | None) -> tuple[str, str]:
    """--data, else $IMDB_LORA_DATA, else the official archive, downloaded once into the user cache; with
    where it came from, which names it in errors: --data, $IMDB_LORA_DATA, or the download."""
    if path:
        return path, "--data"
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV], f"${DATA_ENV}"
    return str(download_imdb(cache_dir())), "the IMDB download"


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
