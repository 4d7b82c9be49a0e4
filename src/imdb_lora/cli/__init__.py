"""Command line: `imdb-lora COMMAND ...` (also `python -m imdb_lora`); the only place argparse lives.

One module per command, each with an `add_*_parser(sub)` that registers it. Every config field is a
`train` flag, generated from the dataclasses in config.py, so the CLI, the YAML files and the saved
config.yaml can never drift apart. Heavy libraries (torch, transformers, FastAPI) are imported inside
the commands, so `--help` is fast. User mistakes end with one line on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import codecs
import io
import os
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from ..errors import Terminated, UserError, cannot_write, did_you_mean, make_room, write_failure
from .bench import add_bench_parser
from .common import closest_flag
from .compare import add_compare_parser
from .evaluate import add_evaluate_parser
from .export import add_export_parser
from .predict import add_predict_parser
from .score import add_score_parser
from .select import add_select_parser
from .serve import add_serve_parser
from .train import add_train_parser

PARSERS: list[Callable] = [
    add_train_parser,
    add_evaluate_parser,
    add_predict_parser,
    add_compare_parser,
    add_select_parser,
    add_export_parser,
    add_serve_parser,
    add_score_parser,
    add_bench_parser,
]


class Parser(argparse.ArgumentParser):
    """argparse's parser with a usage mistake said in one line, as every other mistake is (argparse
    prints the command's whole usage block above it), pointing at --help; a mistyped command or choice
    names the closest one. Subcommands' parsers are of this class too (add_subparsers takes the class
    of the parser it is called on)."""

    def __init__(self, *args, **kwargs) -> None:
        # No prefixes of flags: `--max-step 5` taken as --max-steps today would become an error, or
        # another flag, the day a flag sharing the prefix is added; a mistyped flag is named instead.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = closest_choice(message) or closest_flag(message, self._option_string_actions)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def closest_choice(message: str) -> str:
    """`; did you mean predict?` for argparse's "invalid choice: 'predcit' (choose from 'train', ...)"."""
    head, found, choices = message.partition("invalid choice: ")
    if not found or " (choose from " not in choices:
        return ""
    given, _, listed = choices.partition(" (choose from ")
    names = [c.strip().strip("'") for c in listed.removesuffix(")").split(",")]
    return did_you_mean(given.strip("'"), names)


