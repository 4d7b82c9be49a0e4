"""`imdb-lora compare`: LoRA vs full fine-tuning with the same train flags, in one table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import NoReturn

from ..config import Config, Given, refuse_file_clashes
from ..errors import UserError
from .common import closest_flag, learning_rate, nonempty_path
from .train import add_config_flags, config_from_args, given_settings


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        usage="%(prog)s --output-dir DIR [--lora-lr LR] [--full-lr LR] [--overwrite] [--resume] [train flags ...]",
        help="train LoRA and full fine-tuning with the same settings and write a comparison table",
        description="Any `train` flag after the options below applies to both runs "
        "(e.g. --model, --data, --epochs, --max-length); --lora-lr/--full-lr set each method's rate.",
    )
    p.add_argument(
        "--output-dir",
        required=True,
        type=nonempty_path,
        metavar="DIR",
        help="folder for lora/, full/ and comparison.md",
    )
    p.add_argument(
        "--lora-lr", type=learning_rate, metavar="LR", help="LoRA learning rate [default: 4e-4, as train's]"
    )
    p.add_argument(
        "--full-lr",
        type=learning_rate,
        metavar="LR",
        help="full fine-tuning learning rate [default: 2e-5, as train's]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing runs in --output-dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs in --output-dir that finished (with the same settings) and continue interrupted ones",
    )
    p.set_defaults(func=cmd_compare, passthrough=True)


def method_configs(train_args: list[str], lrs: dict[str, float | None]) -> dict[str, Config]:
    """The settings each method's `train` would run with, parsed here so that a mistyped flag or value
    fails at once rather than after the first method has trained."""
    return {method: cfg for method, (cfg, _) in method_settings(train_args, lrs).items()}


def method_settings(train_args: list[str], lrs: dict[str, float | None]) -> dict[str, tuple[Config, Given]]:
    """method_configs, each with where its settings came from (config.Given), to name them by."""
    p = argparse.ArgumentParser(prog="imdb-lora compare", add_help=False, allow_abbrev=False)
    p.add_argument("--config")
    add_config_flags(p)
    p.error = lambda message: _refuse(message + closest_flag(message, p._option_string_actions))
    ns = p.parse_args(train_args)
    settings = {}
    for method, lr in lrs.items():
        base, in_file = Config.load_with_keys(ns.config) if ns.config else (Config(), frozenset())
        cfg = config_from_args(ns, base)
        cfg.train.method, cfg.train.lr = method, lr if lr is not None else cfg.train.lr
        # named as the method's `train` names them: it is given --method, and --lr where one is set here,
        # which a refusal names as the user typed it (--lora-lr, --full-lr)
        given = given_settings(ns, in_file)
        given = dataclasses.replace(
            given,
            typed=given.typed | {"train.method"} | ({"train.lr"} if lr is not None else set()),
            flags=(("train.lr", f"--{method}-lr"),) if lr is not None else (),
        )
        settings[method] = (cfg.validate(given), given)
    return settings


def _refuse(message: str) -> NoReturn:
    raise UserError(f"train flags: {message}")


def cmd_compare(ns: argparse.Namespace) -> int:
    from ..runs.compare import check_train_args, run_compare

    lrs = {"lora": ns.lora_lr, "full": ns.full_lr}
    check_train_args(ns.extra)  # before parsing them: --method is a train flag too
    settings = method_settings(ns.extra, lrs)
    configs = {method: cfg for method, (cfg, _) in settings.items()}
    for method, (cfg, given) in settings.items():  # now, not when its train starts: a second line after
        refuse_file_clashes(cfg, _started(ns, method), given)  # a kept clash's note: its train says it
    print(run_compare(ns.output_dir, ns.extra, lrs, ns.overwrite, ns.resume, configs))
    return 0


def _started(ns: argparse.Namespace, method: str) -> Config | None:
    """Under --resume, the settings the method's sub-run was started with: a clash it was started with
    is kept (its train says so), as `train --resume` keeps it. None where there is no such run yet, or
    its config.yaml does not load (then its train, or the plan, says why)."""
    saved = Path(ns.output_dir) / method / "config.yaml"
    if not ns.resume or not saved.is_file():
        return None
    try:
        return Config.load(saved, flag="--resume")
    except UserError:
        return None
