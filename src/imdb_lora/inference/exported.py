"""Reading an export folder (written by `imdb-lora export`): its marker, config, tokenizer and model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError
from ..runs.rundir import CALIBRATION, read_json_object

MARKER = "imdb_lora_export.json"
FORMATS = ("merged", "onnx")
QUANTIZATIONS = ("int8",)
ONNX_FILE = "model.onnx"


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MARKER).is_file()


def set_aside_folder(dest: str | os.PathLike) -> Path:
    """Where an export being replaced waits, hidden beside it, while the new one is moved into its place."""
    dest = Path(dest).expanduser().absolute()
    return dest.with_name(f".{dest.name}.export-old")


def missing_folder(path: str | os.PathLike) -> str:
    """The one-line "no such run directory", and where the export is if one into `path` was stopped
    between its two renames (its previous export set aside, the new one not yet moved in)."""
    old = set_aside_folder(path)
    if is_export(old):
        return (
            f"no such run directory: {path} (an export into it was stopped while swapping folders; its "
            f"previous export is in {old.name}: the next `imdb-lora export --to {path}` puts it back)"
        )
    return f"no such run directory: {path}"


def read_marker(path: Path) -> dict[str, Any]:
    """The export's marker, once the folder is known to hold everything it names."""
    try:
        marker = read_json_object(path / MARKER)
    except UserError:
        raise UserError(f"{path}: unreadable {MARKER}; export the run again") from None
    fmt = marker.get("format")
    if fmt not in FORMATS:
        raise UserError(f"{path}: unknown export format {fmt!r}; export the run again")
    onnx_file = marker.get("onnx_file", ONNX_FILE)
    if not isinstance(onnx_file, str) or Path(onnx_file).name != onnx_file or onnx_file in ("", ".", ".."):
        # a plain file name inside the export: the marker never points elsewhere on the machine
        raise UserError(f"{path}: {MARKER} names an invalid onnx_file {onnx_file!r}; export the run again")
    model = ["model", "model/config.json"] if fmt == "merged" else [onnx_file]
    needed = ["config.yaml", "run.json", "tokenizer", *model]
    if _temperature(marker) != 1.0:  # the export was calibrated: its probabilities need the file
        needed.append(CALIBRATION)
    for name in needed:
        if not (path / name).exists():
            raise UserError(f"{path} is an incomplete export (no {name}); export the run again")
    weights = ("model/model.safetensors", "model/model.safetensors.index.json")  # one file, or shards
    if fmt == "merged" and not any((path / name).is_file() for name in weights):
        raise UserError(f"{path} is an incomplete export (no {weights[0]}); export the run again")
    return marker


def _temperature(marker: dict[str, Any]) -> float:
    try:
        return float(marker.get("temperature", 1.0))
    except (TypeError, ValueError, OverflowError):
        return float("nan")  # not 1: calibration.json is then required, and read_calibration judges it


def recorded_files(root: Path, fmt: str, onnx_file: str = ONNX_FILE) -> dict[str, str]:
    """sha256 of every file the predictions come from (weights or graph, model config, tokenizer), by
    path inside the export. config.yaml, run.json and calibration.json are judged by what they hold."""
    from ..data.imdb import file_sha256

    tops = ["model" if fmt == "merged" else onnx_file, "tokenizer"]
    files = [f for top in tops for f in ([root / top] if (root / top).is_file() else (root / top).rglob("*"))]
    return {f.relative_to(root).as_posix(): file_sha256(f) for f in sorted(files) if f.is_file()}


def check_files(root: Path, marker: dict[str, Any]) -> None:
    """Every file the marker records is there, as exported: a truncated copy, or a model.onnx or weights
    file taken from another export, ends in one line naming the file, before anything loads it."""
    from ..data.imdb import file_sha256

    recorded = marker.get("files")
    if recorded is None:  # an export made before the record existed: nothing to compare with
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise UserError(f"{root}: {MARKER} holds an invalid files record; export the run again")
    for name in recorded:
        if Path(name).is_absolute() or ".." in Path(name).parts:  # never a file outside the export
            raise UserError(
                f"{root}: {MARKER} names a file outside the export ({name!r}); export the run again"
            )
    for name, digest in recorded.items():
        if not (root / name).is_file():
            raise UserError(f"{root} is an incomplete export (no {name}); export the run again")
        if file_sha256(root / name) != digest:
            raise UserError(
                f"{root / name} is not the file that was exported (sha256 differs: damaged, edited or "
                "replaced); export the run again"
            )


def load_export(path: str | os.PathLike, device: str = "auto"):
    """(model, tokenizer, device, config, info) of an export folder, for Classifier.load."""
    import torch

    from ..modeling.load import (
        NUM_LABELS,
        check_saved_max_length,
        load_base_model,
        load_tokenizer,
        position_limit,
        resolve_device,
    )
    from ..modeling.pooling import set_pooling
    from .onnx_backend import OnnxModel

    root = Path(path).expanduser()
    marker = read_marker(root)
    check_files(root, marker)
    cfg = Config.load_saved(root / "config.yaml")
    info = read_json_object(root / "run.json")
    info["export"] = marker
    tokenizer = load_tokenizer(str(root / "tokenizer"), folder=True)
    if marker["format"] == "merged":
        dev = resolve_device(device)
        model, _ = load_base_model(str(root / "model"), NUM_LABELS, False, cfg.train.seed, flag=None)
        check_saved_max_length(cfg.data.max_length, position_limit(model.config), root / "config.yaml")
        set_pooling(model, cfg.model.pooling)  # the export's config.yaml decides, as for a run
        return model.to(dev), tokenizer, dev, cfg, info
    if device.startswith("cuda"):
        raise UserError(
            f"--device {device}: ONNX exports run on the CPU (onnxruntime); use a merged export on GPUs"
        )
    limit = marker.get("max_positions")  # recorded by exports made since it existed
    check_saved_max_length(
        cfg.data.max_length, limit if isinstance(limit, int) else None, root / "config.yaml"
    )
    return OnnxModel(root / marker.get("onnx_file", ONNX_FILE)), tokenizer, torch.device("cpu"), cfg, info
