"""The exceptions the CLI turns into one line: user mistakes (exit code 2) and SIGTERM (exit 143), and
what a full disk or a read-only file system makes a write raise (also one line, exit code 2); and the
wording its lines share (did_you_mean, counted)."""

from __future__ import annotations

import difflib
import errno
import os
import re
import signal
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad data); shown without a traceback."""


def did_you_mean(given: str | Iterable[str], names: Iterable[str]) -> str:
    """`; did you mean predict?`: the closest of `names` to each mistyped value in `given` that has one
    (difflib's similarity of at least 0.6), for the end of a one-line error; "" when none is close.
    The one matcher for argparse's choices (the CLI) and the values the config and export check."""
    names = list(names)
    givens = [given] if isinstance(given, str) else given
    close = [m[0] for g in givens if (m := difflib.get_close_matches(g, names, n=1))]
    return f"; did you mean {' and '.join(dict.fromkeys(close))}?" if close else ""


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """`1 row`, `2 rows`, `1,000 rows`: a count and its noun, singular for exactly one (`plural` where
    adding an s is wrong: `counted(n, "process", "processes")`). The one way the CLI's lines count
    (a float too: Ray's `1.0 GPU`)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stopping), raised where the command is, as Ctrl-C
    raises KeyboardInterrupt: the same clean-up and messages (train's resume hint, compare's), where
    SIGTERM's default ended the process at once, running no `finally`. The CLI exits with a shell's
    status for it."""

    status = 128 + int(signal.SIGTERM)


# A full disk, a quota, a file past the file system's size limit, a read-only mount: the user's to fix
# (free space, write elsewhere), never a bug of ours, so one line rather than a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def write_failure(e: BaseException) -> OSError | None:
    """The OSError behind `e` if it is a write that failed for lack of space or a read-only file system.

    safetensors' writer (checkpoints, adapters, merged models) raises its own SafetensorError, "I/O error:
    No space left on device (os error 28)", not an OSError: its errno is read from that text (by the
    class's name: this bottom layer imports no library)."""
    if isinstance(e, OSError):
        return e if e.errno in WRITE_ERRNOS else None
    if type(e).__name__ == "SafetensorError":
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m and int(m[1]) in WRITE_ERRNOS:
            return OSError(int(m[1]), os.strerror(int(m[1])))
    return None


def cannot_write(e: OSError, where: str | None = None) -> str:
    """`cannot write FILE (No space left on device)`: how a message about a failed write starts. `where`
    names the file when the error does not (safetensors' does not)."""
    name = e.filename if e.filename is not None else where
    # the errno's own words: pyarrow's strerror is "Error writing bytes to file. Detail: [errno 28] ..."
    return f"cannot write{'' if name is None else f' {name}'} ({os.strerror(e.errno) if e.errno else e})"


def make_room(e: OSError) -> str:
    """What the user does about a failed write before trying again."""
    if e.errno == errno.EROFS:
        return "make it writable"
    if e.errno == errno.EFBIG:
        return "use a file system that takes larger files"
    return "free some space"
