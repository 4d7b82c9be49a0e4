"""Command line: `imdb-lora train|evaluate|predict ...` (also `python -m imdb_lora`).

Every config field is a `train` flag, generated from the dataclasses in config.py, so the CLI, the YAML
files and the saved config.yaml can never drift apart. User mistakes end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .bench import add_bench_parser
from .compare import add_compare_parser
from .config import Config, coerce, flag_of, section_fields
from .errors import UserError
from .export import add_export_parser
from .serve import add_serve_parser

# ---------------------------------------------------------------- train


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
        else:
            g.add_argument(flag_of(f), metavar=f.name.upper(), **kw)


def _default_text(f) -> str:
    if f.default_factory is not dataclasses.MISSING:  # lists
        return ",".join(f.default_factory())
    return str(f.default).replace("%", "%%")


def config_from_args(ns: argparse.Namespace, base: Config) -> Config:
    for sec, cls, f in section_fields():
        key = f"{sec}.{f.name}"
        if key in vars(ns):
            setattr(getattr(base, sec), f.name, coerce(vars(ns)[key], cls, f, flag_of(f)))
    return base


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on IMDB (or labeled files) into a run directory")
    p.add_argument("--config", help="YAML file with model/lora/data/train sections; flags override it")
    p.add_argument("--output-dir", help="run directory to create (default: runs/<model>-<method>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    from .train import Trainer

    if ns.resume:
        if not ns.output_dir:
            raise UserError("--resume needs --output-dir (the run to continue)")
        saved = Path(ns.output_dir) / "config.yaml"
        base = Config.load(saved) if saved.is_file() else Config()
    else:
        base = Config.load(ns.config) if ns.config else Config()
    cfg = config_from_args(ns, base).validate()
    out = ns.output_dir or os.path.join("runs", f"{Path(cfg.model.name).name}-{cfg.train.method}")
    summary = Trainer(cfg, out, overwrite=ns.overwrite, resume=ns.resume).setup().train()
    test = summary.get("test_accuracy")
    print(
        f"done: {out} | best epoch {summary['best_epoch']} | val acc {100 * summary['val_accuracy']:.2f}%"
        + (f" | test acc {100 * test:.2f}%" if test is not None else "")
        + f" | trainable {summary['trainable_parameters']:,} of {summary['total_parameters']:,}"
    )
    return 0


# ---------------------------------------------------------------- evaluate


def add_window_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window-stride",
        type=int,
        metavar="TOKENS",
        help="read long reviews as overlapping max-length windows starting every TOKENS tokens and "
        "average their probabilities (default: one truncated window, as in training)",
    )


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and loss of a finished run on the test or validation split")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="IMDB folder/archive (default: the run's own data setting)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--max-samples", type=int, help="stratified, seeded subset of the split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-model", help="base model folder, if it moved since training")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_window_flag(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(ns: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from .data import load_splits, stratified_subset
    from .predict import Classifier
    from .train import loss_and_accuracy

    if ns.max_samples is not None and ns.max_samples < 2:
        raise UserError("--max-samples must be >= 2")
    clf = Classifier.load(ns.run, device=ns.device, base_model=ns.base_model)
    data_cfg = clf.config.data
    if ns.data:
        data_cfg.path, data_cfg.train_file, data_cfg.test_file = ns.data, None, None
    data_cfg.max_eval_samples = None
    splits = load_splits(data_cfg, clf.config.train.seed)
    part = splits.test if ns.split == "test" else splits.val
    part = part.take(stratified_subset(part.labels, ns.max_samples, clf.config.train.seed))
    t0 = time.time()
    with tqdm(total=len(part), desc=f"evaluate {ns.split}", unit="review", leave=False) as bar:
        logits = clf.logits(part.texts, ns.batch_size, bar, window_stride=ns.window_stride)
    loss, acc = loss_and_accuracy(logits, part.labels)
    result = {
        "run": ns.run,
        "split": ns.split,
        "examples": len(part),
        "accuracy": acc,
        "loss": loss,
        "window_stride": ns.window_stride,
        "seconds": time.time() - t0,
        "random_init": clf.info.get("random_init", False),
    }
    if ns.json:
        print(json.dumps(result))
    else:
        warn = "  (RANDOM-INIT run: accuracy is meaningless)" if result["random_init"] else ""
        print(
            f"{ns.split}: accuracy {100 * acc:.2f}% | loss {loss:.4f} | {len(part):,} reviews | {result['seconds']:.1f}s{warn}"
        )
    return 0


# ---------------------------------------------------------------- predict


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="sentiment of texts given as arguments, in a file, or on stdin")
    p.add_argument("run", help="run directory")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", help="one text per line, or JSONL/CSV with a 'text' column")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-model", help="base model folder, if it moved since training")
    add_window_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(ns: argparse.Namespace) -> int:
    from .predict import Classifier, check_texts, read_texts

    if ns.texts and ns.file:
        raise UserError("give texts as arguments or --file, not both")
    texts = ns.texts or read_texts(ns.file, None if ns.file else sys.stdin.read())
    if not texts:
        raise UserError("no text to classify: pass texts, --file F, or lines on stdin")
    check_texts(texts)
    clf = Classifier.load(ns.run, device=ns.device, base_model=ns.base_model)
    preds = clf.predict(texts, ns.batch_size, window_stride=ns.window_stride)
    if ns.json:
        print("\n".join(json.dumps(p.to_dict()) for p in preds))
    else:
        print("\n\n".join(p.to_text() for p in preds))
    return 0


# ---------------------------------------------------------------- entry point

PARSERS: list[Callable] = [
    add_train_parser,
    add_evaluate_parser,
    add_predict_parser,
    add_compare_parser,
    add_export_parser,
    add_serve_parser,
    add_bench_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="imdb-lora", description="IMDB sentiment analysis by LoRA fine-tuning")
    p.add_argument("--version", action="version", version=f"imdb-lora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # transformers' own deprecation notices (e.g. is_gradient_checkpointing) are not the user's to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    parser = build_parser()
    try:
        ns, extra = parser.parse_known_args(argv)
        if getattr(ns, "passthrough", False):  # compare hands the remaining flags to train
            ns.extra = extra
        elif extra and getattr(ns, "texts", None) is not None and not any(e.startswith("-") for e in extra):
            ns.texts += extra  # texts after options: `predict RUN --json "text"`
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns.func(ns)
    except SystemExit as e:  # argparse usage errors (code 2) and --help (code 0)
        return int(e.code or 0)
    except UserError as e:
        print(f"imdb-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nimdb-lora: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
