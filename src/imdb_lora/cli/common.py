"""Flags and argument types shared by several commands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import UserError


def add_window_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window-stride",
        type=int,
        metavar="TOKENS",
        help="read long reviews as overlapping max-length windows starting every TOKENS tokens and "
        "average their probabilities (default: one truncated window, as in training)",
    )


def add_raw_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--raw",
        action="store_true",
        help="raw softmax probabilities: ignore the temperature fitted on validation (calibration.json)",
    )


def add_max_batch_tokens_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        metavar="TOKENS",
        help="padded tokens per forward pass: texts run as length-sorted micro-batches of at most this "
        "size, so a large batch costs no more per text than a small one (default: 2048 on CPU, 32768 on CUDA)",
    )


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def batch_sizes(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def require_directories(*paths: str) -> None:
    """A mistyped run or export path fails at once, before torch & co. are imported (seconds)."""
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"no such run directory: {path}")
