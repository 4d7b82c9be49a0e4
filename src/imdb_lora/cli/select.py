"""`imdb-lora select`: choose among finished runs and window strides on validation, then test once."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_batch_size_flag, add_data_flag, add_device_flag, path_arg, require_directories


def add_select_parser(sub) -> None:
    p = sub.add_parser(
        "select",
        help="choose the best (run, window stride) on validation, then evaluate test once",
        description="Every run is read with every window stride on the validation split the runs share; "
        "the best validation accuracy wins (ties: the earlier run, then the earlier stride). Only then is "
        "test read: once for the winner and once for the first run as trained (the control).",
    )
    p.add_argument(
        "runs", nargs="+", type=path_arg, help="finished run directories (the first is the control)"
    )
    p.add_argument(
        "--window-strides",
        default="0",
        metavar="TOKENS,...",
        help="window strides to try (0: one truncated window, as in training) [default: 0]",
    )
    add_data_flag(p, "the runs' own data setting")
    p.add_argument("--max-samples", type=int, help="stratified, seeded subset of each split (quick checks)")
    add_batch_size_flag(p, 64, token_capped=False)
    add_device_flag(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (the lines of each split read and of the winner go to stderr)",
    )
    p.set_defaults(func=cmd_select)


def cmd_select(ns: argparse.Namespace) -> int:
    from ..errors import UserError

    if ns.max_samples is not None and ns.max_samples < 2:
        raise UserError("--max-samples must be >= 2")
    require_directories(*ns.runs)
    from ..inference.selection import parse_strides, select

    out = sys.stderr if ns.json else sys.stdout  # --json: standard output is the JSON alone (`| jq`)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    result = select(
        ns.runs, parse_strides(ns.window_strides), ns.data, ns.max_samples, ns.batch_size, ns.device, log=say
    )
    c = result["chosen"]
    say(
        f"chosen on validation: {c['run']} window_stride={c['window_stride']} ({100 * c['val_accuracy']:.2f}%)"
    )
    if ns.json:
        print(json.dumps(result))
    return 0
