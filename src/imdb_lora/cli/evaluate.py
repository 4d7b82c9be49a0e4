"""`imdb-lora evaluate`: accuracy, loss and calibration of a finished run (or an export) on a split of
its data, or on labeled files of your own (`--file`, repeatable)."""

from __future__ import annotations

import argparse
import array
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError, cannot_write, counted, make_room, write_failure
from ..runs.rundir import atomic_write_text, require_creatable
from .chunks import chunks
from .common import (
    add_base_model_flag,
    add_batch_size_flag,
    add_data_flag,
    add_device_flag,
    add_raw_flag,
    add_window_flag,
    path_arg,
    positive_int,
    require_directories,
)

if TYPE_CHECKING:
    import torch


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy, loss and calibration of a finished run on a split or on labeled files"
    )
    p.add_argument("run", type=path_arg, help="run directory or export folder")
    add_data_flag(p, "the run's own data setting")
    p.add_argument("--split", choices=["test", "val"], help="split of the run's data [default: test]")
    p.add_argument("--max-samples", type=int, help="stratified, seeded subset of the split")
    p.add_argument(
        "--file",
        action="append",
        dest="files",
        type=path_arg,
        metavar="FILE",
        help="labeled CSV/TSV/JSONL to evaluate instead of a split (repeatable); labels 0/1, "
        "negative/positive or neg/pos, any case",
    )
    p.add_argument("--text-column", default="text", help="--file: column of the text [default: text]")
    p.add_argument("--label-column", default="label", help="--file: column of the label [default: label]")
    p.add_argument(
        "--errors",
        type=positive_int,
        metavar="N",
        help="--file: write the N most confident mistakes of each file to <errors-dir>/<file name>.errors.jsonl",
    )
    p.add_argument(
        "--errors-dir", type=path_arg, default=".", help="folder for the --errors files [default: .]"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing --errors files")
    add_batch_size_flag(p, 64, token_capped=False)
    add_device_flag(p)
    add_base_model_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (one per --file)")
    add_raw_flag(p)
    add_window_flag(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(ns: argparse.Namespace) -> int:
    if ns.max_samples is not None and ns.max_samples < 2:
        raise UserError("--max-samples must be >= 2")
    if ns.files:
        for flag, given in (("--data", ns.data), ("--split", ns.split), ("--max-samples", ns.max_samples)):
            if given is not None:
                raise UserError(f"{flag} selects a split of the run's data; it does not apply to --file")
    elif ns.errors or ns.text_column != "text" or ns.label_column != "label":
        raise UserError("--errors, --text-column and --label-column need --file")
    if ns.errors_dir != "." and not ns.errors:  # else ignored: no errors file was written anywhere
        raise UserError("--errors-dir needs --errors N (the mistakes to write there)")
    require_directories(ns.run)
    from ..inference.classifier import check_window_stride_of

    check_window_stride_of(ns.run, ns.window_stride)
    if ns.files:
        return _evaluate_files(ns)
    return _evaluate_split(ns)


def _load(ns: argparse.Namespace):
    from ..inference.classifier import Classifier

    clf = Classifier.load(ns.run, device=ns.device, base_model=ns.base_model, raw=ns.raw)
    if not ns.json:
        print(f"probabilities: {clf.calibration_note}")
    return clf


def _logits(clf, texts: list[str], ns: argparse.Namespace, desc: str):
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), desc=desc, unit="review", leave=False) as bar:
        return clf.logits(texts, ns.batch_size, bar, window_stride=ns.window_stride)


def json_stride(ns: argparse.Namespace) -> int:
    """--window-stride as the JSON gives it: one truncated window is 0, as the flag, its help and select's
    JSON say it (the parsed flag holds None for it, which the JSON printed as null)."""
    from ..data.tokenize import recorded_stride

    return recorded_stride(ns.window_stride)


