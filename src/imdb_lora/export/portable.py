"""An export travels to other machines, so the config.yaml and run.json it carries name their sources
without this machine's paths: a local model folder or data file by its own name (hub ids, URLs and
sha256 sums as they are), a local IMDB copy not at all. The run directory itself keeps the absolute
paths it works from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config


def portable_name(value: str | None) -> str | None:
    """An absolute local path as its last component; anything else (hub id, URL, None) unchanged."""
    if not value or "://" in value or not Path(value).is_absolute():
        return value
    return Path(value).name


def write_portable_config(src: Path, dest: Path) -> None:
    cfg = Config.load(src, flag=None)
    cfg.model.name = portable_name(cfg.model.name)
    d = cfg.data
    # IMDB is IMDB on any machine: an export evaluates on the user's own copy ($IMDB_LORA_DATA, else
    # the download); labeled files keep their names, so a missing one is reported by name.
    d.path = d.path if portable_name(d.path) == d.path else None
    d.train_file, d.test_file = portable_name(d.train_file), portable_name(d.test_file)
    cfg.save(dest)


def write_portable_record(src: Path, dest: Path) -> None:
    info: dict[str, Any] = json.loads(src.read_text(encoding="utf-8"))
    info["model"] = portable_name(info.get("model"))
    source = info.get("data_source") or {}
    if "path" in source:
        source["path"] = portable_name(source["path"])
    if "files" in source:
        source["files"] = {portable_name(k): v for k, v in source["files"].items()}
    dest.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
