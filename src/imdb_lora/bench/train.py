"""Where training and evaluation time goes (`bench train`, `bench eval`).

Both run the project's own step and forward (the same code as `train`/`evaluate`) on real IMDB reviews,
so the length distribution is the real one, and report real tokens/s (padding excluded), the estimated
epoch or test-set time, peak memory, and model FLOP utilisation (MFU: model FLOPs per second over the
detected device's peak). `random_init` gives speed without weights (speed does not depend on weights).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..data.batches import to_device
from ..data.imdb import load_imdb, resolve_imdb_source
from ..data.splits import stratified_split, stratified_subset
from ..data.tokcache import cached_encode
from ..errors import UserError, counted
from ..metrics import peak_memory
from ..modeling.flat import batching_path, flat_options_check
from ..modeling.forward import batched_logits, compile_encoder
from ..modeling.load import check_max_length, load_tokenizer, resolve_device
from ..modeling.lora import build_model
from ..modeling.merge import frozen_weights_to_bf16
from ..modeling.packing import classifier_of
from ..runs.report import fmt_bytes
from ..training.graphs import CapturedSteps, make_optimizer
from ..training.step import train_step
from ..training.step_rewrites import step_extras

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), matched against
# torch.cuda.get_device_name(); the first key found in the name wins, so a key that contains another
# (GH200 > H200, H100 PCIe > H100, A100 > A10, L40S > L40 > L4) comes first.
GPU_BF16_PEAK_TFLOPS = {
    "GH200": 989.0,  # before H200, which its name contains
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16: V100 has no bf16 tensor cores
    "T4": 65.0,  # fp16
}


@dataclass
class ThroughputOptions:
    """What `bench train` / `bench eval` measure; the CLI fills it from its flags."""

    model: str = "roberta-base"  # model folder or hub id
    random_init: bool = False  # random weights: speed only
    data: str | None = None  # IMDB folder/archive (default: $IMDB_LORA_DATA, else download)
    method: str = "lora"  # lora or full
    batching: str = "auto"  # auto, padded, packed or flat (see config.TrainConfig.batching)
    batch_size: int = 32  # reviews per step (train) or per batch (eval)
    max_length: int = 512  # tokens per review after truncation
    steps: int = 30  # timed steps (train), after `warmup` untimed ones
    warmup: int = 3  # untimed steps first: allocation, kernel selection, compilation
    samples: int | None = None  # reviews to draw from (None: the whole split; more is refused)
    device: str = "auto"
    peak_tflops: float | None = None  # device peak for MFU (default: the detected GPU's data sheet)
    compile: bool = False  # torch.compile each encoder layer (regional, dynamic shapes)
    cuda_graphs: bool = False  # flat training steps captured as CUDA graphs per bucket (CUDA)
    bf16_working_copies: bool = False  # bf16 working copies of the trainable weights (training/working.py)
    fused_qkv: bool = False  # q, k and v fused in the step (training/fused.py)
    profile: int = 0  # after timing, profile this many more steps/batches

    def validate(self) -> ThroughputOptions:
        for flag, v in (
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--samples", 1 if self.samples is None else self.samples),
        ):
            if v < 1:
                raise UserError(f"{flag} must be >= 1")
        for flag, v in (("--warmup", self.warmup), ("--profile", self.profile)):
            if v < 0:
                raise UserError(f"{flag} must be >= 0")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < math.inf:  # also refuses NaN
            raise UserError(f"--peak-tflops must be > 0 (got {self.peak_tflops})")
        return self


def _progress(desc: str, total: int, unit: str):
    """A bar on stderr (stdout is the report): reading, tokenizing and timing take minutes on a CPU.
    Its update costs microseconds, against the milliseconds of a step or batch it counts."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def _check_batch(opts: ThroughputOptions, reviews: int) -> None:
    """A training step draws --batch-size reviews from those drawn; fewer would be reported as more."""
    if opts.batch_size > reviews:
        drawn = "the whole train split" if opts.samples is None else f"--samples {opts.samples}"
        raise UserError(
            f"--batch-size {opts.batch_size} is more than the {counted(reviews, 'review')} drawn ({drawn}); "
            "lower --batch-size" + ("" if opts.samples is None else " or raise --samples")
        )


