"""Export a finished run: stage, write, check against the run, then swap into place atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import __version__
from ..data.tokenize import record_max_length
from ..errors import UserError, cannot_write, did_you_mean, make_room, write_failure
from ..inference.classifier import Classifier
from ..inference.exported import (
    FORMATS,
    MARKER,
    ONNX_FILE,
    QUANTIZATIONS,
    is_export,
    recorded_files,
    set_aside_folder,
)
from ..modeling.load import open_to_readers, position_limit
from ..runs.filelock import lock_file, write_pid
from ..runs.rundir import CALIBRATION, RunDir, require_creatable
from .onnx import annotate, export_onnx
from .portable import write_portable_config, write_portable_record

# Texts the export is checked on: short and long, clear and mixed, so that both labels and padding occur.
PROBE_TEXTS = [
    "A wonderful film: moving, funny and beautifully acted. I loved every minute of it.",
    "Dull, predictable and far too long. The worst script I have sat through in years.",
    "The first half drags, but the ending is superb and the lead performance carries it.",
    "Not bad, not great. " * 40,
]


# ---------------------------------------------------------------- exporting


@dataclass
class ExportResult:
    path: Path
    marker: dict[str, Any]

    def summary(self) -> str:
        m = self.marker
        kind = m["format"] + (f" {m['quantize']}" if m.get("quantize") else "")
        check = m["check"]
        return (
            f"exported to {self.path} ({kind}, {m['size_bytes'] / 1e6:.1f} MB) | "
            f"check on {check['texts']} texts: labels agree {check['labels_agree']}/{check['texts']}, "
            f"max |Δprob| {check['max_abs_prob_diff']:.2e} | temperature {m.get('temperature', 1.0):.4f}"
        )


def export_run(
    run: str,
    to: str,
    fmt: str = "merged",
    quantize: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write an export of a finished run into `to`, atomically (a failed export leaves nothing behind).

    `progress` is told each slow step as it starts (loading, writing, ONNX, int8, the check)."""
    say = progress or (lambda _: None)
    check_options(fmt, quantize)
    dest = Path(to).expanduser()
    if dest.is_symlink():  # the export goes where the link points (swapping the link itself out left
        dest = dest.resolve()  # the old export in place, a new folder instead of the link, and a stray link)
    src = Path(run).expanduser()
    if is_export(src):
        raise UserError(f"{run} is already an export; export from the run directory")
    check_destination(src, dest, overwrite)
    parent = dest.absolute().parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again if the export fails
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--to {dest}: cannot create a folder there ({e.strerror})") from None
    ok, lock = False, None
    try:
        lock = lock_destination(dest)  # one export into a folder at a time: they would wipe each other's work
        restore_set_aside(dest, say)
        check_destination(src, dest, overwrite)  # again, under the lock: it may have been written meanwhile
        say(f"loading {run} ...")
        clf = Classifier.load(run, device="cpu", base_model=base_model, merge=True)
        stage = staging_folder(dest)
        shutil.rmtree(stage, ignore_errors=True)  # a killed export's: no other export holds this folder
        try:
            stage.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"--to {dest}: cannot create a folder there ({e.strerror})") from None
        try:
            marker = _write_export(clf, src, stage, fmt, quantize, say)
            _replace(stage, dest)
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            failure = write_failure(e)
            if failure is not None:  # a full disk: said in one line, naming --to rather than the stage
                kept = "the export there is kept" if is_export(dest) else "nothing was written there"
                raise UserError(
                    f"--to {dest}: {cannot_write(failure)}; {kept}; {make_room(failure)} and export again"
                ) from None
            raise
        ok = True
    finally:
        if lock is not None:
            unlock_destination(lock, dest)
        for folder in [] if ok else made:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
    return ExportResult(dest, marker)


def staging_folder(dest: Path) -> Path:
    """Where an export is written before it is swapped into place: beside `dest`, hidden."""
    return dest.absolute().with_name(f".{dest.absolute().name}.export-tmp")


def restore_set_aside(dest: Path, say: Callable[[str], None]) -> None:
    """An export killed between _replace's two renames left the previous export set aside and nothing at
    `dest`: it is put back first (then replaced only with --overwrite, as any export). With `dest` in
    place, the set-aside folder is a finished swap's leftover, removed once the new export is complete."""
    old = set_aside_folder(dest)
    if is_export(old) and not os.path.lexists(dest):
        os.replace(old, dest)
        say(f"restored {dest} from {old.name}, where an export stopped while swapping folders had left it")


def lock_path(dest: Path) -> Path:
    return dest.absolute().with_name(f".{dest.absolute().name}.export-lock")


def lock_destination(dest: Path) -> IO[str]:
    """An exclusive OS lock (flock) on a file beside `dest`, held for the whole export: a second export
    into the same folder is refused in one line naming the first one's pid, and touches nothing. A killed
    export's lock goes with its process."""
    path = lock_path(dest)
    lock = lock_file(
        path,
        create=True,
        busy=lambda pid: (
            f"--to {dest} is being written by another imdb-lora export (pid {pid}); "
            "wait for it to end or choose another folder"
        ),
        unusable=lambda why: f"--to {dest}: cannot create its lock file {path.name} ({why})",
        changing=f"--to {dest}: its lock file keeps changing; is another export starting?",
    )
    if lock is None:  # its folder vanished after export_run made it
        raise UserError(f"--to {dest}: cannot create its lock file {path.name} (its folder is gone)")
    write_pid(lock)
    return lock


