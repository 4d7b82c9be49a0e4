"""After the last epoch, on the kept checkpoint: calibration on validation and the labeled-file report.

Nothing here chooses anything from the test split or the labeled files: the temperature is fitted on
validation only; test and the `--eval-file` files are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from ..calibration import ECE_BINS, before_after, fit_temperature, labeled_report
from ..data.files import load_labeled_file
from ..data.labeled import LabeledTexts
from ..data.tokcache import cached_encode
from ..errors import counted
from ..runs.rundir import RunDir


@dataclass
class EvalFile:
    path: str
    data: LabeledTexts


@dataclass
class KeptLogits:
    """The kept weights' logits on validation (and test), from the epoch evaluation that chose them.

    Whole splits in input order, on the CPU (2 floats a review). Calibration reads them instead of
    evaluating the same weights a second time: the same pass (Trainer.eval_logits, the same path, batches
    and weights; the LoRA merged for a flat pass is restored bit for bit after each, and the kept weights
    restored from disk are the tensors that were saved), so the same logits, without its time.
    """

    epoch: int
    weights: str  # raw | ema
    val: torch.Tensor
    test: torch.Tensor | None  # None when the test split was not read for these weights

    @classmethod
    def of(
        cls, epoch: int, weights: str, val: torch.Tensor | None, test: torch.Tensor | None
    ) -> KeptLogits | None:
        """None without validation's whole logits (data-parallel ranks evaluate shards)."""
        return None if val is None else cls(epoch, weights, val, test)


@dataclass
class PostTraining:
    summary: dict[str, Any] = field(default_factory=dict)  # merged into run.json
    bins: dict[str, Any] = field(default_factory=dict)  # reliability tables, for the diagram


class FinishedTraining(Protocol):
    """What the post-training steps read from a trainer whose loop has ended (training.trainer.Trainer).

    A protocol rather than an import of Trainer: the trainer calls into this module, not the reverse.
    """

    cfg: Any
    state: Any
    model: torch.nn.Module
    run: RunDir
    tokenizer: Any
    val_ids: list[list[int]]
    val_y: list[int]
    test_ids: list[list[int]]
    test_y: list[int]
    eval_files: list[EvalFile]
    kept_logits: KeptLogits | None

    def eval_logits(self, seqs: list[list[int]], name: str) -> torch.Tensor: ...


def load_eval_files(paths: list[str], flag: str = "--eval-file") -> list[EvalFile]:
    """Read every --eval-file before training starts, so a bad file fails at once, not after hours.
    `flag`: the setting as given (`--eval-file`, or a --config file's `my.yaml: data.eval_files`)."""
    return [EvalFile(p, load_labeled_file(p, flag)) for p in paths]


def restore_kept_weights(model: torch.nn.Module, run: RunDir, method: str) -> None:
    """Load the kept checkpoint (adapter/ or model/) into the in-memory model, in place."""
    folder = run.weights_dir(method)
    if method == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):  # one file, or shards
        state.update(load_file(f))
    # strict=False: tied weights are saved once, so their second name is missing from the file
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not state:
        raise RuntimeError(f"cannot restore the kept checkpoint from {folder} (unexpected: {unexpected[:3]})")


def after_training(tr: FinishedTraining) -> PostTraining:
    """Calibrate (unless --no-calibration) and report the labeled files, with the kept checkpoint."""
    st, cfg = tr.state, tr.cfg
    # The model in memory holds the last epoch's raw weights; the kept ones may be another epoch's, or
    # the moving average of the weights (--ema-decay), saved when it won on validation.
    if st.history and (st.best_epoch != st.history[-1]["epoch"] or st.best_weights == "ema"):
        restore_kept_weights(tr.model, tr.run, cfg.train.method)
    out = PostTraining()
    val, test = kept_logits(tr)
    temperature = fit_temperature(val, tr.val_y) if cfg.train.calibration else 1.0
    splits = {"val": (val, tr.val_y)}
    if test is not None:  # test is reported, as every epoch's test figures are
        splits["test"] = (test, tr.test_y)
    record: dict[str, Any] = {"enabled": cfg.train.calibration, "temperature": temperature, "bins": ECE_BINS}
    for name, (logits, labels) in splits.items():
        figs = before_after(logits, labels, temperature)
        out.bins[name] = figs.pop("bins")
        if not cfg.train.calibration:
            figs.pop("after")
        record[name] = figs
    out.summary["calibration"] = record
    if not cfg.train.calibration:  # one left by an interrupted attempt would still scale every prediction
        tr.run.calibration_path.unlink(missing_ok=True)
    else:
        tr.run.write_calibration(
            {"temperature": temperature, "fitted_on": "validation", "epoch": st.best_epoch, **record}
            | {"reliability": out.bins}
        )
    print(calibration_line(record), flush=True)
    if tr.eval_files:
        out.summary["eval_files"] = [_report_file(tr, f, temperature) for f in tr.eval_files]
    return out


def kept_logits(tr: FinishedTraining) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validation's and (when each epoch reads it) test's logits of the kept weights: those of the epoch
    evaluation that chose them when this process ran it on the whole split, else a pass now (a resume
    that started after the kept epoch, data-parallel runs, whose epochs each rank evaluated a shard of)."""
    st, kept = tr.state, tr.kept_logits
    if kept is None or (kept.epoch, kept.weights) != (st.best_epoch, st.best_weights):
        kept = None
    # Named apart from the epoch's passes, whose bars showed the same splits: these read the kept weights
    val = kept.val if kept is not None else tr.eval_logits(tr.val_ids, "validation, kept checkpoint")
    if not tr.cfg.train.eval_test_each_epoch:
        return val, None
    test = kept.test if kept is not None else None
    if test is None:  # not in memory, or not read for these weights (see KeptLogits.test)
        test = tr.eval_logits(tr.test_ids, "test, kept checkpoint")
    return val, test


def _report_file(tr: FinishedTraining, f: EvalFile, temperature: float) -> dict[str, Any]:
    d = tr.cfg.data
    ids = cached_encode(tr.tokenizer, f.data.texts, d.max_length, d.truncation, d.head_tokens, d.token_cache)
    name = Path(f.path).name
    report = {"file": name, **labeled_report(tr.eval_logits(ids, name) / temperature, f.data.labels)}
    print(
        f"eval file {name}: accuracy {100 * report['accuracy']:.2f}% | loss {report['loss']:.4f} | "
        f"ECE {100 * report['ece']:.2f}% | {counted(report['rows'], 'row')}",
        flush=True,
    )
    return report


def calibration_line(record: dict[str, Any]) -> str:
    parts = []
    for name in ("val", "test"):
        if name in record:
            r = record[name]
            after = f" -> {100 * r['after']['ece']:.2f}%" if "after" in r else ""
            parts.append(f"{name} ECE {100 * r['before']['ece']:.2f}%{after}")
    head = (
        f"calibration: temperature {record['temperature']:.4f} (fitted on validation)"
        if record["enabled"]
        else "calibration off (--no-calibration)"
    )
    return head + " | " + " | ".join(parts)
