"""`imdb-lora evaluate`: accuracy and loss of a finished run (or an export) on a split."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from .common import add_window_flag


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

    from ..data.splits import load_splits, stratified_subset
    from ..inference.classifier import Classifier
    from ..metrics import loss_and_accuracy

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
