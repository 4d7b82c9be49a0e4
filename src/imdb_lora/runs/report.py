"""Run reports: results.md (the reference's tables), curves.png and the model card README.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..config import Config
from ..errors import counted
from .rundir import RunDir, atomic_write_text


def fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def epoch_table(history: list[dict[str, Any]], best_epoch: int) -> str:
    has_test = any("test_accuracy" in r for r in history)
    has_ema = any("ema_val_accuracy" in r for r in history)
    head = "| Epoch | Train Loss | Train Acc | Val Loss | Val Acc |" + (
        " Test Loss | Test Acc |" if has_test else ""
    )
    head += " EMA Val Acc | EMA Test Acc |" if has_ema else ""
    head += " Time |"
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in history:
        mark = (" *" + (" (EMA)" if r.get("weights") == "ema" else "")) if r["epoch"] == best_epoch else ""
        cut = f" ({r['steps']:,} of {r['steps_in_epoch']:,} steps)" if "steps" in r else ""
        cells = [
            f"{r['epoch']}{cut}{mark}",
            f"{r['train_loss']:.4f}",
            f"{100 * r['train_accuracy']:.2f}%",
            f"{r['val_loss']:.4f}",
            f"{100 * r['val_accuracy']:.2f}%",
        ]
        if has_test:
            cells += [f"{r['test_loss']:.4f}", f"{100 * r['test_accuracy']:.2f}%"]
        if has_ema:
            cells += [_pct(r.get("ema_val_accuracy")), _pct(r.get("ema_test_accuracy"))]
        cells.append(fmt_seconds(r["train_seconds"]))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def budget_cut(summary: dict[str, Any]) -> str | None:
    """`--max-steps 7 at step 7` when a budget, not the epochs, ended training (else None): the one
    wording of train's done line and the model card."""
    ended = summary.get("ended_by", "epochs")
    if ended == "epochs":
        return None
    return f"--{ended.replace('_', '-')} {summary[ended]} at step {summary['steps_done']:,}"


def ended_by_text(summary: dict[str, Any]) -> str:
    """results.md's "Training ended by": what ended training, with the budgets that were set:
    `--max-steps 7 (step 7 of 10)`, `the epochs (step 10 of 10); also set: --max-time 30s`."""
    ended = summary.get("ended_by", "epochs")
    budgets = [f"--{k.replace('_', '-')} {summary[k]}" for k in ("max_steps", "max_time") if summary.get(k)]
    what = "the epochs" if ended == "epochs" else f"--{ended.replace('_', '-')} {summary[ended]}"
    done = f"step {summary['steps_done']:,} of {summary['total_steps']:,}"
    unused = [b for b in budgets if not b.startswith(what)]
    return f"{what} ({done})" + (f"; also set: {', '.join(unused)}" if unused else "")


def _pct(x: float | None) -> str:
    return f"{100 * x:.2f}%" if x is not None else "–"


def shown_model_name(name: str) -> str:
    """A hub id as is; a local folder by its name only: results.md and the model card are shared, and a
    path means nothing on another machine (run.json and config.yaml keep it, for evaluate and predict)."""
    # config.py stores local folders as absolute paths; hub ids are never absolute.
    return Path(name).name if os.path.isabs(name) else name


def time_per_epoch(history: list[dict[str, Any]]) -> str:
    """The mean training time of the full epochs: an epoch cut by --max-steps or --max-time (its row says
    how many steps it trained) would pull the mean down; a run of cut epochs alone says what it shows."""
    full = [r["train_seconds"] for r in history if "steps" not in r]
    if full:
        return fmt_seconds(sum(full) / len(full))
    cut = [r for r in history if "steps" in r]
    if not cut:
        return "–"
    r = cut[-1]
    return f"– (no full epoch; the cut one: {fmt_seconds(r['train_seconds'])} for {r['steps']:,} of {r['steps_in_epoch']:,} steps)"


