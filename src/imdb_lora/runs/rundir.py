"""The run directory: its layout, its status, and atomic writes of everything in it.

config.yaml            resolved config (the run's recipe)
run.json               status (running | finished) and the summary figures
tokenizer/             tokenizer files
adapter/               LoRA: PEFT adapter (classifier head included), or
model/                 full fine-tuning: the whole model (safetensors)
base_model/            only for --random-init LoRA runs: the random base the adapter belongs to
checkpoint.safetensors resume state (weights in training, optimizer, RNG, progress)
metrics.jsonl          one line per epoch
calibration.json       the temperature fitted on validation and its before/after figures (absent
                       with --no-calibration and in runs made before calibration existed)
results.md, curves.png, README.md   the report and the model card
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from .filelock import lock_file, write_pid

_WRITES = itertools.count()


def atomic_write_text(path: Path, text: str, replace: bool = True) -> None:
    """Replace `path` whole: a reader sees the old text or the new, never part of it. The temporary copy's
    name is this write's own, so two processes writing one file at once (two `evaluate --errors-dir`)
    leave one whole copy, the later's, rather than the earlier's renaming the later's half-written one.
    replace=False: a file that appeared at `path` since the caller checked (another process's) is kept,
    and FileExistsError raised (a hard link is the atomic no-clobber rename; where the file system has
    none, the check is made again just before the rename)."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{next(_WRITES)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if replace:
            os.replace(tmp, path)
        else:
            _link_or_rename(tmp, path)
    finally:  # a full disk or Ctrl-C mid-write: no half-written copy is left beside the file
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _link_or_rename(tmp: Path, path: Path) -> None:
    """`tmp` to `path` unless `path` exists (FileExistsError); `tmp` is left for the caller to remove."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some FUSE, SMB and FAT file systems)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


CALIBRATION = "calibration.json"
LOCK = ".lock"  # a run directory's: held by the one process that trains it


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, as a run or export writes it; one UserError naming the file
    for anything else (unreadable, not JSON, not an object, nested past the parser's recursion limit)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def read_calibration(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The calibration record of a run or export folder, or None if it has none (temperature 1).

    Training clamps the temperature to [T_MIN, T_MAX]; anything outside was not written by it, and would
    turn every probability into NaN (T near 0) or 0.5 (T huge)."""
    from ..calibration import T_MAX, T_MIN  # here: calibration imports torch, this module does not

    path = Path(folder).expanduser() / CALIBRATION
    if not path.is_file():
        return None
    try:
        record = read_json_object(path)
        temperature = float(record["temperature"])
    except (UserError, OverflowError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is unreadable; delete it to use uncalibrated probabilities") from None
    if not T_MIN <= temperature <= T_MAX:
        raise UserError(
            f"{path} holds temperature {temperature!r}, outside [{T_MIN}, {T_MAX}] where training keeps it"
        )
    return record


def require_creatable(path: Path, flag: str) -> None:
    """Raise UserError unless `path` is, or can become, a folder: checked before any slow work."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != path.absolute() and not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable")


def folder_state(path: str | os.PathLike) -> tuple[Any, ...] | None:
    """What a writer changes when it replaces a run or an export under a reader: the folder itself (train
    --overwrite and export --overwrite put a new one in its place by renaming) and each entry in it (files
    rewritten atomically get a new inode, adapter/ is swapped whole). The lock file is left out: a writer
    it refuses still writes its pid there. None if the folder cannot be listed."""
    folder = Path(path).expanduser()
    try:
        with os.scandir(folder) as entries:
            inside = sorted(
                (e.name, e.inode(), e.stat(follow_symlinks=False).st_mtime_ns)
                for e in entries
                if e.name != LOCK
            )
        st = folder.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, tuple(inside))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    config_path = property(lambda self: self.path / "config.yaml")
    status_path = property(lambda self: self.path / "run.json")
    tokenizer_dir = property(lambda self: self.path / "tokenizer")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    calibration_path = property(lambda self: self.path / CALIBRATION)

    lock_path = property(lambda self: self.path / LOCK)

    # ------------------------------------------------------------ one writer at a time

    _lock_file = None

    def lock(self) -> None:
        """Hold an exclusive lock on the run directory until unlock() or the process ends.

        An OS lock (flock), so a killed process never leaves a stale lock behind; the file holds the
        holder's pid, which the error names.
        """
        f = lock_file(
            self.lock_path,
            create=True,
            busy=lambda pid: (
                f"{self.path} is in use by another imdb-lora process (pid {pid}); "
                "wait for it to finish or stop it first"
            ),
            unusable=lambda why: f"{self.path}: cannot open its lock file {self.lock_path.name} ({why})",
            changing=f"{self.path}: its lock file keeps changing; is another imdb-lora process starting?",
        )
        if f is None:  # "a+" creates the file: only a missing folder gets here
            raise UserError(f"no such run directory: {self.path}")
        write_pid(f)
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def remove_if_empty(self) -> None:
        """Remove the folder if it holds nothing but its lock file, which no other process holds (a setup
        stopped just after creating it); anything else in it, or another holder, keeps it."""
        try:
            if any(p != self.lock_path for p in self.path.iterdir()):
                return
            if self._lock_file is None and self.lock_path.exists():
                self.lock()  # UserError when another process holds it: then it is theirs
            self.lock_path.unlink(missing_ok=True)
            self.unlock()
            self.path.rmdir()
        except (OSError, UserError):
            self.unlock()

    def hand_over_lock(self) -> IO[str] | None:
        """The held lock's open file, now the caller's (closing it releases the lock): `--overwrite` keeps
        the old run locked while the new run, at the same path, takes a lock of its own."""
        f, self._lock_file = self._lock_file, None
        return f

    def check_unlocked(self) -> None:
        """Raise UserError if another process holds the lock (without taking it)."""
        if self.lock_path.is_file():
            self.lock()
            self.unlock()

    def weights_dir(self, method: str) -> Path:
        return self.path / ("adapter" if method == "lora" else "model")

    # ------------------------------------------------------------ status

    def read_status(self) -> dict[str, Any]:
        """run.json's content; {} while there is none (a run being set up, or not a run at all)."""
        if not self.status_path.is_file():
            return {}
        return read_json_object(self.status_path)

    def status(self) -> str | None:
        return self.read_status().get("status")

    def is_run(self) -> bool:
        """Whether the folder was written by imdb-lora train (finished, interrupted, resumable, or killed
        right after taking its lock)."""
        return self.config_path.is_file() or self.status_path.is_file() or self.lock_path.is_file()

    def is_resumable(self) -> bool:
        return self.config_path.is_file() and (self.path / "checkpoint.safetensors").is_file()

    def write_status(self, status: str, summary: dict[str, Any]) -> None:
        atomic_write_text(self.status_path, json.dumps({"status": status, **summary}, indent=2) + "\n")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's rows, one per epoch ([] when there is none)."""
        if not self.metrics_path.is_file():
            return []
        try:  # a damaged copy (not UTF-8, not JSON, a line that is no object): one line, not a traceback
            rows = [
                json.loads(line)
                for line in self.metrics_path.read_bytes().decode().splitlines()
                if line.strip()
            ]
            bad = next((n for n, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
            if bad is not None:
                raise ValueError(f"row {bad} is a JSON {type(rows[bad - 1]).__name__}")
        except ValueError as e:
            raise UserError(f"{self.metrics_path}: not one JSON object per line ({e})") from None
        return rows

    def write_calibration(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.calibration_path, json.dumps(record, indent=2) + "\n")

    def require_finished(self) -> dict[str, Any]:
        """The run's summary, or a clear error if this is not a finished run directory."""
        if not self.path.is_dir():
            raise UserError(f"no such run directory: {self.path}")
        info = self.read_status()
        if not info or not self.config_path.is_file():
            raise UserError(self.not_a_run_message())
        if info.get("status") != "finished":
            # "running" is also what a copy taken while training went on says: no final weights yet
            how = (
                f"finish it with `imdb-lora train --output-dir {shlex.quote(str(self.path))} --resume`"
                if self.is_resumable()
                else "it holds no checkpoint to resume from yet"
            )
            raise UserError(
                f"{self.path} is not a finished run (status: {info.get('status')}: still training, or "
                f"stopped or copied before it finished); {how}"
            )
        if not self.weights_dir(info.get("method", "lora")).is_dir():
            raise UserError(f"{self.path} has no {self.weights_dir(info.get('method', 'lora')).name}/ folder")
        return info

    def not_a_run_message(self) -> str:
        """Why this folder is no run; a folder of runs (compare's output, or runs/) names them, since a
        user who gives `compare --output-dir`'s folder to predict/evaluate/export/serve means one of them."""
        try:
            runs = sorted(p for p in self.path.iterdir() if p.is_dir() and RunDir(p).is_run())
        except OSError:  # unreadable: say what is known
            runs = []
        if not runs:
            return f"{self.path} is not an imdb-lora run directory (no run.json/config.yaml)"
        shown = ", ".join(str(p) for p in runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
        what = "compare's output folder" if (self.path / "comparison.md").is_file() else "a folder of runs"
        return f"{self.path} is {what}, not a run; give one of its runs: {shown}"

    # ------------------------------------------------------------ weights

    def save_weights(self, model, method: str) -> None:
        """Replace adapter/ (or model/) as a whole: a crash leaves the old or the new copy, never half."""
        from ..modeling.load import open_to_readers  # here: it imports torch, this module does not

        final = self.weights_dir(method)
        tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        sort_target_modules(tmp / "adapter_config.json")
        portable_adapter(tmp)
        open_to_readers(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def recover(self) -> None:
        """Finish an interrupted swap in save_weights: keep whichever complete copy exists."""
        for name in ("adapter", "model"):
            final = self.path / name
            old, tmp = self.path / (name + ".old"), self.path / (name + ".tmp")
            if not final.exists() and old.exists():
                os.replace(old, final)
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)

    def weights_bytes(self, method: str) -> int:
        return dir_bytes(self.weights_dir(method))


def portable_adapter(folder: Path) -> None:
    """PEFT records the base model as the process loaded it: for a local folder, an absolute path of this
    machine, in adapter_config.json (`base_model_name_or_path`) and in its README.md's hub metadata, which
    travel wherever the adapter is shared or uploaded. A local base is recorded as `./NAME`, its folder's
    name as a relative path, and left out of the README's metadata, which the hub reads as a hub id; a
    hub id stays as it is. imdb-lora finds the base through config.yaml, not this file.

    Why `./NAME` and not NAME: peft's AutoPeftModel* hands the value to transformers, which loads a local
    folder of that name when there is one (run beside the base, it works) and otherwise asks the hub for
    a model of that name: a missing base became a hub download error, or another model that happens to
    bear the name. `./NAME` is never a hub id: elsewhere it fails at once, quoting './NAME'."""
    config = folder / "adapter_config.json"
    if not config.is_file():  # full fine-tuning saves a model/ folder, no adapter
        return
    record = json.loads(config.read_text(encoding="utf-8"))
    base = record.get("base_model_name_or_path")
    # local: an absolute path (config.yaml keeps local folders so), or a relative one that exists here
    # (a resumed random-init run reloads its base from the run's own base_model/)
    if not isinstance(base, str) or not (os.path.isabs(base) or os.path.exists(base)):
        return
    name = local_base_name(base)
    record["base_model_name_or_path"] = name
    config.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    card = folder / "README.md"
    if card.is_file():
        dropped = {f"base_model: {base}", f"- base_model:adapter:{base}"}
        lines = [line for line in card.read_text(encoding="utf-8").split("\n") if line.strip() not in dropped]
        card.write_text("\n".join(lines).replace(base, name), encoding="utf-8")


def local_base_name(path: str) -> str:
    """How an adapter names a local base model: its folder, relative to where the user loads from."""
    return f"./{Path(path).name}"


def sort_target_modules(adapter_config: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which changes from one Python
    process to the next: sorted, the same run writes the same adapter_config.json every time."""
    if not adapter_config.is_file():  # full fine-tuning saves a model/ folder, no adapter
        return
    record = json.loads(adapter_config.read_text(encoding="utf-8"))
    if isinstance(record.get("target_modules"), list):
        record["target_modules"] = sorted(record["target_modules"])
        adapter_config.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
