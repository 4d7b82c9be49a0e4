"""`imdb-lora export`: a merged folder or ONNX (optionally int8) of a finished run."""

from __future__ import annotations

import argparse
import sys

from ..extras import require
from ..inference.exported import FORMATS
from .common import add_base_model_flag, path_arg, require_directories


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="fold LoRA into the base (merged) or export to ONNX (optionally int8)")
    p.add_argument("run", type=path_arg, help="finished run directory")
    p.add_argument("--to", required=True, type=path_arg, metavar="DIR", help="export folder to create")
    p.add_argument("--format", default="merged", help=f"{' or '.join(FORMATS)} [default: merged]")
    p.add_argument("--quantize", help="int8: dynamic int8 quantization of the ONNX model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    add_base_model_flag(p)
    p.set_defaults(func=cmd_export)


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.format == "onnx":
        require("onnx", "export --format onnx")
    require_directories(ns.run)
    from ..export.exporter import check_options, export_run

    check_options(ns.format, ns.quantize)  # before loading anything: a typo fails at once
    result = export_run(ns.run, ns.to, ns.format, ns.quantize, ns.overwrite, ns.base_model, progress=_say)
    print(result.summary())
    return 0


def _say(step: str) -> None:
    """Each slow step as it starts, on stderr (stdout keeps the one summary line)."""
    print(step, file=sys.stderr, flush=True)