def unlock_destination(lock: IO[str], dest: Path) -> None:
    """Remove the lock file, then let go of the lock (an export that opened the old file retries)."""
    lock_path(dest).unlink(missing_ok=True)
    lock.close()


def check_options(fmt: str, quantize: str | None) -> None:
    if fmt not in FORMATS:
        raise UserError(
            f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}{did_you_mean(fmt, FORMATS)}"
        )
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(
            f"--quantize: unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}"
            f"{did_you_mean(quantize, QUANTIZATIONS)}"
        )
    if quantize and fmt != "onnx":
        raise UserError("--quantize int8 needs --format onnx (onnxruntime runs the int8 model)")


def check_destination(src: Path, dest: Path, overwrite: bool) -> None:
    to, run = dest.resolve(), src.resolve()
    if to == run or run in to.parents:
        raise UserError(f"--to {dest}: choose a folder outside the run directory")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to {dest} exists and is not a directory")
    require_creatable(dest, "--to")
    cwd = Path.cwd().resolve()
    if to == cwd or to in cwd.parents:  # empty too: the export's swap would move the current folder away
        raise UserError(f"--to {dest} holds the current directory; refusing to replace it")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise UserError(f"--to {dest} exists and is not empty; pass --overwrite to replace it")
        if not is_export(dest):  # --overwrite must never wipe a folder this tool did not write
            raise UserError(f"--to {dest} is not an imdb-lora export; refusing to replace it")
        # replacing the export would delete what lies inside it
        if to in run.parents:
            raise UserError(f"--to {dest} holds the run directory {src}; refusing to replace it")


def _replace(stage: Path, dest: Path) -> None:
    dest = dest.absolute()
    old = set_aside_folder(dest)
    shutil.rmtree(old, ignore_errors=True)  # a finished swap's leftover: the new export is complete now
    if dest.exists():
        os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


def _write_export(
    clf, src: Path, stage: Path, fmt: str, quantize: str | None, say: Callable[[str], None]
) -> dict[str, Any]:
    run = RunDir(src)
    write_portable_config(run.config_path, stage / "config.yaml")  # without this machine's paths
    write_portable_record(run.status_path, stage / "run.json")
    shutil.copytree(run.tokenizer_dir, stage / "tokenizer")
    # again here: runs trained before the run's tokenizer recorded it still export a usable one
    record_max_length(stage / "tokenizer", clf.config.data.max_length)
    if run.calibration_path.is_file():  # the temperature travels with the weights; Classifier applies it
        shutil.copy2(run.calibration_path, stage / CALIBRATION)
    t0 = time.time()
    # The merged folder is the ONNX exporter's input as well, so it is written in both formats.
    merged = stage / "model"
    say("writing the merged model ...")
    clf.model.save_pretrained(merged)
    marker: dict[str, Any] = {
        "format": fmt,
        "quantize": quantize,
        "source_run": src.resolve().name,
        "temperature": clf.temperature,  # from calibration.json (copied above); 1 if the run has none
    }
    if fmt == "onnx":
        marker.update(export_onnx(merged, stage, quantize, clf.config.model.pooling, say))
        marker["onnx_file"] = ONNX_FILE
        annotate(stage / ONNX_FILE, onnx_metadata(clf))
        # the graph's position table is fixed: loading checks config.yaml's max_length against it
        marker["max_positions"] = position_limit(clf.model.config)
        shutil.rmtree(merged)
    open_to_readers(stage)  # safetensors writes its weights 0600: an export is made to be shared
    marker["files"] = recorded_files(stage, fmt)  # loading compares them: a damaged copy is named
    marker.update(
        imdb_lora_version=__version__,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        export_seconds=round(time.time() - t0, 1),
        size_bytes=sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()),
    )
    (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    say(f"checking the export against the run on {len(PROBE_TEXTS)} texts ...")
    marker["check"] = check_against(clf, stage)
    (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return marker


def onnx_metadata(clf) -> dict[str, str]:
    """What a plain onnxruntime user needs beside the graph, as strings (ONNX metadata holds strings)."""
    data = clf.config.data
    return {
        "id2label": json.dumps({str(i): name for i, name in clf.model.config.id2label.items()}),
        "max_length": str(data.max_length),  # tokens per review, special tokens included
        "truncation": data.truncation,  # head, or head_tail (the first head_tokens and the last ones)
        "head_tokens": str(data.head_tokens),
        "pooling": clf.config.model.pooling,  # already inside the graph; said for the record
        "temperature": repr(float(clf.temperature)),  # probabilities = softmax(logits / temperature)
        "imdb_lora_version": __version__,
    }


def check_against(reference, stage: Path) -> dict[str, Any]:
    """Probabilities of the export vs the run on the probe texts (a quick guard, not the accuracy test)."""
    exported = Classifier.load(str(stage), device="cpu")
    a = reference.logits(PROBE_TEXTS).softmax(-1)
    b = exported.logits(PROBE_TEXTS).softmax(-1)
    return {
        "texts": len(PROBE_TEXTS),
        "labels_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
        "max_abs_prob_diff": float((a - b).abs().max()),
    }
