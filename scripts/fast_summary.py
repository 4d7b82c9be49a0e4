#!/usr/bin/env python3
"""Issue 10's table from one `scripts/gpu-checks.sh STAGE OUT fast` call, and its JSON record.

    python3 scripts/fast_summary.py OUT/log.txt OUT/fast-summary.json [RUN]
    python3 scripts/fast_summary.py --fastest-captured OUT/log.txt   # train flags of the fastest captured step

Reads the log that gpu-checks.sh wrote (each step's command after `=== NAME:`, then its output) and
its summary.txt (exit status and seconds per step), prints one markdown table (tokens/s, epoch seconds,
cold and warm test-set evaluation seconds, peak memory, MFU, ratio to reference_lora.py), each
compiled bench's first step (what compiling cost) and the 3-epoch `train` wall time (with RUN, that
run's directory: where its wall time went, from its run.json's `time_breakdown`), and writes
every figure with the date, GPU, versions and commands to JSON (commit it under docs/measurements/). Standard library only: it runs on the GPU machine as is.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

TRAIN_ROWS = [  # (step name, label)
    ("fast-ref", "reference_lora.py (bf16, SDPA, dynamic padding)"),
    ("fast-bench-train-padded", "project, padded (today's default)"),
    ("fast-bench-train-flat", "project, flat"),
    ("fast-bench-train-flat-graphs", "project, flat + CUDA graphs"),
    ("fast-bench-train-flat-graphs-working", "project, flat + CUDA graphs + bf16 working copies"),
    (
        "fast-bench-train-flat-graphs-working-fused",
        "project, flat + CUDA graphs + bf16 working copies + fused q/k/v",
    ),
    ("fast-bench-train-flat-compiled", "project, flat + torch.compile"),
    ("fast-bench-train-flat-compiled-graphs", "project, flat + torch.compile + CUDA graphs"),
]
EVAL_ROWS = [
    ("fast-bench-eval-packed", "evaluation, packed"),
    ("fast-bench-eval-flat", "evaluation, flat (LoRA merged)"),
]
MPNET_TRAIN_ROWS = [
    ("fast-mpnet-bench-train-padded", "MPNet-base (random init), padded"),
    ("fast-mpnet-bench-train-flat", "MPNet-base (random init), flat (FlexAttention, no attention dropout)"),
]
MPNET_RUNS = [("fast-mpnet-1ep-flat", "flat"), ("fast-mpnet-1ep-padded", "padded")]
MPNET_PLAIN_TEST = 95.34  # the plain recipe's 1-epoch test accuracy on MPNet-base (docs/GPU.md in ../shared)
TARGETS = {"ratio": 6.0, "epoch_s": 10.0, "eval_warm_s": 3.0, "train_3_epochs_wall_s": 60.0}


def parse_steps(log: str) -> dict[str, dict]:
    """{step name: {"command": ..., "lines": [...]}} in log order."""
    steps: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.match(r"^=== ([\w.-]+): (.*)$", line)
        if m:
            current = steps[m.group(1)] = {"command": m.group(2), "lines": []}
        elif current is not None:
            current["lines"].append(line)
    return steps


def parse_status(summary: str) -> dict[str, dict]:
    out = {}
    for line in summary.splitlines():
        m = re.match(r"^([\w.-]+)\s+rc=(\d+)\s+(\d+)s", line)
        if m:
            out[m.group(1)] = {"rc": int(m.group(2)), "seconds": int(m.group(3))}
        m = re.match(r"^([\w.-]+)\s+skipped", line)
        if m:
            out[m.group(1)] = {"rc": None, "skipped": True}
    return out


def figures(name: str, lines: list[str]) -> dict:
    """The figures one step printed: a bench's JSON report, the reference's rate, train's epochs."""
    text = "\n".join(lines)
    fig: dict = {}
    for line in lines:
        if line.startswith("{"):
            try:
                fig.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    m = re.search(r"real_tok/s (\d+) epoch_est_s ([\d.]+)", text)
    if m:
        fig["tokens_per_second"], fig["epoch_seconds_estimate"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"peak_mem_GiB ([\d.]+)", text)
    if m:
        fig["peak_memory_bytes"] = float(m.group(1)) * 2**30
    epochs = re.findall(r"^epoch (\d+): .*?\| ([\d.]+)s train, ([\d.]+)s eval", text, re.M)
    if epochs:
        fig["epochs"] = [{"epoch": int(e), "train_s": float(t), "eval_s": float(v)} for e, t, v in epochs]
        # the epoch lines' fractions only: the closing "done:" line repeats the best one in %
        fig["test_accuracy"] = [float(a) for a in re.findall(r"^epoch \d+: .*?test acc ([\d.]+)", text, re.M)]
    m = re.search(r"^wall ([\d.]+) s", text, re.M)
    if m:
        fig["wall_seconds"] = float(m.group(1))
    return fig


def gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "–"