def _setup(opts: ThroughputOptions, split: str):
    opts.validate()
    cfg = Config()
    cfg.model.name, cfg.model.random_init = opts.model, opts.random_init
    cfg.train.method, cfg.train.batching, cfg.data.max_length = opts.method, opts.batching, opts.max_length
    cfg.train.cuda_graphs = opts.cuda_graphs
    cfg.train.bf16_working_copies = opts.bf16_working_copies and split == "train"
    cfg.train.fused_qkv = opts.fused_qkv and split == "train"
    cfg.validate()
    check_max_length(opts.model, opts.max_length)  # else a long review fails deep in the forward
    if split == "train" and opts.samples is not None:
        _check_batch(opts, opts.samples)
    device = resolve_device(opts.device)
    tok = load_tokenizer(opts.model)
    path, origin = resolve_imdb_source(opts.data)
    print(f"reading {path} ...", file=sys.stderr, flush=True)
    full = load_imdb(path, origin)[split]
    # The real run sees the train split (train less validation) or the whole test split.
    split_size = (
        len(stratified_split(full.labels, cfg.data.val_size, cfg.train.seed)[0])
        if split == "train"
        else len(full)
    )
    if opts.samples is not None and opts.samples > len(full):  # else fewer would be timed than asked
        raise UserError(
            f"--samples {opts.samples}: the {split} split has only {counted(len(full), 'review')}"
        )
    data = full.take(stratified_subset(full.labels, opts.samples, 0))
    if split == "train":
        _check_batch(opts, len(data))
    seqs = cached_encode(tok, data.texts, opts.max_length, progress="tokenize")
    model, info = build_model(cfg)
    model = model.to(device)
    path = batching_path(opts.batching, model, device, training=split == "train")
    train = split == "train"
    t = cfg.train
    flat_options_check(
        model, path, opts.compile, opts.cuda_graphs and train, t.bf16_working_copies, t.fused_qkv
    )
    if path == "flat" and device.type == "cuda" and opts.method == "lora":
        frozen_weights_to_bf16(model)  # as the trainer does on the flat path
    if opts.compile:  # compiling happens in the untimed warm-up steps
        compile_encoder(model)
    return cfg, device, tok, seqs, data.labels, model, info, split_size, path


def model_flops_per_token(model, seq_len: float, train: bool, lora: bool) -> float:
    """Matmul FLOPs per token: 2 per weight (embeddings excluded) plus attention, times 3 for full
    training (forward, input and weight gradients) or 2 for LoRA (frozen weights get no gradient)."""
    m = classifier_of(model)
    c = m.config
    emb = sum(p.numel() for n, p in m.named_parameters() if "embeddings" in n and "lora" not in n)
    dense = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "lora" not in n) - emb
    forward = 2 * dense + 4 * c.num_hidden_layers * c.hidden_size * seq_len
    return forward * ((2 if lora else 3) if train else 1)


def device_peak_flops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from): given, the detected GPU's data sheet, or a measured CPU matmul."""
    if given:
        return given * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} dense bf16 data sheet"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    return cpu_peak_flops()


CPU_PEAK_TRIALS = 5


def cpu_peak_flops() -> tuple[float, str]:
    """The CPU's fp32 matmul rate, best of short trials, at the threads the bench ran with (same process).
    A CPU has no data-sheet figure here, so the peak is measured: a trial slowed by other work on the
    machine reads it low, and the best trial the least so (6 matmuls in all, as the single trial took)."""
    a = torch.randn(1024, 1024)
    a @ a  # warm-up: the first call pays for allocation and thread start-up
    best = 0.0
    for _ in range(CPU_PEAK_TRIALS):
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    threads = torch.get_num_threads()
    return (
        best,
        f"CPU fp32 matmul measured (best of {CPU_PEAK_TRIALS}, {threads} thread{'s' * (threads > 1)})",
    )