def key_metrics(summary: dict[str, Any], history: list[dict[str, Any]]) -> str:
    train_s = summary["train_seconds"]
    weights = "Adapter size on disk" if summary["method"] == "lora" else "Model size on disk"
    rows = [
        (
            "Model",
            shown_model_name(summary["model"])
            + (" (RANDOM INIT - speed/test only, accuracy meaningless)" if summary["random_init"] else ""),
        ),
        ("Method", "LoRA" if summary["method"] == "lora" else "Full fine-tuning"),
        (
            "Device",
            f"{summary['device']} ({summary['precision']}; training {summary['train_path']}; "
            f"evaluation {summary['eval_path']})",
        ),
        ("Examples (train / val / test)", " / ".join(f"{v:,}" for v in summary["examples"].values())),
        ("Training time", fmt_seconds(train_s)),
        ("Time per epoch", time_per_epoch(history)),
        ("Best epoch (by validation accuracy)", str(summary["best_epoch"])),
    ]
    if summary.get("max_steps") or summary.get("max_time") or summary.get("ended_by", "epochs") != "epochs":
        rows.append(("Training ended by", ended_by_text(summary)))
    if summary.get("ema_decay"):
        kept = summary.get("kept_weights") == "ema"
        rows.append(
            (
                "Weights kept (by validation accuracy)",
                f"moving average (EMA, decay {summary['ema_decay']:g})" if kept else "raw (EMA did not win)",
            )
        )
    rows += [
        ("Validation accuracy (best epoch)", f"{100 * summary['val_accuracy']:.2f}%"),
    ]
    if summary.get("test_accuracy") is not None:
        rows.append(("Final test accuracy (best epoch)", f"**{100 * summary['test_accuracy']:.2f}%**"))
    rows += [
        ("Trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("Total parameters", f"{summary['total_parameters']:,}"),
        ("Trainable %", f"{summary['trainable_percent']:.2f}%"),
        (weights, fmt_bytes(summary["weights_bytes"])),
        (f"Peak memory, {summary['peak_memory_kind']}", fmt_bytes(summary["peak_memory_bytes"])),
    ]
    return "| Metric | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def results_markdown(cfg: Config, history: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    return (
        f"# Results: {shown_model_name(summary['model'])} ({summary['method']})\n\n"
        "## Per-epoch results\n\n"
        f"{epoch_table(history, summary['best_epoch'])}\n\n"
        "`*` = checkpoint kept (best validation accuracy; `(EMA)`: the weights' moving average won and was "
        "saved). Test figures are reported, never used to choose.\n\n"
        "## Key metrics\n\n"
        f"{key_metrics(summary, history)}\n"
        + calibration_section(summary.get("calibration"))
        + eval_files_section(summary.get("eval_files"))
        + time_section(summary.get("time_breakdown"))
    )


def time_section(breakdown: dict[str, float] | None) -> str:
    """Where the command's wall time went, phase by phase ('' for runs made before the breakdown)."""
    if not breakdown:
        return ""
    rows = [
        f"| {name.replace('_', ' ')} | {seconds:.1f} s |"
        for name, seconds in breakdown.items()
        if name != "total"
    ]
    return (
        "\n## Where the time went\n\n"
        "This command's wall time, from its start to this report (a resumed run: this process only).\n\n"
        "| Phase | Time |\n|---|---|\n"
        + "\n".join(rows)
        + f"\n| **total** | **{breakdown['total']:.1f} s** |\n"
    )


def calibration_section(cal: dict[str, Any] | None) -> str:
    """Before/after table of the kept checkpoint's calibration figures ('' for runs without them)."""
    if not cal:
        return ""
    if cal["enabled"]:
        head = (
            f"Temperature **{cal['temperature']:.4f}**, fitted on the validation split (minimum NLL); "
            "predict, evaluate, serve and exports divide the logits by it. It never moves the predicted "
            "label, so accuracy is unchanged. Test figures are reported only."
        )
    else:
        head = "Calibration off (`--no-calibration`): the figures of the raw probabilities."
    rows = calibration_rows(cal)
    return (
        "\n## Calibration\n\n"
        + head
        + "\n\n"
        + "\n".join(rows)
        + "\n\nReliability diagram: `reliability.png`.\n"
    )


def calibration_rows(cal: dict[str, Any]) -> list[str]:
    """Markdown table rows: per split, the raw and (if fitted) calibrated ECE, Brier, NLL and accuracy."""
    rows = ["| Split | Probabilities | ECE (15 bins) | Brier | NLL | Accuracy |", "|---|---|---|---|---|---|"]
    for split, label in (("val", "validation"), ("test", "test")):
        for when in ("before", "after"):
            f = cal.get(split, {}).get(when)
            if f:
                name = "raw" if when == "before" else "calibrated"
                rows.append(
                    f"| {label} | {name} | {100 * f['ece']:.2f}% | {f['brier']:.4f} | {f['nll']:.4f} | "
                    f"{100 * f['accuracy']:.2f}% |"
                )
    return rows


