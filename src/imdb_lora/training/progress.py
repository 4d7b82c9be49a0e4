"""The progress record of a resume checkpoint, read from its safetensors header alone, without torch.

Two readers need it: the trainer (which step a stop saved) and scripts/gpu_resume.py, which runs on the
GPU machine right after a deadline, where a fresh `import torch` costs ~10 s (and safetensors'
`safe_open(..., "pt")` needs torch). So this module imports the standard library only; checkpoint.py,
which writes the record, keeps torch.

A safetensors file starts with the header's length (8 bytes, little-endian) and the header itself, JSON;
save_checkpoint puts the progress record, itself JSON, under its `__metadata__`'s "progress".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

# safetensors' own limit on a header: a larger length is a damaged file (read as is, a garbled length
# asked for exabytes)
MAX_HEADER_BYTES = 100_000_000


class UnreadableProgress(ValueError):
    """The file is missing, damaged, or not a checkpoint with a progress record; str() says which."""


def read_progress(path: Path) -> dict[str, Any]:
    """The progress record saved in the checkpoint at `path` (a dict of Progress's fields)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header = _header(f, path.stat().st_size)
        progress = json.loads(header["__metadata__"]["progress"])
    except OSError as e:
        raise UnreadableProgress(f"{path}: {e.strerror or e}") from None
    except _NotSafetensors as e:
        raise UnreadableProgress(f"{path}: not a safetensors file ({e})") from None
    except (KeyError, TypeError, ValueError) as e:  # no metadata or no record; a record that is not JSON
        raise UnreadableProgress(f"{path}: no readable progress record ({type(e).__name__})") from None
    if not isinstance(progress, dict):
        raise UnreadableProgress(f"{path}: no readable progress record (a JSON {type(progress).__name__})")
    return progress


class _NotSafetensors(Exception):
    pass


def _header(f: BinaryIO, size: int) -> dict[str, Any]:
    """The header of the safetensors file `f` of `size` bytes, checked for length before it is read."""
    if size < 8:
        raise _NotSafetensors(f"{size} bytes")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise _NotSafetensors(f"a header of {n:,} bytes in {size:,}")
    try:
        header = json.loads(f.read(n))
    except ValueError:  # not UTF-8, or not JSON
        raise _NotSafetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _NotSafetensors("its header is not a JSON object")
    return header


def saved_step(path: Path) -> int | None:
    """The global step of the checkpoint at `path`, or None if it is missing or unreadable."""
    try:
        return int(read_progress(path)["global_step"])
    except (UnreadableProgress, KeyError, TypeError, ValueError):  # the caller says what it knows
        return None