def mfu_of(flops: float, peak: float | None, source: str) -> tuple[float | None, str]:
    """(MFU, what it is against). A model cannot run faster than the device's peak: past 1, the peak was
    wrong (on a CPU: measured while other work slowed it), so no MFU is given and the source says why."""
    if not peak:
        return None, source
    if flops > peak:
        return None, (
            f"{source}: {flops / 1e12:.3g} TFLOP/s of model work beat this peak "
            f"({peak / 1e12:.3g} TFLOP/s), so it is too low (other work on the machine?); no MFU"
        )
    return flops / peak, source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(opts: ThroughputOptions) -> dict[str, Any]:
    """Timed training steps of the real recipe (its step function, lr and clipping) on real reviews."""
    cfg, device, tok, seqs, labels, model, info, split_size, path = _setup(opts, "train")
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = opts.cuda_graphs and device.type == "cuda"
    if opts.cuda_graphs and not graphs:  # the report says cuda_graphs false; say why up front too
        print(f"--cuda-graphs: no effect on {device.type} (CUDA only)", file=sys.stderr, flush=True)
    opt = make_optimizer(params, cfg.train, device, captured=graphs)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    working, fused = step_extras(model, path, device, opts.bf16_working_copies, opts.fused_qkv, say)
    captured = (
        CapturedSteps(
            model,
            opt,
            params,
            cfg.train,
            device,
            tok.pad_token_id,
            opts.batch_size,
            opts.max_length,
            working=working,
            fused=fused,
        )
        if graphs
        else None
    )
    rng = random.Random(0)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step() -> int:
        idx = rng.sample(range(len(seqs)), min(opts.batch_size, len(seqs)))
        batch = [seqs[i] for i in idx]
        y = to_device(torch.tensor([labels[i] for i in idx]), device)  # no sync, as in train
        train_step(
            model,
            opt,
            params,
            batch,
            y,
            tok.pad_token_id,
            device,
            path,
            cfg.train.lr,
            cfg.train,
            opts.max_length,
            captured=captured,
            working=working,
            fused=fused,
        )
        return sum(len(s) for s in batch)

    warmup_seconds = []  # each warm-up step's own time: the first pays compilation (--compile)
    with _progress("warm-up steps (untimed)", opts.warmup, "step") as bar:
        for _ in range(opts.warmup):
            t0 = time.perf_counter()
            one_step()
            _sync(device)
            warmup_seconds.append(time.perf_counter() - t0)
            bar.update()
    _sync(device)
    with _progress("timed steps", opts.steps, "step") as bar:
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(opts.steps):
            tokens += one_step()
            bar.update()
        _sync(device)
        seconds = time.perf_counter() - t0
    epoch_tokens = sum(len(s) for s in seqs) * (split_size / len(seqs))
    report = _report(opts, "train", device, model, info, tokens, seconds, seqs, path)
    report["cuda_graphs"] = captured is not None
    # the working copies' dtype (bf16 on CUDA, fp32 without autocast), or None without them
    report["working_copies"] = None if working is None else str(working.dtype).removeprefix("torch.")
    report["fused_qkv"] = fused is not None
    report["first_step_seconds"] = warmup_seconds[0] if warmup_seconds else None
    report["warmup_seconds"] = sum(warmup_seconds)
    report["epoch_reviews"] = split_size
    report["epoch_seconds_estimate"] = epoch_tokens / report["tokens_per_second"]
    report["epoch_tokens"] = int(epoch_tokens)
    if opts.profile:
        report["profile"] = profile_steps(one_step, opts.profile, device)
    return report


def bench_eval(opts: ThroughputOptions) -> dict[str, Any]:
    """Two timed passes of the evaluation forward over real test reviews: cold (the first, which pays
    for allocation, kernel selection and each new batch shape) and warm (the second)."""
    _, device, tok, seqs, _, model, info, split_size, path = _setup(opts, "test")
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    passes = []
    for name in ("cold pass", "warm pass"):
        with _progress(name, len(seqs), "review") as bar:
            _sync(device)
            t0 = time.perf_counter()
            batched_logits(model, seqs, tok.pad_token_id, opts.batch_size, device, bar, packed=path)
            _sync(device)
            passes.append(time.perf_counter() - t0)
    cold, seconds = passes
    report = _report(opts, "eval", device, model, info, sum(len(s) for s in seqs), seconds, seqs, path)
    # both passes are timed: say which one the rates come from
    report["warm_seconds"] = report.pop("timed_seconds")
    report["reviews"] = len(seqs)
    report["cold_seconds"] = cold
    report["cold_test_set_seconds_estimate"] = cold * split_size / len(seqs)
    report["test_set_seconds_estimate"] = seconds * split_size / len(seqs)  # warm
    if opts.profile:
        batches = iter([seqs[i : i + opts.batch_size] for i in range(0, len(seqs), opts.batch_size)])
        longest = sorted(seqs, key=len)[-opts.batch_size :]

        def one_batch() -> None:
            chunk = next(batches, longest)  # past the end (more batches than reviews): the longest
            batched_logits(model, chunk, tok.pad_token_id, opts.batch_size, device, packed=path)

        report["profile"] = profile_steps(one_batch, opts.profile, device)
    return report


