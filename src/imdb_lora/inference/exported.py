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
    needed = ["config.yaml", "run.json", "tokenizer", "model" if fmt == "merged" else onnx_file]
    if _temperature(marker) != 1.0:  # the export was calibrated: its probabilities need the file
        needed.append(CALIBRATION)
    for name in needed:
        if not (path / name).exists():
            raise UserError(f"{path} is an incomplete export (no {name}); export the run again")
    return marker


def _temperature(marker: dict[str, Any]) -> float:
    try:
        return float(marker.get("temperature", 1.0))
    except (TypeError, ValueError, OverflowError):
        return float("nan")  # not 1: calibration.json is then required, and read_calibration judges it


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
    cfg = Config.load_saved(root / "config.yaml")
    info = read_json_object(root / "run.json")
    info["export"] = marker
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    if marker["format"] == "merged":
        dev = resolve_device(device)
        model, _ = load_base_model(str(root / "model"), NUM_LABELS, False, cfg.train.seed)
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