def eval_files_section(files: list[dict[str, Any]] | None) -> str:
    """Per labeled file (--eval-file): figures of the kept checkpoint, reported only."""
    if not files:
        return ""
    rows = [
        "| File | Rows | Accuracy | Loss | ECE | Confusion [[TN, FP], [FN, TP]] |",
        "|---|---|---|---|---|---|",
    ]
    for f in files:
        rows.append(
            f"| {f['file']} | {f['rows']:,} | {100 * f['accuracy']:.2f}% | {f['loss']:.4f} | "
            f"{100 * f['ece']:.2f}% | {f['confusion']} |"
        )
    return (
        "\n## Labeled files (robustness report)\n\n"
        "The kept checkpoint (calibrated, if calibration is on) on each `--eval-file`, after the last epoch; "
        "never used to choose anything.\n\n" + "\n".join(rows) + "\n"
    )


def plot_curves(history: list[dict[str, Any]], path, kept_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch for each split, and the epoch whose checkpoint was kept (as results.md
    marks it with `*`): the curves alone do not say which point the saved model is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "o-"), ("val", "s-"), ("test", "^--")):
        if f"{split}_loss" in history[0]:
            ax1.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split)
            ax2.plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], style, label=split)
    ax1.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax2.set(title="Accuracy", xlabel="epoch", ylabel="%")
    for ax in (ax1, ax2):
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="gray", linestyle=":", label=f"kept: epoch {kept_epoch}")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# a bin's count sits beside its point, where the other curve often passes: a white box drawn over every
# line keeps it readable
COUNT_LABEL = {"zorder": 5, "bbox": {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85}}


def plot_reliability(bins: dict[str, Any], path) -> None:
    """Reliability diagram per split: accuracy against mean confidence per bin, raw and calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bins), figsize=(5 * len(bins), 4.5), squeeze=False)
    for ax, (split, tables) in zip(axes[0], bins.items()):
        ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
        for when, style, offset in (("before", "o-", (4, 4)), ("after", "s-", (4, -10))):
            used = [b for b in tables.get(when, []) if b["count"]]
            if used:
                line = ax.plot(
                    [b["confidence"] for b in used],
                    [b["accuracy"] for b in used],
                    style,
                    label=reliability_label(when, tables[when]),
                )[0]
                for b in used:  # a bin of 2 reviews is not one of 200: each point says how many it holds
                    ax.annotate(
                        str(b["count"]),
                        (b["confidence"], b["accuracy"]),
                        xytext=offset,
                        textcoords="offset points",
                        fontsize=7,
                        color=line.get_color(),
                        **COUNT_LABEL,
                    )
        total = sum(b["count"] for b in next(iter(tables.values()), []))
        ax.set(
            title=f"Reliability ({'validation' if split == 'val' else split}, {counted(total, 'review')})",
            xlabel="confidence of the predicted label",
            ylabel="accuracy",
            xlim=(0.45, 1.02),
            ylim=(0, 1.06),
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", title="numbers: reviews per bin", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_label(when: str, table: list[dict[str, Any]]) -> str:
    """A reliability curve's legend entry, with the ECE that results.md reports for it."""
    from ..calibration import ece_from_bins

    return f"{'raw' if when == 'before' else 'calibrated'} (ECE {100 * ece_from_bins(table):.2f}%)"


