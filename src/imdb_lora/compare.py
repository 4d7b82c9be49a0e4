"""`imdb-lora compare`: LoRA and full fine-tuning on the same data and epochs, measured, in one table.

Each method trains in its own process so that peak memory (GPU or CPU RSS) is that method's alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .report import fmt_bytes, fmt_seconds
from .rundir import RunDir, atomic_write_text


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train LoRA and full fine-tuning with the same settings and write a comparison table",
        description="Any `train` flag after the options below applies to both runs "
        "(e.g. --model, --data, --epochs, --max-length); --lora-lr/--full-lr set each method's rate.",
    )
    p.add_argument("--output-dir", required=True, help="folder for lora/, full/ and comparison.md")
    p.add_argument("--lora-lr", type=float, help="LoRA learning rate (default: the method's default)")
    p.add_argument(
        "--full-lr", type=float, help="full fine-tuning learning rate (default: the method's default)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing runs in --output-dir")
    p.set_defaults(func=cmd_compare, passthrough=True)


def cmd_compare(ns: argparse.Namespace) -> int:
    out = Path(ns.output_dir)
    if any(a in ("--method", "--output-dir", "--resume") for a in ns.extra):
        raise UserError("compare sets --method and --output-dir itself; give the other train flags only")
    rows = []
    for method, lr in (("lora", ns.lora_lr), ("full", ns.full_lr)):
        run = out / method
        args = ["train", "--method", method, "--output-dir", str(run), *ns.extra]
        if lr is not None:
            args += ["--lr", str(lr)]
        if ns.overwrite:
            args.append("--overwrite")
        print(f"== {method}: imdb-lora {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, "-m", "imdb_lora", *args], env=os.environ.copy())
        if code != 0:
            raise UserError(f"the {method} run failed (exit code {code}); see its output above")
        rows.append(RunDir(run).require_finished())
    table = comparison_markdown(rows)
    atomic_write_text(out / "comparison.md", table)
    print(table)
    return 0


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
