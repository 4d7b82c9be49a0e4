"""Labeled CSV/TSV/JSONL files, and plain text inputs for prediction."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import UserError
from .labeled import LabeledTexts


def load_labeled_file(path: str | os.PathLike, flag: str = "--train-file") -> LabeledTexts:
    """CSV, TSV or JSONL with `text` and `label` columns; labels must be 0 or 1."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag}: no such file: {p}")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {p} is not UTF-8") from None
    rows: list[dict] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{flag}: {p} line {n} is not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{flag}: {p} line {n} is not a JSON object")
                rows.append(obj)
    else:
        delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
        rows = list(csv.DictReader(io.StringIO(content), delimiter=delimiter))
    if not rows:
        raise UserError(f"{flag}: {p} has no rows")
    missing = [c for c in ("text", "label") if c not in rows[0]]
    if missing:
        raise UserError(f"{flag}: {p} lacks column(s) {missing}; it needs 'text' and 'label'")
    texts, labels = [], []
    for n, row in enumerate(rows, 1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{flag}: {p} row {n} has an empty or missing text")
        try:
            y = int(str(label).strip())
        except ValueError:
            y = -1
        if y not in (0, 1):
            raise UserError(
                f"{flag}: {p} row {n} has label {label!r}; labels must be 0 (negative) or 1 (positive)"
            )
        texts.append(text)
        labels.append(y)
    return LabeledTexts(texts, labels)


def read_texts(file: str | None, stdin_text: str | None) -> list[str]:
    """Texts from --file (one per line, or JSONL/CSV with a `text` column) or from stdin lines."""
    if file is None:
        return [line for line in (stdin_text or "").splitlines() if line.strip()]
    p = Path(file).expanduser()
    if not p.is_file():
        raise UserError(f"--file: no such file: {p}")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--file: {p} is not UTF-8") from None
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"--file: {p} line {n} is not JSON") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"--file: {p} line {n} has no 'text' string")
                texts.append(obj["text"])
        return texts
    if suffix in (".csv", ".tsv"):
        import csv
        import io

        reader = csv.DictReader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",")
        if "text" not in (reader.fieldnames or []):
            raise UserError(f"--file: {p} has no 'text' column")
        return [row["text"] for row in reader]
    return [line for line in content.splitlines() if line.strip()]
