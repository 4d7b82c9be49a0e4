"""Export a finished run: stage, write, check against the run, then swap into place atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from ..inference.classifier import Classifier
from ..inference.exported import (
    FORMATS,
    MARKER,
    ONNX_FILE,
    QUANTIZATIONS,
    is_export,
    recorded_files,
)
from ..modeling.load import position_limit
from ..runs.rundir import CALIBRATION, RunDir, require_creatable
from .onnx import export_onnx
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
) -> ExportResult:
    """Write an export of a finished run into `to`, atomically (a failed export leaves nothing behind)."""
    check_options(fmt, quantize)
    dest = Path(to).expanduser()
    src = Path(run).expanduser()
    if is_export(src):
        raise UserError(f"{run} is already an export; export from the run directory")
    check_destination(src, dest, overwrite)
    clf = Classifier.load(run, device="cpu", base_model=base_model, merge=True)
    stage = dest.with_name(f".{dest.name}.export-tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--to {dest}: cannot create a folder there ({e.strerror})") from None
    try:
        marker = _write_export(clf, src, stage, fmt, quantize)
        _replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(dest, marker)


def check_options(fmt: str, quantize: str | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(
            f"--quantize: unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}"
        )
    if quantize and fmt != "onnx":
        raise UserError("--quantize int8 needs --format onnx (onnxruntime runs the int8 model)")


def check_destination(src: Path, dest: Path, overwrite: bool) -> None:
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise UserError(f"--to {dest}: choose a folder outside the run directory")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to {dest} exists and is not a directory")
    require_creatable(dest, "--to")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise UserError(f"--to {dest} exists and is not empty; pass --overwrite to replace it")
        if not is_export(dest):  # --overwrite must never wipe a folder this tool did not write
            raise UserError(f"--to {dest} is not an imdb-lora export; refusing to replace it")


def _replace(stage: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.export-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


def _write_export(clf, src: Path, stage: Path, fmt: str, quantize: str | None) -> dict[str, Any]:
    run = RunDir(src)
    write_portable_config(run.config_path, stage / "config.yaml")  # without this machine's paths
    write_portable_record(run.status_path, stage / "run.json")
    shutil.copytree(run.tokenizer_dir, stage / "tokenizer")
    if run.calibration_path.is_file():  # the temperature travels with the weights; Classifier applies it
        shutil.copy2(run.calibration_path, stage / CALIBRATION)
    t0 = time.time()
    # The merged folder is the ONNX exporter's input as well, so it is written in both formats.
    merged = stage / "model"
    clf.model.save_pretrained(merged)
    marker: dict[str, Any] = {
        "format": fmt,
        "quantize": quantize,
        "source_run": src.resolve().name,
        "temperature": clf.temperature,  # from calibration.json (copied above); 1 if the run has none
    }
    if fmt == "onnx":
        marker.update(export_onnx(merged, stage, quantize, clf.config.model.pooling))
        marker["onnx_file"] = ONNX_FILE
        # the graph's position table is fixed: loading checks config.yaml's max_length against it
        marker["max_positions"] = position_limit(clf.model.config)
        shutil.rmtree(merged)
    marker["files"] = recorded_files(stage, fmt)  # loading compares them: a damaged copy is named
    marker.update(
        imdb_lora_version=__version__,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        export_seconds=round(time.time() - t0, 1),
        size_bytes=sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()),
    )
    (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    marker["check"] = check_against(clf, stage)
    (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


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
