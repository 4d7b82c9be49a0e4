"""`imdb-lora bench train` and `bench eval`: where the training and evaluation time goes.

Both run the project's own step (the same code as `train`/`evaluate`) on real IMDB reviews, so the
length distribution is the real one, and report real tokens/s (padding excluded), the estimated epoch
or test-set time, peak memory, and model FLOP utilisation (MFU: model FLOPs per second over the
device's peak). `--random-init` gives speed without weights (speed does not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import UserError

if TYPE_CHECKING:
    import torch

# Dense bf16 peak of the H100 as measured on the project's GPU machine (docs/GPU.md); pass
# --peak-tflops for other devices. On CPU the peak is measured with an fp32 matmul.
H100_MEASURED_BF16_TFLOPS = 790.0


def add_bench_train_parsers(sub) -> None:
    for name, helptext in (
        ("train", "training throughput: tokens/s, epoch estimate, peak memory, MFU"),
        ("eval", "evaluation throughput: tokens/s, test-set seconds, peak memory, MFU"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default="roberta-base", help="model folder or hub id")
        p.add_argument("--random-init", action="store_true", help="random weights (speed only)")
        p.add_argument("--data", help="IMDB folder/archive (default: $IMDB_LORA_DATA)")
        p.add_argument("--method", choices=["lora", "full"], default="lora")
        p.add_argument("--batching", choices=["auto", "padded", "packed"], default="auto")
        p.add_argument("--batch-size", type=int, default=32 if name == "train" else 256)
        p.add_argument("--max-length", type=int, default=512)
        p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup steps)")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocation, kernels)")
        p.add_argument("--samples", type=int, default=25000, help="reviews to draw lengths from")
        p.add_argument("--device", default="auto")
        p.add_argument(
            "--peak-tflops", type=float, help="device peak for MFU (default: H100 bf16 / CPU measured)"
        )
        p.add_argument("--compile", action="store_true", help="torch.compile the encoder (dynamic shapes)")
        p.add_argument(
            "--profile",
            type=int,
            default=0,
            metavar="N",
            help="after timing, profile N more steps (batches for eval): host ops and device kernels per "
            "step, the device's busy fraction, the costliest ops",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_bench_train if name == "train" else cmd_bench_eval)


def _setup(ns: argparse.Namespace, split: str):
    from .data import load_imdb, resolve_imdb_path, stratified_subset
    from .model import build_model, compile_encoder, load_tokenizer, resolve_device
    from .tokcache import cached_encode

    for flag, v in (("--steps", ns.steps), ("--batch-size", ns.batch_size), ("--samples", ns.samples)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1")
    if ns.profile < 0:
        raise UserError("--profile must be >= 0")
    cfg = Config()
    cfg.model.name, cfg.model.random_init = ns.model, ns.random_init
    cfg.train.method, cfg.train.batching, cfg.data.max_length = ns.method, ns.batching, ns.max_length
    cfg.validate()
    device = resolve_device(ns.device)
    tok = load_tokenizer(ns.model)
    data = load_imdb(resolve_imdb_path(ns.data))[split]
    data = data.take(stratified_subset(data.labels, ns.samples, 0))
    seqs = cached_encode(tok, data.texts, ns.max_length)
    model, info = build_model(cfg)
    model = model.to(device)
    if ns.compile:  # compiling happens in the untimed warm-up steps
        compile_encoder(model)
    return device, tok, seqs, data.labels, model, info


def model_flops_per_token(model, seq_len: float, train: bool, lora: bool) -> float:
    """Matmul FLOPs per token: 2 per weight (embeddings excluded) plus attention, times 3 for full
    training (forward, input and weight gradients) or 2 for LoRA (frozen weights get no gradient)."""
    from .packing import classifier_of

    m = classifier_of(model)
    c = m.config
    emb = sum(p.numel() for n, p in m.named_parameters() if "embeddings" in n and "lora" not in n)
    dense = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "lora" not in n) - emb
    forward = 2 * dense + 4 * c.num_hidden_layers * c.hidden_size * seq_len
    return forward * ((2 if lora else 3) if train else 1)


def device_peak_flops(device: torch.device, given: float | None) -> tuple[float, str]:
    import torch

    if given:
        return given * 1e12, "given"
    if device.type == "cuda":
        return H100_MEASURED_BF16_TFLOPS * 1e12, "H100 bf16 measured (docs/GPU.md)"
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - t0), "CPU fp32 matmul measured"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_bench_train(ns: argparse.Namespace) -> int:
    import torch

    from .model import forward_logits
    from .packing import use_packing

    device, tok, seqs, labels, model, info = _setup(ns, "train")
    packed = use_packing(ns.batching, model, device, training=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    rng = random.Random(0)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step() -> int:
        idx = rng.sample(range(len(seqs)), min(ns.batch_size, len(seqs)))
        batch = [seqs[i] for i in idx]
        y = torch.tensor([labels[i] for i in idx], device=device)
        logits = forward_logits(model, batch, tok.pad_token_id, device, packed, row_tokens=ns.max_length)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(s) for s in batch)

    for _ in range(ns.warmup):
        one_step()
    _sync(device)
    t0 = time.perf_counter()
    tokens = sum(one_step() for _ in range(ns.steps))
    _sync(device)
    seconds = time.perf_counter() - t0
    epoch_tokens = sum(len(s) for s in seqs) * (25000 / len(seqs))
    report = _report(ns, "train", device, model, info, tokens, seconds, seqs, packed)
    report["epoch_seconds_estimate"] = epoch_tokens / report["tokens_per_second"]
    report["epoch_tokens"] = int(epoch_tokens)
    if ns.profile:
        report["profile"] = profile_steps(one_step, ns.profile, device)
    _print(report, ns.json)
    return 0


def cmd_bench_eval(ns: argparse.Namespace) -> int:
    import torch

    from .model import batched_logits
    from .packing import use_packing

    device, tok, seqs, labels, model, info = _setup(ns, "test")
    packed = use_packing(ns.batching, model, device, training=False)
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = sorted(seqs, key=len)[-ns.batch_size :]
    batched_logits(model, warm, tok.pad_token_id, ns.batch_size, device, packed=packed)  # allocation, kernels
    _sync(device)
    t0 = time.perf_counter()
    batched_logits(model, seqs, tok.pad_token_id, ns.batch_size, device, packed=packed)
    _sync(device)
    seconds = time.perf_counter() - t0
    report = _report(ns, "eval", device, model, info, sum(len(s) for s in seqs), seconds, seqs, packed)
    report["reviews"] = len(seqs)
    report["test_set_seconds_estimate"] = seconds * 25000 / len(seqs)
    if ns.profile:
        batches = iter([seqs[i : i + ns.batch_size] for i in range(0, len(seqs), ns.batch_size)])

        def one_batch() -> None:
            chunk = next(batches, warm)  # past the end (more batches than reviews): the longest again
            batched_logits(model, chunk, tok.pad_token_id, ns.batch_size, device, packed=packed)

        report["profile"] = profile_steps(one_batch, ns.profile, device)
    _print(report, ns.json)
    return 0


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


def _report(ns, kind, device, model, info, tokens, seconds, seqs, packed) -> dict[str, Any]:
    import torch

    from .train import peak_memory

    rate = tokens / seconds
    mean_len = sum(len(s) for s in seqs) / len(seqs)
    flops = model_flops_per_token(model, mean_len, kind == "train", ns.method == "lora") * rate
    peak, peak_source = device_peak_flops(device, ns.peak_tflops)
    mem, mem_kind = peak_memory(device)
    return {
        "bench": kind,
        "model": ns.model + (" (random init)" if ns.random_init else ""),
        "model_type": info["model_type"],
        "method": ns.method,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batching": "packed" if packed else "padded",
        "compiled": ns.compile,
        "batch_size": ns.batch_size,
        "max_length": ns.max_length,
        "tokens_per_second": rate,
        "reviews_per_second": rate / mean_len,
        "mean_review_tokens": mean_len,
        "model_tflops_per_second": flops / 1e12,
        "mfu": flops / peak,
        "mfu_peak_source": peak_source,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        "timed_seconds": seconds,
    }


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    from .report import fmt_bytes

    width = max(map(len, report))
    for k, v in report.items():
        if k == "profile":
            continue
        if k == "peak_memory_bytes":
            v = fmt_bytes(v)
        elif isinstance(v, float):
            v = f"{v:.4f}" if k == "mfu" else f"{v:,.1f}"
        print(f"{k:<{width}}  {v}")
    if "profile" in report:
        _print_profile(report["profile"])


def _print_profile(prof: dict[str, Any]) -> None:
    print(f"\nprofile of {prof['steps']} step(s), per step:")
    for k, v in prof.items():
        if k not in ("steps", "top"):
            print(f"  {k:<26}{v:,.3f}" if isinstance(v, float) else f"  {k:<26}{v}")
    print(f"  {'ms':>9} {'calls':>7}  costliest {'kernels' if 'device_kernels_per_step' in prof else 'ops'}")
    for row in prof["top"]:
        print(f"  {row['ms_per_step']:9.3f} {row['calls_per_step']:7.1f}  {row['name']}")
