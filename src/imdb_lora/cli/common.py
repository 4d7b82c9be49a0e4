"""Flags and argument types shared by several commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

from ..config import path_problem
from ..errors import UserError, did_you_mean
from ..inference.exported import missing_folder


def add_window_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window-stride",
        type=window_stride,
        metavar="TOKENS",
        help="read long reviews as overlapping max-length windows starting every TOKENS tokens and "
        "average their probabilities (0: one truncated window, as in training) [default: 0]",
    )


def window_stride(text: str) -> int | None:
    """TOKENS >= 0; 0 is no windows (None), as in select's --window-strides."""
    return argument(text, int, lambda v: v >= 0, "an integer >= 0") or None


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
        "size, so a large batch costs no more per text than a small one [default: 2048 on CPU, 32768 on CUDA]",
    )


# The flags below mean the same in every command that has them, in the same words.


def add_device_flag(p: argparse.ArgumentParser, default: str | None = "auto", scope: str = "") -> None:
    """--device; `scope` says what it applies to where that is not everything (score's local engine)."""
    p.add_argument(
        "--device",
        default=default,
        metavar="DEVICE",
        help=f"{scope}auto (CUDA if available, else CPU), cpu, cuda or cuda:N [default: {default or 'auto'}]",
    )


def add_base_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        type=path_arg,
        metavar="DIR",
        help="base model folder of a LoRA run, if it moved since training",
    )


def add_data_flag(p: argparse.ArgumentParser, default: str) -> None:
    """--data as train's (the same words), with what it defaults to in this command."""
    p.add_argument(
        "--data",
        type=path_arg,
        metavar="PATH",
        help=f"aclImdb folder or .tar/.tar.gz/.tar.xz of it [default: {default}]",
    )


def add_batch_size_flag(p: argparse.ArgumentParser, default: int, token_capped: bool) -> None:
    """--batch-size of the commands that run a model on texts (train's is reviews per optimizer step)."""
    capped = " (--max-batch-tokens also caps it)" if token_capped else ""
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=default,
        metavar="BATCH_SIZE",
        help=f"texts per forward pass at most{capped} [default: {default}]",
    )


class Renamed(argparse.Action):
    """A flag that was renamed: using it is a one-line error naming the new flag (never silently ignored)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, f"was renamed: use {self.new}")


def argument(text: str, cast, ok, expected: str):
    """An argparse type's body: `text` as `cast` gives it, if `ok`; else "expected ..., got ..."."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    return argument(text, float, lambda v: v >= 0, "a number >= 0")


def positive_float(text: str) -> float:
    return argument(text, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def learning_rate(text: str) -> float:
    """As train's --lr: AdamW moves each weight by about lr a step, so 1 or more only diverges."""
    return argument(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def positive_int(text: str) -> int:
    return argument(text, int, lambda v: v >= 1, "a positive integer")


def path_arg(text: str) -> str:
    """A file or folder (or hub id, URI) argument, refused here, naming its flag, if no file system could
    hold it: a name over 255 bytes made os.stat raise "File name too long" as a traceback."""
    problem = path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"not a usable path: {problem}")
    return text


def nonempty_path(text: str) -> str:
    """path_arg for a flag whose empty value was silently taken as not given (train --config and
    --output-dir) or as the current folder (score --input read everything under it)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return path_arg(text)


def batch_sizes(text: str) -> list[int]:
    """Comma-separated positive sizes, each once (a repeated size would be measured, and compared, twice)."""
    sizes = [positive_int(part) for part in text.split(",") if part.strip()]
    if not sizes or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(
            f"expected distinct positive integers separated by commas, got {text!r}"
        )
    return sizes


def require_directories(*paths: str) -> None:
    """A mistyped run or export path fails at once, before torch & co. are imported (seconds). A `~` the
    shell did not expand (a quoted "~/runs/x") is the home folder, as everywhere else."""
    for path in paths:
        if not Path(path).expanduser().is_dir():
            raise UserError(missing_folder(path))


def closest_flag(message: str, flags: Iterable[str]) -> str:
    """`; did you mean --max-steps?` for argparse's "unrecognized arguments: --max-stpes 5"."""
    head, found, rest = message.partition("unrecognized arguments: ")
    given = [a.split("=", 1)[0] for a in rest.split() if a.startswith("--")] if found else []
    return did_you_mean(given, [f for f in flags if f.startswith("--")]) if given else ""
