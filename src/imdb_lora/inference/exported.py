"""Reading an export folder (written by `imdb-lora export`): its marker, config, tokenizer and model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError

MARKER = "imdb_lora_export.json"
FORMATS = ("merged", "onnx")
QUANTIZATIONS = ("int8",)
ONNX_FILE = "model.onnx"


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path}: unreadable {MARKER}; export the run again") from None
    if marker.get("format") not in FORMATS:
        raise UserError(f"{path}: unknown export format {marker.get('format')!r}; export the run again")
    for name in ("config.yaml", "run.json", "tokenizer"):
        if not (path / name).exists():
            raise UserError(f"{path} is an incomplete export (no {name}); export the run again")
    return marker


def load_export(path: str | os.PathLike, device: str = "auto"):
    """(model, tokenizer, device, config, info) of an export folder, for Classifier.load."""
    import torch

    from ..modeling.load import NUM_LABELS, load_base_model, load_tokenizer, resolve_device
    from ..modeling.pooling import set_pooling
    from .onnx_backend import OnnxModel

    root = Path(path).expanduser()
    marker = read_marker(root)
    cfg = Config.load(root / "config.yaml")
    info = json.loads((root / "run.json").read_text())
    info["export"] = marker
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    if marker["format"] == "merged":
        dev = resolve_device(device)
        model, _ = load_base_model(str(root / "model"), NUM_LABELS, False, cfg.train.seed)
        set_pooling(model, cfg.model.pooling)  # the export's config.yaml decides, as for a run
        return model.to(dev), tokenizer, dev, cfg, info
    if device.startswith("cuda"):
        raise UserError(
            f"--device {device}: ONNX exports run on the CPU (onnxruntime); use a merged export on GPUs"
        )
    return OnnxModel(root / marker.get("onnx_file", ONNX_FILE)), tokenizer, torch.device("cpu"), cfg, info