def num(v, fmt="{:,.1f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def mpnet_tables(got: dict, record: dict) -> None:
    """MPNet's flat path (part fast-mpnet): speed flat vs padded, and the 1-epoch accuracy guard."""
    print("\nMPNet-base, flat path (FlexAttention) vs padded")
    print("| recipe | tokens/s | epoch s | vs padded | MFU | peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    padded = got.get(MPNET_TRAIN_ROWS[0][0], {}).get("tokens_per_second")
    for name, label in MPNET_TRAIN_ROWS:
        f = got.get(name, {})
        rate = f.get("tokens_per_second")
        f["ratio_to_padded"] = rate / padded if rate and padded else None
        print(
            f"| {label} | {num(rate, '{:,.0f}')} | {num(f.get('epoch_seconds_estimate'))} | "
            f"{num(f['ratio_to_padded'], '{:.2f}x')} | {num(f.get('mfu'), '{:.1%}')} | {gib(f.get('peak_memory_bytes'))} |"
        )
    record["mpnet_accuracy"] = {}
    for name, how in MPNET_RUNS:
        f = got.get(name, {})
        acc = (f.get("test_accuracy") or [None])[0]  # epoch 1's line: a fraction (the done: line is in %)
        acc = acc * 100 if acc is not None else None
        epochs = f.get("epochs") or [{}]
        record["mpnet_accuracy"][how] = {"test_accuracy": acc, "wall_seconds": f.get("wall_seconds")}
        print(
            f"MPNet-base 1 epoch (real weights, default recipe), {how}: test {num(acc, '{:.2f}')}% "
            f"(plain recipe {MPNET_PLAIN_TEST}%), {num(epochs[-1].get('train_s'))} s train, "
            f"{num(epochs[-1].get('eval_s'))} s eval, wall {num(f.get('wall_seconds'))} s"
        )


def train_how(train: dict) -> str:
    """How the 3-epoch run trained, from its command."""
    command = train.get("command", "")
    if "--compile" in command:
        return "flat + torch.compile + CUDA graphs"
    if "--bf16-working-copies" in command and "--fused-qkv" in command:
        return "flat + CUDA graphs + bf16 working copies + fused q/k/v"
    if "--bf16-working-copies" in command:
        return "flat + CUDA graphs + bf16 working copies"
    return "flat + CUDA graphs"


# The captured-step benches, and the `train` flags (besides --batching flat --cuda-graphs) of each one's step
CAPTURED = {
    "fast-bench-train-flat-graphs": "",
    "fast-bench-train-flat-compiled-graphs": "--compile",
    "fast-bench-train-flat-graphs-working": "--bf16-working-copies",
    "fast-bench-train-flat-graphs-working-fused": "--bf16-working-copies --fused-qkv",
}


def fastest_captured(log_path: str) -> str:
    """The train flags of the fastest captured step this log measured ("" for the plain one, also when
    none ran): a bench that failed or was skipped has no rate and is never chosen."""
    steps = parse_steps(Path(log_path).read_text())

    def rate(name: str) -> float:
        return figures(name, steps.get(name, {}).get("lines", [])).get("tokens_per_second") or 0.0

    best = max(CAPTURED, key=rate)
    return CAPTURED[best] if rate(best) > 0 else ""


def write_record(record: dict, json_path: str) -> None:
    # Paths under the home folder are written as ~/... (as gpu_summary.py does): no machine paths in
    # the committed docs/measurements files.
    text = json.dumps(record, indent=2).replace(str(Path.home()) + "/", "~/")
    Path(json_path).write_text(text + "\n")
    print(f"wrote {json_path}")


def run_breakdown(run_dir: str | None, train: dict) -> dict | None:
    """The 3-epoch run's time_breakdown from its run.json: only when this log's step finished (rc 0, or
    no summary.txt to say) and the run did, so that an older run left in the folder is never read."""
    if not run_dir or "epochs" not in train or train.get("rc", 0) != 0:
        return None
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("status") != "finished":
        return None
    breakdown = info.get("time_breakdown")
    return breakdown if isinstance(breakdown, dict) else None


def breakdown_text(breakdown: dict) -> str:
    """`train` wall by phase, as train's own closing line gives it."""
    parts = [
        f"{name.replace('_', ' ')} {s:.1f}"
        for name, s in breakdown.items()
        if name != "total" and isinstance(s, (int, float))
    ]
    return f"{num(breakdown.get('total'))} s = " + " + ".join(parts)


def main(log_path: str, json_path: str, run_dir: str | None = None) -> int:
    log = Path(log_path).read_text()
    summary_path = Path(log_path).with_name("summary.txt")
    status = parse_status(summary_path.read_text()) if summary_path.exists() else {}
    steps = parse_steps(log)
    head = log.splitlines()[:3]
    versions = next((line for line in head if line.startswith("torch ")), "")
    gpu = versions.rsplit("| gpu ", 1)[-1] if "| gpu " in versions else "unknown"
    record: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpu,
        "versions": versions,
        "header": head,
        "steps": {},
    }
    for name, s in steps.items():
        if name.startswith("fast"):
            record["steps"][name] = {
                "command": s["command"],
                **status.get(name, {}),
                **figures(name, s["lines"]),
            }
    for name, st in status.items():  # steps the deadline skipped have no section in the log
        if name.startswith("fast") and name not in record["steps"]:
            record["steps"][name] = st
    got = record["steps"]
    if any(name in got for name, _ in MPNET_TRAIN_ROWS + MPNET_RUNS):
        mpnet_tables(got, record)
    if not any(name in got for name, _ in TRAIN_ROWS + EVAL_ROWS):  # a fast-mpnet call alone
        write_record(record, json_path)
        return 0
    ref_rate = got.get("fast-ref", {}).get("tokens_per_second")
    print(f"\nissue 10, fast path: {gpu}")
    print("| recipe | tokens/s | epoch s | vs reference | MFU | peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in TRAIN_ROWS:
        f = got.get(name, {})
        rate = f.get("tokens_per_second")
        ratio = rate / ref_rate if rate and ref_rate else None
        f["ratio_to_reference"] = ratio
        print(
            f"| {label} | {num(rate, '{:,.0f}')} | {num(f.get('epoch_seconds_estimate'))} | "
            f"{num(ratio, '{:.2f}x')} | {num(f.get('mfu'), '{:.1%}')} | {gib(f.get('peak_memory_bytes'))} |"
        )
    print(
        "epoch s: estimated from tokens/s (the reference over its 25,000 train reviews, the project over "
        "the train split less validation); MFU against the detected GPU's data-sheet bf16 peak"
    )
    for name, label in TRAIN_ROWS:  # the profiled benches: kernels a step replays, the GPU's busy time
        prof = got.get(name, {}).get("profile") or {}
        if prof.get("device_kernels_per_step") is not None:
            print(
                f"{label}: {prof['device_kernels_per_step']:,.0f} device kernels per step, GPU busy "
                f"{num(prof.get('device_busy_ms_per_step'))} ms per step (profiled)"
            )
    for name, label in TRAIN_ROWS:  # what compiling cost: the compiled benches' first (untimed) step
        f = got.get(name, {})
        if "compiled" in name and f.get("first_step_seconds") is not None:
            print(
                f"{label}: first step {f['first_step_seconds']:.1f} s (compiling), "
                f"{num(f.get('warmup_seconds'))} s for all warm-up steps"
            )
    print("\n| evaluation of the test set | tokens/s (warm) | cold s | warm s | peak memory |")
    print("|---|---:|---:|---:|---:|")
    for name, label in EVAL_ROWS:
        f = got.get(name, {})
        print(
            f"| {label} | {num(f.get('tokens_per_second'), '{:,.0f}')} | "
            f"{num(f.get('cold_test_set_seconds_estimate'))} | {num(f.get('test_set_seconds_estimate'))} | "
            f"{gib(f.get('peak_memory_bytes'))} |"
        )
    train = got.get("fast-train-3-epochs", {})
    for e in train.get("epochs", []):
        print(
            f"train --epochs 3 ({train_how(train)}): epoch {e['epoch']} {e['train_s']:.1f}s train, {e['eval_s']:.1f}s eval"
        )
    print(f"train --epochs 3 wall: {num(train.get('wall_seconds'))} s")
    breakdown = run_breakdown(run_dir, train)
    if breakdown is not None:
        train["time_breakdown"] = breakdown
        print(f"train --epochs 3 time by phase (run.json): {breakdown_text(breakdown)}")
    best = max(
        (got.get(n, {}) for n, _ in TRAIN_ROWS if n != "fast-ref"),
        key=lambda f: f.get("tokens_per_second") or 0,
    )
    flat_eval = got.get("fast-bench-eval-flat", {})
    checks = {
        "ratio >= 6x": (best.get("ratio_to_reference"), TARGETS["ratio"], ">="),
        "epoch <= 10 s": (best.get("epoch_seconds_estimate"), TARGETS["epoch_s"], "<="),
        "test-set evaluation warm <= 3 s": (
            flat_eval.get("test_set_seconds_estimate"),
            TARGETS["eval_warm_s"],
            "<=",
        ),
        "3 epochs with evaluations <= 60 s wall": (
            train.get("wall_seconds"),
            TARGETS["train_3_epochs_wall_s"],
            "<=",
        ),
    }
    record["targets"] = {}
    for label, (value, target, op) in checks.items():
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        record["targets"][label] = {"value": value, "target": target, "met": met}
        print(
            f"target {label}: {num(value, '{:.2f}')} -> {'not measured' if met is None else 'met' if met else 'NOT met'}"
        )
    write_record(record, json_path)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fastest-captured"]:  # gpu-checks.sh: the 3-epoch run's extra flags
        print(fastest_captured(sys.argv[2]))
        sys.exit(0)
    sys.exit(main(*sys.argv[1:4]))