def _evaluate_split(ns: argparse.Namespace) -> int:
    import time

    from ..calibration import figures
    from ..inference.selection import split_of

    split = ns.split or "test"
    clf = _load(ns)
    part = split_of(clf, split, ns.max_samples, ns.data, file_flag=True)
    t0 = time.time()
    logits = _logits(clf, part.texts, ns, f"evaluate {split}")
    f = figures(logits, part.labels)
    result = {
        "run": ns.run,
        "split": split,
        "examples": len(part),
        "accuracy": f["accuracy"],
        "loss": f["nll"],
        "ece": f["ece"],
        "brier": f["brier"],
        "temperature": clf.temperature,
        "calibration": clf.calibration_note,
        "window_stride": json_stride(ns),
        "seconds": time.time() - t0,
        "random_init": clf.info.get("random_init", False),
    }
    if ns.json:
        print(json.dumps(result))
    else:
        warn = "  (RANDOM-INIT run: accuracy is meaningless)" if result["random_init"] else ""
        print(
            f"{split}: accuracy {100 * f['accuracy']:.2f}% | loss {f['nll']:.4f} | ECE {100 * f['ece']:.2f}% | "
            f"Brier {f['brier']:.4f} | {counted(len(part), 'review')} | {result['seconds']:.1f}s{warn}"
        )
    return 0


# ---------------------------------------------------------------- labeled files


def _evaluate_files(ns: argparse.Namespace) -> int:
    # Every file is read and checked, and every errors path checked, before the model loads: mistakes
    # fail at once. Only labels and line numbers are kept: the texts are read again, a chunk at a time.
    data = [LabeledFile.read(f, ns.text_column, ns.label_column, f"check {Path(f).name}") for f in ns.files]
    errors_paths = _errors_paths(ns) if ns.errors else [None] * len(ns.files)
    clf = _load(ns)
    for path, part, errors_path in zip(ns.files, data, errors_paths):
        result = _evaluate_file(clf, ns, path, part, errors_path)
        print(json.dumps(result) if ns.json else _file_text(result))
    return 0


@dataclass
class LabeledFile:
    """A labeled --file as evaluate holds it: its rows' labels and start lines, not their texts, which
    `texts()` reads again (held only for a pipe, which cannot be read twice)."""

    path: str
    text_column: str
    label_column: str
    labels: array.array = field(default_factory=lambda: array.array("b"))
    lines: array.array = field(default_factory=lambda: array.array("q"))
    held: list[str] | None = None

    @classmethod
    def read(cls, path: str, text_column: str, label_column: str, desc: str | None = None) -> LabeledFile:
        """`desc`: a progress bar's, on stderr as the scoring pass's: this pass, before the model loads,
        was silent (1.4-2.7 s per 100,000 IMDB reviews on 2 cores, four runs; a 1 GB file or several, far more)."""
        from tqdm.auto import tqdm

        part = cls(path, text_column, label_column)
        if not Path(path).expanduser().is_file():
            part.held = []
        # closed on an error too, before its one line (else drawn again below it at exit)
        with tqdm(part._rows(), desc=desc, unit="review", leave=False, disable=desc is None) as rows:
            for n, text, y in rows:
                part.labels.append(y)
                part.lines.append(n)
                if part.held is not None:
                    part.held.append(text)
        return part

    def _rows(self) -> Iterator[tuple[int, str, int]]:
        from ..data.files import labeled_rows

        return labeled_rows(self.path, "--file", self.text_column, self.label_column)

    def __len__(self) -> int:
        return len(self.labels)

    def texts(self) -> Iterator[tuple[int, str]]:
        """(row index, text) of every row, read again from the file: one that changed since is an error."""
        if self.held is not None:
            yield from enumerate(self.held)
            return
        i = -1
        for i, (n, text, y) in enumerate(self._rows()):
            if i >= len(self) or (n, y) != (self.lines[i], self.labels[i]):
                break
            yield i, text
        else:
            if i + 1 == len(self):
                return
        raise UserError(
            f"--file {self.path} changed while it was evaluated (another process is writing it?); "
            "evaluate again once it is complete"
        )


def _file_logits(clf, ns: argparse.Namespace, part: LabeledFile, desc: str) -> torch.Tensor:
    """Calibrated logits of every row of a file, computed a chunk of texts at a time."""
    import torch
    from tqdm.auto import tqdm

    out = torch.empty((len(part), 2), dtype=torch.float32)
    with tqdm(total=len(part), desc=desc, unit="review", leave=False) as bar:
        start = 0
        for chunk, _ in chunks(text for _, text in part.texts()):
            logits = clf.logits(chunk, ns.batch_size, bar, window_stride=ns.window_stride)
            out[start : start + len(chunk)] = logits
            start += len(chunk)
    return out


