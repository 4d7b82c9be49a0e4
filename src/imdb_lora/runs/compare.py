"""LoRA and full fine-tuning on the same data and epochs, measured, in one table (`imdb-lora compare`).

Each method trains in its own process so that peak memory (GPU or CPU RSS) is that method's alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .report import fmt_bytes, fmt_seconds
from .rundir import RunDir, atomic_write_text

METHODS = ("lora", "full")


def run_compare(
    output_dir: str | os.PathLike,
    train_args: list[str],
    lrs: dict[str, float | None] | None = None,
    overwrite: bool = False,
) -> str:
    """Train each method into output_dir/<method> with the same train flags; write comparison.md."""
    out = Path(output_dir)
    if any(a in ("--method", "--output-dir", "--resume") for a in train_args):
        raise UserError("compare sets --method and --output-dir itself; give the other train flags only")
    rows = []
    for method in METHODS:
        run = out / method
        args = ["train", "--method", method, "--output-dir", str(run), *train_args]
        lr = (lrs or {}).get(method)
        if lr is not None:
            args += ["--lr", str(lr)]
        if overwrite:
            args.append("--overwrite")
        print(f"== {method}: imdb-lora {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, "-m", "imdb_lora", *args], env=os.environ.copy())
        if code != 0:
            raise UserError(f"the {method} run failed (exit code {code}); see its output above")
        rows.append(RunDir(run).require_finished())
    table = comparison_markdown(rows)
    atomic_write_text(out / "comparison.md", table)
    return table


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        f"# LoRA vs full fine-tuning: {first['model']}",
        "",
        f"Device: {first['device']} ({first['precision']}); same data, epochs and seed for both; "
        f"train/val/test = {' / '.join(f'{v:,}' for v in first['examples'].values())} reviews. "
        "Test accuracy is that of the checkpoint chosen on validation.",
        "",
        "| Method | Trainable parameters | Trainable % | Val acc | Test acc | Seconds per epoch | Peak memory | Saved size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "LoRA" if r["method"] == "lora" else "Full fine-tuning"
        test = f"{100 * r['test_accuracy']:.2f}%" if r.get("test_accuracy") is not None else "–"
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {r['trainable_percent']:.2f}% | "
            f"{100 * r['val_accuracy']:.2f}% | {test} | {fmt_seconds(r['train_seconds'] / max(1, r['epochs_done']))} | "
            f"{fmt_bytes(r['peak_memory_bytes'])} ({r['peak_memory_kind']}) | {fmt_bytes(r['weights_bytes'])} |"
        )
    return "\n".join(lines) + "\n"
