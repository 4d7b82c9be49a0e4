"""`imdb-lora compare`: LoRA vs full fine-tuning with the same train flags, in one table."""

from __future__ import annotations

import argparse


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
    from ..runs.compare import run_compare

    lrs = {"lora": ns.lora_lr, "full": ns.full_lr}
    print(run_compare(ns.output_dir, ns.extra, lrs, ns.overwrite))
    return 0