def _errors_paths(ns: argparse.Namespace) -> list[Path]:
    """<errors-dir>/<file name>.errors.jsonl per --file; never overwritten silently, never two alike."""
    folder = Path(ns.errors_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--errors-dir {folder} exists and is not a folder")
    require_creatable(folder, "--errors-dir")  # a read-only place fails now, not after the evaluation
    paths = [folder / f"{Path(f).name}.errors.jsonl" for f in ns.files]
    if len(set(paths)) < len(paths):
        raise UserError("--errors: two --file inputs share a file name; evaluate them in separate calls")
    for p in paths:
        if p.exists() and not ns.overwrite:
            raise UserError(f"--errors: {p} exists; pass --overwrite to replace it or choose --errors-dir")
    return paths


def _evaluate_file(
    clf, ns: argparse.Namespace, path: str, part: LabeledFile, errors_path: Path | None
) -> dict[str, Any]:
    import torch

    from ..calibration import labeled_report

    logits = _file_logits(clf, ns, part, f"evaluate {Path(path).name}")
    labels = torch.frombuffer(part.labels, dtype=torch.int8).long() if len(part) else torch.zeros(0).long()
    result: dict[str, Any] = {
        "file": path,
        **labeled_report(logits, labels),
        "temperature": clf.temperature,
        "calibration": clf.calibration_note,
        "window_stride": json_stride(ns),
    }
    if errors_path is not None:
        result["errors_file"] = str(errors_path)
        result["errors_written"] = _write_errors(
            errors_path, part, labels, logits.softmax(-1), ns.errors, ns.overwrite
        )
    return result


def _write_errors(path: Path, part: LabeledFile, labels, probs, n: int, overwrite: bool) -> int:
    """The n most confident mistakes as JSONL, atomically. Each names its place twice: `row`, the
    1-based row among the file's rows (`score`'s 0-based source_row + 1), and `line`, where it starts
    in the file (a CSV's header is line 1): the number an editor or a spreadsheet shows. Without
    --overwrite, a file another process wrote there during the evaluation is kept."""
    from ..calibration import most_confident_mistakes
    from ..data.labeled import LABEL_NAMES

    chosen = most_confident_mistakes(probs, labels, n)
    wanted = set(chosen)
    texts = {i: text for i, text in part.texts() if i in wanted}  # the file read again for these alone
    lines = []
    for i in chosen:
        p = probs[i].tolist()
        pred = int(p[1] > p[0])
        lines.append(
            {
                "row": i + 1,
                "line": part.lines[i],
                "label": LABEL_NAMES[part.labels[i]],
                "predicted": LABEL_NAMES[pred],
                "confidence": round(p[pred], 6),
                "probabilities": {"negative": round(p[0], 6), "positive": round(p[1], 6)},
                "text": texts[i],
            }
        )
    new_folders = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines), replace=overwrite)
    except FileExistsError:
        raise UserError(
            f"--errors: {path} was written by another process during this evaluation; it is kept: pass "
            "--overwrite to replace it or choose another --errors-dir"
        ) from None
    except OSError as e:
        failure = write_failure(e)
        if failure is None:
            raise
        for folder in new_folders:  # the failed write leaves no empty --errors-dir of its own making
            with contextlib.suppress(OSError):  # not empty, or already gone: left as it is
                folder.rmdir()
        failure.filename = None  # the temporary file's name: the one to report is the errors file's
        raise UserError(
            f"--errors: {cannot_write(failure, str(path))}; {make_room(failure)} or choose another --errors-dir"
        ) from None
    return len(lines)


def _file_text(r: dict[str, Any]) -> str:
    (tn, fp), (fn, tp) = r["confusion"]
    out = [
        f"{r['file']}: accuracy {100 * r['accuracy']:.2f}% | loss {r['loss']:.4f} | ECE {100 * r['ece']:.2f}% | "
        f"Brier {r['brier']:.4f} | {counted(r['rows'], 'row')}",
        "  confusion (rows: true label, columns: predicted)",
        f"    {'':10}{'NEGATIVE':>10}{'POSITIVE':>10}",
        f"    {'NEGATIVE':10}{tn:>10,}{fp:>10,}",
        f"    {'POSITIVE':10}{fn:>10,}{tp:>10,}",
    ]
    if "errors_file" in r:
        mistakes = counted(r["errors_written"], "most confident mistake")
        out.append(f"  {mistakes} written to {r['errors_file']}")
    return "\n".join(out)