def model_card(cfg: Config, history: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lora = cfg.train.method == "lora"
    lo = cfg.lora
    method = (
        f"LoRA r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g}, rsLoRA={'on' if lo.rslora else 'off'}, "
        f"targets: {', '.join(lo.target_modules or lo.targets)}; classification head trained in full"
        if lora
        else "full fine-tuning (every weight trained)"
    )
    warn = (
        "\n> **Random initialisation.** This run's base model had random weights (`--random-init`): it exists "
        "for tests and speed benchmarks, and its accuracy means nothing.\n"
        if cfg.model.random_init
        else ""
    )
    test = summary.get("test_accuracy")
    if cfg.model.pooling == "mean":
        method += "; the head reads the mean of the last hidden states"
    if summary.get("kept_weights") == "ema":
        method += f"; weights saved: their exponential moving average (decay {cfg.train.ema_decay:g})"
    base = card_base_model(cfg)
    imdb = (summary.get("data_source") or {}).get("kind", "imdb") == "imdb"
    return f"""---
{card_metadata(cfg, summary, base.hub_id, imdb)}---
# {"IMDB sentiment" if imdb else "Sentiment"} classifier ({summary["model_type"]}, {cfg.train.method})
{warn}
Binary sentiment classifier{" for movie reviews" if imdb else ""}: label 0 = NEGATIVE, 1 = POSITIVE.

- Base model: {base.described}
- Method: {method}
- Trainable parameters: {summary["trainable_parameters"]:,} of {summary["total_parameters"]:,} ({summary["trainable_percent"]:.2f}%)
- Data: {card_data(cfg, summary)}
- Max length {cfg.data.max_length} tokens ({card_truncation(cfg)}); {counted(cfg.train.epochs, "epoch")}{card_cut(summary)}, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, seed {cfg.train.seed}
- Checkpoint: epoch {summary["best_epoch"]}, chosen by validation accuracy ({100 * summary["val_accuracy"]:.2f}% on {counted(summary["examples"]["val"], "review")})
- Test accuracy of that checkpoint: {card_test(test, summary["examples"]["test"])}
- Trained on: {card_machine(summary)}
{card_calibration(summary.get("calibration"))}
## Use
```
imdb-lora predict THIS_DIR "A wonderful film."
{card_evaluate(cfg, summary, imdb)}
```
{card_plain_use(cfg, base.snippet)}

## Limitations
{card_limitations(cfg, summary, imdb)}

See `results.md` for per-epoch figures and `config.yaml` for the exact recipe.
"""


IMDB_HUB_ID = "stanfordnlp/imdb"  # the hub's copy of the Large Movie Review Dataset (same 25k/25k split)
IMDB_TEST_REVIEWS = (
    25_000  # its test split: a figure on fewer reviews (a sample, a copy cut down) is no claim
)


def card_metadata(cfg: Config, summary: dict[str, Any], hub_base: bool, imdb: bool) -> str:
    """The card's YAML front matter, as huggingface_hub.ModelCard reads it: only what is true of the run.

    base_model only for a hub id (the hub takes it as one; a local folder's path means nothing
    elsewhere); the dataset and language only for IMDB; model-index (the hub's results table) only for
    a figure that is what it claims: pretrained weights, read on the whole IMDB test split (all of its
    25,000 reviews: a folder of fewer, as the tests write, is not that split)."""
    lora = cfg.train.method == "lora"
    meta: dict[str, Any] = {"library_name": "peft" if lora else "transformers"}
    if hub_base:
        meta["base_model"] = cfg.model.name
    meta["pipeline_tag"] = "text-classification"
    meta["tags"] = ["text-classification", "sentiment-analysis", *(["imdb"] if imdb else [])]
    meta["tags"].append("lora" if lora else "full-fine-tuning")
    if imdb:
        meta["language"] = ["en"]
        meta["datasets"] = [IMDB_HUB_ID]
    test = summary.get("test_accuracy")
    if test is not None:
        meta["metrics"] = ["accuracy"]
    n, of = summary["examples"]["test"], (summary.get("examples_available") or {}).get("test")
    if imdb and test is not None and not cfg.model.random_init and n == of == IMDB_TEST_REVIEWS:
        result = {
            "task": {"type": "text-classification", "name": "Sentiment analysis"},
            "dataset": {"type": IMDB_HUB_ID, "name": "IMDB", "split": "test"},
            "metrics": [{"type": "accuracy", "value": round(float(test), 4), "name": "Test accuracy"}],
        }
        name = f"{shown_model_name(cfg.model.name).rsplit('/', 1)[-1]}-{cfg.train.method}-imdb"
        meta["model-index"] = [{"name": name, "results": [result]}]
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


IMDB_NAME = "IMDB movie reviews (Large Movie Review Dataset v1.0, Maas et al., ACL 2011)"


def card_data(cfg: Config, summary: dict[str, Any]) -> str:
    """What the run read, and how much of it: a subset run must not read as a full-data one."""
    used, avail = summary["examples"], summary.get("examples_available") or {}
    source = summary.get("data_source") or {}
    val_pct = f"{100 * cfg.data.val_size:g}%"
    if source.get("kind") == "files":
        train_name = Path(cfg.data.train_file or "train").name
        test_name = Path(cfg.data.test_file).name if cfg.data.test_file else None
        where = f"labeled file `{train_name}`" + (f" (test: `{test_name}`)" if test_name else "")
        test_from = f"`{test_name}`" if test_name else f"a second {val_pct} held out of `{train_name}`"
        val_from, train_from = f"{val_pct} held out of `{train_name}`", f"`{train_name}`, less validation"
    else:
        where, val_from = IMDB_NAME, f"{val_pct} held out of IMDB train"
        train_from, test_from = "IMDB train, less validation", "IMDB test"

    def part(split: str, what: str, origin: str) -> str:
        n, of = used[split], avail.get(split)
        if of is None or of == n:
            return f"{n:,} {what} ({origin})"
        return f"{n:,} of {of:,} {what} ({origin}; stratified, seeded subset)"

    subset = any(avail.get(k, used[k]) != used[k] for k in used)
    return (
        f"{where}{'; **a subset**' if subset else ''}: {part('train', 'training reviews', train_from)}, "
        f"{part('val', 'validation reviews', val_from)}, {part('test', 'test reviews', test_from)}"
    )


def card_cut(summary: dict[str, Any]) -> str:
    """The card's note when a budget, not the epochs, ended training."""
    cut = budget_cut(summary)
    return f" (cut by {cut})" if cut else ""


def card_truncation(cfg: Config) -> str:
    d = cfg.data
    if d.truncation == "head_tail":
        return (
            f"longer reviews keep their first {d.head_tokens} and last {d.max_length - d.head_tokens} tokens"
        )
    return "longer reviews keep their first tokens"


def card_test(test: float | None, n: int) -> str:
    """The test accuracy with its sample size and a 95% normal-approximation interval."""
    if test is None:
        return "not measured"
    half = 196 * (test * (1 - test) / max(1, n)) ** 0.5
    return f"{100 * test:.2f}% on {n:,} test reviews (95% interval ±{half:.1f} points)"


def card_machine(summary: dict[str, Any]) -> str:
    m = summary.get("machine") or {}
    device = summary.get("device", "?")
    if device == "cpu" and m:
        device = f"CPU ({m.get('cpu')}, {m.get('torch_threads')} threads)"
    line = f"{device}, {summary.get('precision', '?')}"
    if summary.get("train_seconds") is not None:
        line += f"; {fmt_seconds(summary['train_seconds'])} of training"
    if summary.get("finished_at"):
        line += f", finished {summary['finished_at']}"
    return line


def card_evaluate(cfg: Config, summary: dict[str, Any], imdb: bool) -> str:
    """The card's evaluate line. A run on labeled files was told to read IMDB (--data aclImdb_v1.tar.gz):
    its own test file, or with none the files config.yaml names (the held-out split is seeded). A test
    file read in part (--max-eval-samples) is named through config.yaml too: `--file` reads it whole
    and takes no --max-samples, so its figure would not be the card's."""
    flags = card_eval_flags(cfg, summary)
    if imdb:
        return f"imdb-lora evaluate THIS_DIR --data aclImdb_v1.tar.gz{flags}"
    if cfg.data.test_file and not flags:
        return f"imdb-lora evaluate THIS_DIR --file {Path(cfg.data.test_file).name}"
    return f"imdb-lora evaluate THIS_DIR{flags}   # the files config.yaml names"


def card_eval_flags(cfg: Config, summary: dict[str, Any]) -> str:
    """evaluate reads the whole test split unless told: give the subset the card's figure comes from."""
    avail = (summary.get("examples_available") or {}).get("test")
    n = summary["examples"]["test"]
    return f" --max-samples {n}" if avail and n < avail else ""


def card_limitations(cfg: Config, summary: dict[str, Any], imdb: bool) -> str:
    lines = [
        "Trained on English IMDB movie reviews only; expect lower accuracy on other domains, sarcasm and "
        "very short texts."
        if imdb
        else "Trained on the labeled file named above only; expect lower accuracy on other domains."
    ]
    avail = summary.get("examples_available") or {}
    used = summary["examples"]
    if avail.get("train", used["train"]) != used["train"]:
        lines.append(
            f"Trained on a subset ({used['train']:,} of {avail['train']:,} training reviews): not what the "
            "recipe reaches on the full data."
        )
    lines.append(
        f"Reads at most {cfg.data.max_length} tokens per text ({card_truncation(cfg)}); the rest is not seen."
    )
    lines.append(
        "Outside imdb-lora, use the same truncation, and divide the logits by the temperature "
        "(`calibration.json`) for calibrated probabilities."
        if (summary.get("calibration") or {}).get("enabled")
        else "Outside imdb-lora, use the same truncation."
    )
    return "\n".join(f"- {line}" for line in lines)


class CardBase(NamedTuple):
    """How the model card names the base model."""

    hub_id: bool  # worth putting in the hub metadata
    described: str  # the "Base model:" line
    snippet: str  # what the plain-PEFT snippet passes to from_pretrained


def card_base_model(cfg: Config) -> CardBase:
    """A hub id as is; a local folder by its name only (its path means nothing on another machine)."""
    name = cfg.model.name
    local, shown = os.path.isabs(name), shown_model_name(name)
    if cfg.model.random_init:
        saved = " (saved in `base_model/`)" if cfg.train.method == "lora" else ""
        return CardBase(False, f"`{shown}` architecture, random weights{saved}", "base_model")
    if not local:
        return CardBase(True, f"`{name}`", name)
    return CardBase(False, f"local folder `{shown}` (its path is in `config.yaml`)", f"path/to/{shown}")


def card_plain_use(cfg: Config, base: str) -> str:
    """How to load the run without imdb-lora: PEFT for an adapter, transformers for a full model."""
    if cfg.train.method == "lora":
        use = (
            "The adapter in `adapter/` is standard PEFT: `PeftModel.from_pretrained(AutoModelForSequenceClassification."
            f'from_pretrained("{base}", num_labels=2), "adapter")`, with the tokenizer in `tokenizer/` '
            "(transformers then warns that the classifier is newly initialised: the adapter holds the trained "
            "one and replaces it)."
        )
        mean_fix = "on the base model before PEFT"
    else:
        use = (
            "The model in `model/` is a standard transformers checkpoint: "
            '`AutoModelForSequenceClassification.from_pretrained("model")`, with the tokenizer in `tokenizer/`.'
        )
        mean_fix = "on the loaded model"
    if cfg.model.pooling == "mean":
        use += (
            " This run's head reads the **mean of the last hidden states** (`pooling: mean`), not the first "
            "token: load it with imdb-lora (which reads config.yaml), or call "
            f'`imdb_lora.modeling.pooling.set_pooling(model, "mean")` {mean_fix} and '
            "compute logits with `imdb_lora.modeling.forward.padded_logits`."
        )
    return use


def card_calibration(cal: dict[str, Any] | None) -> str:
    """The model card's calibration lines: the temperature, and ECE, Brier and NLL before and after."""
    if not cal:
        return "- Calibration: none (probabilities are the raw softmax)\n"
    if cal["enabled"]:
        line = (
            f"- Calibration: temperature {cal['temperature']:.4f} fitted on validation (`calibration.json`, "
            "applied by predict/evaluate/serve and exports)\n"
        )
    else:
        line = "- Calibration: off (raw softmax)\n"
    return line + "\n" + "\n".join(calibration_rows(cal)) + "\n"


def write_plots(
    run: RunDir, history: list[dict[str, Any]], summary: dict[str, Any], reliability: dict[str, Any] | None
) -> None:
    """curves.png and (with calibration figures) reliability.png. Drawn before results.md, so that the
    time breakdown results.md and run.json give can count them."""
    plot_curves(history, run.path / "curves.png", kept_epoch=summary.get("best_epoch"))
    if reliability:
        plot_reliability(reliability, run.path / "reliability.png")


def write_reports(run: RunDir, cfg: Config, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """results.md and the model card (README.md)."""
    atomic_write_text(run.path / "results.md", results_markdown(cfg, history, summary))
    atomic_write_text(run.path / "README.md", model_card(cfg, history, summary))
