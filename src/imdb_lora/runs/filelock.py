"""An exclusive OS lock (flock) on a file that holds its holder's pid: a second writer of the same output
(a score job's folder, an export's destination) is refused in one line naming the first one's pid. A
killed process's lock goes with it: a lock file left behind blocks nobody."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import IO

from ..errors import UserError


def lock_file(
    path: str | os.PathLike,
    create: bool,
    busy: Callable[[str], str],
    unusable: Callable[[str], str],
    changing: str,
) -> IO[str] | None:
    """The open, exclusively locked file at `path` (the lock lasts while it is open); None if there is
    none to lock (create=False and no file). Errors are UserErrors with the callers' words: busy(pid of
    the holder), unusable(why the file cannot be opened), changing (it kept being replaced)."""
    for _ in range(10):  # a file replaced between opening and locking it: lock the new one
        try:
            f = open(path, "a+" if create else "r+", encoding="utf-8")  # noqa: SIM115 - held open while the lock is
        except FileNotFoundError:
            return None
        except OSError as e:  # a folder named like it, no permission...
            raise UserError(unusable(e.strerror or type(e).__name__)) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read(32).strip() or "?"
            f.close()
            raise UserError(busy(holder)) from None
        if same_file(f, path):
            return f
        f.close()  # another writer deleted (replaced) the file we locked: our lock guards nothing
    raise UserError(changing)


def write_pid(f: IO[str]) -> None:
    """Say who holds the lock (a refused writer's error names it); written only once the holder goes on,
    so a writer that is refused leaves a lock file as it found it."""
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()


def same_file(f: IO[str], path: str | os.PathLike) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
