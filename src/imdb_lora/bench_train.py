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
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_bench_train if name == "train" else cmd_bench_eval)


def _setup(ns: argparse.Namespace, split: str):
    from .data import load_imdb, resolve_imdb_path, stratified_subset
    from .model import build_model, compile_encoder, load_tokenizer, resolve_device
    from .tokcache import cached_encode

    for flag, v in (("--steps", ns.steps), ("--batch-size", ns.batch_size), ("--samples", ns.samples)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1")
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

    from .data import pad_batch
    from .model import autocast_for
    from .packing import pack, packed_logits, position_start, use_packing

    device, tok, seqs, labels, model, info = _setup(ns, "train")
    packed = use_packing(ns.batching, model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    rng = random.Random(0)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = 0
    for step in range(ns.warmup + ns.steps):
        if step == ns.warmup:
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        idx = rng.sample(range(len(seqs)), min(ns.batch_size, len(seqs)))
        batch = [seqs[i] for i in idx]
        y = torch.tensor([labels[i] for i in idx], device=device)
        with autocast_for(device):
            if packed:
                logits = packed_logits(
                    model, pack(batch, ns.max_length, tok.pad_token_id, position_start(model)).to(device)
                )
            else:
                ids, mask = pad_batch(batch, tok.pad_token_id)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(s) for s in batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    epoch_tokens = sum(len(s) for s in seqs) * (25000 / len(seqs))
    report = _report(ns, "train", device, model, info, tokens, seconds, seqs, packed)
    report["epoch_seconds_estimate"] = epoch_tokens / report["tokens_per_second"]
    report["epoch_tokens"] = int(epoch_tokens)
    _print(report, ns.json)
    return 0


def cmd_bench_eval(ns: argparse.Namespace) -> int:
    import torch

    from .model import batched_logits
    from .packing import use_packing

    device, tok, seqs, labels, model, info = _setup(ns, "test")
    packed = use_packing(ns.batching, model, device)
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
    _print(report, ns.json)
    return 0


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
        if k == "peak_memory_bytes":
            v = fmt_bytes(v)
        elif isinstance(v, float):
            v = f"{v:.4f}" if k == "mfu" else f"{v:,.1f}"
        print(f"{k:<{width}}  {v}")