def command_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `ns` was parsed for: `imdb-lora bench train`'s, not the root's."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(ns, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="imdb-lora", description="IMDB sentiment analysis by LoRA fine-tuning")
    p.add_argument(
        "--version",
        action=VersionAction,
        help="show imdb-lora's version and those of Python, torch, transformers and peft, and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return p


def version_line() -> str:
    """`imdb-lora 0.1.0 (Python 3.12.3, torch 2.11.0, transformers 5.17.0, peft 0.21.0)`: what a bug
    report needs, read from the installed packages' metadata without importing them (fast)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{d} {of(d)}" for d in ("torch", "transformers", "peft"))
    return f"imdb-lora {__version__} (Python {platform.python_version()}, {libs})"


class VersionAction(argparse.Action):
    """argparse's "version" action, with the line computed only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_line())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the command's start, for train's time breakdown (torch is not imported yet)
    # transformers' own deprecation notices (e.g. is_gradient_checkpointing) are not the user's to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    escape_unencodable_output()
    try:
        code = run_command(build_parser(), argv, started)
        sys.stdout.flush()  # here, not at exit: `> file` on a full disk is then one line, as any write
        return code
    except UserError as e:  # one line, even when it quotes a path or a library's message with line breaks
        print(f"imdb-lora: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a file of another user's, a read-only copy: which file, not a traceback
        print(f"imdb-lora: error: {permission_denied(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; train and compare say what it left behind
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        if not getattr(e, "quiet", False):  # a data-parallel rank other than 0 (train sets it)
            print(f"\nimdb-lora: {what}{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return e.status if isinstance(e, Terminated) else 128 + int(signal.SIGINT)
    except BrokenPipeError:
        if not stdout_is_a_pipe():
            raise
        return reader_left()
    except Exception as e:  # a full disk or a read-only file system, under a write no command words itself
        failure = write_failure(e)
        if failure is None:
            raise
        print(f"imdb-lora: error: {printable(unwritable(failure))}", file=sys.stderr)
        return 2


OUTPUT_ERRORS = "imdb-lora-escape"


def _escape_unencodable(e: UnicodeError) -> tuple[str | bytes, int]:
    """A character standard output's encoding cannot hold, as a Python escape (\\xe9, \\U0001f600);
    bytes the OS handed over undecoded (PEP 383's lone surrogates: a file name under LC_ALL=C) go back
    out as those bytes, as Python's surrogateescape writes them."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    chunk = e.object[e.start : e.end]
    if all("\udc80" <= c <= "\udcff" for c in chunk):
        return bytes(ord(c) - 0xDC00 for c in chunk), e.end
    return codecs.backslashreplace_errors(e)


codecs.register_error(OUTPUT_ERRORS, _escape_unencodable)


def escape_unencodable_output() -> None:
    """Standard output in an encoding narrower than the text (PYTHONIOENCODING=ascii or latin-1, LC_ALL=C
    with PYTHONUTF8=0) shows what it cannot encode as an escape instead of ending in a traceback after
    the work is done (standard error does so already: Python's backslashreplace). --json is ASCII."""
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper) and out.errors in ("strict", "surrogateescape"):
        out.reconfigure(errors=OUTPUT_ERRORS)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, started: float | None = None) -> int:
    """Parse the command line and run its command; its exit code. `started`: when the command began
    (time.monotonic), handed to the command as `ns.started`."""
    try:
        ns, extra = parser.parse_known_args(argv)
        ns.started = started
        if getattr(ns, "passthrough", False):  # compare hands the remaining flags to train
            ns.extra = extra
        elif extra and getattr(ns, "texts", None) is not None and not any(e.startswith("-") for e in extra):
            ns.texts += extra  # texts after options: `predict RUN --json "text"`
        elif extra:  # said by the command's own parser: its --help lists what it takes
            command = command_parser(parser, ns)
            message = f"unrecognized arguments: {' '.join(extra)}"
            hint = closest_flag(message, command._option_string_actions)
            parser.exit(2, f"{command.prog}: error: {message}{hint} (see {command.prog} --help)\n")
        with sigterm_as_interrupt():
            return ns.func(ns)
    except SystemExit as e:  # argparse usage errors (code 2), --help and --version (code 0)
        return int(e.code or 0)


def printable(message: str) -> str:
    """A message as one line of plain text: a line break is shown as \\n, and any other control
    character as an escape (pyarrow's parse errors quote the raw row, and a binary file's bytes put
    NULs and terminal escape sequences on the user's terminal)."""
    escapes = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
    return "".join(
        c if c.isprintable() else escapes.get(c) or c.encode("unicode_escape").decode("ascii")
        for c in message
    )


def permission_denied(e: PermissionError) -> str:
    """One line naming what could not be read or written (a rename names both ends)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
    return (
        f"permission denied: {where}; this user may not read or write it (owned by another user, or a "
        "read-only copy): ask its owner for access, or work on a copy of your own"
    )


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated, once: a second SIGTERM (a process group's
    members each get one, and compare passes its own on to its training child) must not cut short the
    clean-up the first began; SIGKILL still ends it. The previous handler is back afterwards. (`serve`
    is uvicorn's while it serves: uvicorn takes the signals then, and drains on the first.)"""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # only it may set signal handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured, closed)
        return False


def reader_left() -> int:
    """`predict ... | head`: the reader closed the pipe, having read all it wanted. Quiet, as other
    filters are: stdout goes to /dev/null (Python would report the failed flush at exit), and the exit
    status is a shell's for SIGPIPE (128 + 13), so `set -o pipefail` still sees the output was cut."""
    stdout_to_devnull()
    return 128 + int(signal.SIGPIPE)


def unwritable(e: OSError) -> str:
    """The line for a failed write. One that names no file may be standard output's (`predict > file` on a
    full disk); what is left in its buffer is then dropped, or Python would report it failing at exit."""
    what = cannot_write(e)
    if e.filename is None and (not stdout_flushes() or stdout_disk_is_full()):
        stdout_to_devnull()
        what = cannot_write(e, "standard output")
    return f"{what}; {make_room(e)} or write elsewhere, and run the command again"


def stdout_flushes() -> bool:
    """False while standard output holds what it failed to write (a buffered print)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a full or read-only target; a closed stream
        return False
    return True


def stdout_disk_is_full() -> bool:
    """Whether standard output's file system is full (an unbuffered or large print keeps nothing back),
    or standard output is /dev/full (a device: its file system, /dev, has room)."""
    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd)
        if stat.S_ISCHR(mode.st_mode):
            return mode.st_rdev == os.stat("/dev/full").st_rdev
        return os.fstatvfs(fd).f_bavail == 0
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured, closed); no /dev/full
        return False


def stdout_to_devnull() -> None:
    """Standard output goes nowhere from now on (what Python would flush at exit included)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
