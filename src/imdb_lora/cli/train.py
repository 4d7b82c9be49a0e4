"""`imdb-lora train`: every config field as a flag, a YAML file under them, one run directory out."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..config import (
    COMPARE_ARM_ENV,
    COMPARE_LR_ENV,
    Config,
    Given,
    coerce,
    flag_of,
    refuse_file_clashes,
    section_fields,
    shipped_configs,
)
from ..errors import UserError
from .common import nonempty_path


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are suppressed so only flags the user typed override YAML."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for sec, _cls, f in section_fields():
        g = groups.setdefault(sec, p.add_argument_group(f"{sec} options"))
        kw = dict(
            dest=f"{sec}.{f.name}",
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} [default: {_default_text(f)}]",
        )
        if f.type in ("bool", bool):
            g.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **kw)
        elif f.metadata.get("repeatable"):
            g.add_argument(flag_of(f), action="append", metavar="FILE", **kw)
        else:
            g.add_argument(flag_of(f), metavar=f.metadata.get("metavar") or f.name.upper(), **kw)


def _default_text(f) -> str:
    """The default as the help shows it: on/off, none, a list with commas (never Python's None/True)."""
    if f.metadata.get("shown"):
        text = f.metadata["shown"]
    elif f.default_factory is not dataclasses.MISSING:  # lists
        text = ",".join(f.default_factory()) or "none"
    elif isinstance(f.default, bool):
        text = "on" if f.default else "off"
    else:
        text = "none" if f.default is None else str(f.default)
    return text.replace("%", "%%")


def given_settings(ns: argparse.Namespace, in_file: frozenset[str] = frozenset()) -> Given:
    """What the command line typed and what its --config file set (`in_file`), for the notes that name them.
    In a compare arm given the user's --lora-lr or --full-lr as --lr, the rate is named by that flag."""
    renamed = os.environ.get(COMPARE_LR_ENV) if os.environ.get(COMPARE_ARM_ENV) else None
    return Given(typed_settings(ns), ns.config, in_file, (("train.lr", renamed),) if renamed else ())


def typed_settings(ns: argparse.Namespace) -> frozenset[str]:
    """The config keys (`data.head_tokens`) a flag on the command line set: defaults are suppressed, so
    only a typed flag leaves its key in the namespace."""
    typed = {f"{sec}.{f.name}" for sec, _, f in section_fields() if f"{sec}.{f.name}" in vars(ns)}
    if os.environ.get(COMPARE_ARM_ENV) == "full":  # compare's full arm: its --lora-* were the LoRA arm's
        typed = {key for key in typed if not key.startswith("lora.")}
    return frozenset(typed)


def config_from_args(ns: argparse.Namespace, base: Config) -> Config:
    for sec, cls, f in section_fields():
        key = f"{sec}.{f.name}"
        if key in vars(ns):
            setattr(getattr(base, sec), f.name, coerce(vars(ns)[key], cls, f, flag_of(f)))
    return base


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on IMDB (or labeled files) into a run directory")
    p.add_argument(
        "--config",
        type=nonempty_path,
        help="YAML file with model/lora/data/train sections, or the name of a shipped one "
        f"({', '.join(shipped_configs())}); flags override it",
    )
    p.add_argument(
        "--output-dir",
        type=nonempty_path,
        metavar="DIR",
        help="run directory to create [default: runs/<model>-<method>]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _ended_by(summary: dict) -> str:
    """The done line's note when a budget, not the epochs, ended training."""
    from ..runs.report import budget_cut

    cut = budget_cut(summary)
    return f" | stopped by {cut}" if cut else ""


def cmd_train(ns: argparse.Namespace) -> int:
    from ..training.timing import breakdown_line
    from ..training.trainer import Trainer

    if ns.resume and not ns.output_dir:
        raise UserError("--resume needs --output-dir (the run to continue)")
    saved = Path(ns.output_dir or "") / "config.yaml"
    in_file: frozenset[str] = frozenset()
    if ns.config:  # under --resume too, so a YAML that changed since the run started is caught
        base, in_file = Config.load_with_keys(ns.config)
    elif ns.resume and saved.is_file():  # flags alone: the run's own settings, changed only where given
        base = Config.load(saved, flag="--resume")
    else:
        base = Config()
    given = given_settings(ns, in_file)  # refusals and notes name a file's setting by its key
    cfg = config_from_args(ns, base).validate(given)
    before = Config.load(saved, flag="--resume") if ns.resume and saved.is_file() else None
    notes = refuse_file_clashes(cfg, before, given)
    out = ns.output_dir or os.path.join("runs", f"{Path(cfg.model.name).name}-{cfg.train.method}")
    trainer = Trainer(
        cfg,
        out,
        overwrite=ns.overwrite,
        resume=ns.resume,
        started=getattr(ns, "started", None),
        given=given,
    )
    for note in notes if trainer.dist.main else []:  # under torchrun, rank 0 says it for all
        print(note, file=sys.stderr, flush=True)
    summary = trainer.fit()
    if not trainer.dist.main:
        return 0  # under torchrun, rank 0 reports for all
    test = summary.get("test_accuracy")
    print(
        f"done: {out} | best epoch {summary['best_epoch']} | val acc {100 * summary['val_accuracy']:.2f}%"
        + (f" | test acc {100 * test:.2f}%" if test is not None else "")
        + f" | trainable {summary['trainable_parameters']:,} of {summary['total_parameters']:,}"
        + _ended_by(summary)
    )
    print(breakdown_line(summary["time_breakdown"]))  # where the wall time went (run.json: time_breakdown)
    return 0