def profile_steps(
    run: Callable[[], object], steps: int, device: torch.device, top: int = 10
) -> dict[str, Any]:
    """Run `run` `steps` times under torch.profiler and say where the time went, per step.

    host_ops: aten ops called from Python or autograd (nested aten calls not counted), each one a
    dispatch the host pays for. On CUDA, device_busy_fraction = kernel time / wall time: near 1 the
    GPU is the limit; far below 1 the host (Python, launches, syncs) is. The profiler's own overhead
    makes wall time longer than in the timed run. `top`: the costliest ops (CPU) or kernels (CUDA).
    """
    from collections import defaultdict

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        _sync(device)
    wall = time.perf_counter() - t0
    events = prof.events()

    def is_aten(e) -> bool:
        return e.device_type == DeviceType.CPU and e.name.startswith("aten::")

    host_ops = sum(1 for e in events if is_aten(e) and not (e.cpu_parent and is_aten(e.cpu_parent)))
    if cuda:
        timed = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.name, e.self_cpu_time_total) for e in events if is_aten(e)]
    cost: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in timed:
        cost[name][0] += us
        cost[name][1] += 1
    busiest = sorted(cost.items(), key=lambda kv: -kv[1][0])[:top]
    out: dict[str, Any] = {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "host_ops_per_step": host_ops / steps,
    }
    if cuda:
        busy_us = sum(us for _, us in timed)
        out["device_kernels_per_step"] = len(timed) / steps
        out["device_busy_ms_per_step"] = busy_us / 1e3 / steps
        out["device_busy_fraction"] = busy_us / 1e6 / wall
    out["top"] = [
        {"name": name[:90], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
        for name, (us, n) in busiest
    ]
    return out


def _report(
    opts: ThroughputOptions, kind, device, model, info, tokens, seconds, seqs, path: str
) -> dict[str, Any]:
    rate = tokens / seconds
    mean_len = sum(len(s) for s in seqs) / len(seqs)
    flops = model_flops_per_token(model, mean_len, kind == "train", opts.method == "lora") * rate
    mfu, peak_source = mfu_of(flops, *device_peak_flops(device, opts.peak_tflops))
    mem, mem_kind = peak_memory(device)
    return {
        "bench": kind,
        "model": opts.model + (" (random init)" if opts.random_init else ""),
        "model_type": info["model_type"],
        "method": opts.method,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batching": path,
        "compiled": opts.compile,
        "batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "tokens_per_second": rate,
        "reviews_per_second": rate / mean_len,
        "mean_review_tokens": mean_len,
        "model_tflops_per_second": flops / 1e12,
        "mfu": mfu,
        "mfu_peak_source": peak_source,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        "timed_seconds": seconds,
    }


def format_report(report: dict[str, Any]) -> str:
    width = max(map(len, report))
    lines = []
    for k, v in report.items():
        if k == "profile":
            continue
        if k == "peak_memory_bytes":
            v = fmt_bytes(v)
        elif isinstance(v, float):  # small figures keep 3 significant digits (0.031 TFLOP/s, not 0.0)
            v = f"{v:.4f}" if k == "mfu" else f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        elif isinstance(v, int) and not isinstance(v, bool):  # counts read as the floats beside them do
            v = f"{v:,}"
        elif v is None:
            v = "–"
        lines.append(f"{k:<{width}}  {v}")
    if "profile" in report:
        lines.append(format_profile(report["profile"]))
    return "\n".join(lines)


def format_profile(prof: dict[str, Any]) -> str:
    lines = []
    lines.append(f"\nprofile of {counted(prof['steps'], 'step')}, per step:")
    for k, v in prof.items():
        if k not in ("steps", "top"):
            lines.append(f"  {k:<26}{v:,.3f}" if isinstance(v, float) else f"  {k:<26}{v}")
    lines.append(
        f"  {'ms':>9} {'calls':>7}  costliest {'kernels' if 'device_kernels_per_step' in prof else 'ops'}"
    )
    for row in prof["top"]:
        lines.append(f"  {row['ms_per_step']:9.3f} {row['calls_per_step']:7.1f}  {row['name']}")
    return "\n".join(lines)
