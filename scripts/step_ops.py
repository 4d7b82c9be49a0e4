#!/usr/bin/env python3
"""Count the ops of one flat training step on the CPU, as the GPU would run them (graphs.py docstring).

    PYTHONPATH=src python scripts/step_ops.py MODEL [--batch-size 32] [--tokens 64]

MODEL: a model folder or hub id (random init: the op count does not depend on the weights). The step is
the captured step's own code (CapturedSteps, uncaptured) with the recipe a CUDA run has: LoRA with the
default settings, the frozen weights stored in bf16, bf16 autocast, and the varlen attention counted as
one op forward and one backward (the flash kernel; the CPU reference runs it review by review). It runs
three steps and counts the third: as today (fp32 trainable weights cast at each use), with
--bf16-working-copies (training/working.py), with --fused-qkv (training/fused.py) and with both, and
prints per step: non-view ops, dtype casts (one tensor's copy to another dtype), multi-tensor copies,
gradient accumulations (add_ into a gradient).
A CUDA graph replays about one kernel per non-view op (a multi-tensor copy is one or a few), so the
counts say how many kernels a change removes; timing is the GPU's (scripts/gpu-checks.sh part fast).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
_FOREACH_COPY = torch.ops.aten._foreach_copy_.default
# ops that launch no kernel: allocations and metadata-only reshapes (views are skipped by their tag)
_NO_KERNEL = {
    "_unsafe_view",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
}


class StepOps(TorchDispatchMode):
    """Counts the kernel-launching ops dispatched inside it: `ops`, `casts` (single-tensor copies that change
    the dtype), `foreach_casts` (multi-tensor copies that do), `grad_adds` (in-place adds into a
    .grad, as autograd accumulates), and `by_op` (op name -> count). `paused` stops counting."""

    def __init__(self):
        super().__init__()
        self.ops = self.casts = self.foreach_casts = self.grad_adds = 0
        self.by_op: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            self.paused
            or func.namespace != "aten"
            or func.is_view
            or func.__name__.split(".")[0] in _NO_KERNEL
        ):
            return out  # no kernel; profiler markers are not ops
        self.ops += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        if func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            self.casts += src.dtype != dst.dtype
        elif func is _FOREACH_COPY:
            self.foreach_casts += any(a.dtype != b.dtype for a, b in zip(args[0], args[1]))
        return out

    @contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def figures(self) -> dict[str, int]:
        return {
            "ops": self.ops,
            "casts": self.casts,
            "foreach_casts": self.foreach_casts,
            "grad_accumulations": self.by_op["add_"],
        }


def attention_as_one_op(counter: StepOps):
    """A stand-in for modeling.flat.varlen_attention that computes the CPU reference uncounted and
    counts one op forward and one backward, as the flash kernel and its backward are."""
    from imdb_lora.modeling import flat

    reference = flat.varlen_attention

    class OneOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu, max_len, dropout, scale):
            with counter.pause(), torch.no_grad():
                out = reference(q, k, v, cu, max_len, dropout, scale)
            ctx.save_for_backward(q, k, v, cu)
            ctx.args = (max_len, dropout, scale)
            counter.ops += 1
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, cu = ctx.saved_tensors
            with counter.pause(), torch.enable_grad():
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                out = reference(*qkv, cu, *ctx.args)
                grads = torch.autograd.grad(out, qkv, grad)
            counter.ops += 1
            return (*grads, None, None, None, None)

    return lambda q, k, v, cu, max_len, dropout, scale: OneOp.apply(q, k, v, cu, max_len, dropout, scale)


def build(model_name: str, seed: int = 0):
    """The LoRA model of the default recipe on a random-init `model_name`, frozen weights in bf16."""
    from imdb_lora.config import Config
    from imdb_lora.modeling.lora import build_model
    from imdb_lora.modeling.merge import frozen_weights_to_bf16

    cfg = Config()
    cfg.model.name, cfg.model.random_init = model_name, True
    cfg.train.seed = seed
    model, _ = build_model(cfg.validate())
    frozen_weights_to_bf16(model)
    return model.train(), cfg


# the rows: (--bf16-working-copies, --fused-qkv)
HOWS = {
    "today": (False, False),
    "working copies": (True, False),
    "fused q/k/v": (False, True),
    "working + fused": (True, True),
}


def count_step(  # noqa: PLR0913
    model_name: str,
    working: bool,
    batch_size: int = 32,
    tokens: int = 64,
    steps: int = 3,
    top: int = 0,
    fused: bool = False,
) -> dict[str, int]:
    """Figures of the last of `steps` static-buffer steps (bf16 autocast on the CPU)."""
    from imdb_lora.modeling import flat
    from imdb_lora.training.fused import FusedQKV
    from imdb_lora.training.graphs import CapturedSteps
    from imdb_lora.training.working import WorkingCopies

    model, cfg = build(model_name)
    pad_id = model.get_base_model().config.pad_token_id
    vocab = model.get_base_model().config.vocab_size
    cpu = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW and foreach clipping, as on CUDA (make_optimizer keeps the CPU's per-tensor AdamW)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    fuse = FusedQKV(model) if fused else None
    copies = WorkingCopies(model, torch.bfloat16, fused=fuse) if working else None
    steps_ = CapturedSteps(
        model,
        opt,
        params,
        cfg.train,
        cpu,
        pad_id,
        batch_size,
        tokens,
        capture=False,
        working=copies,
        fused=fuse,
    )
    steps_.autocast = True  # as on CUDA
    rng = random.Random(0)
    seqs = [[0] + [rng.randrange(5, vocab) for _ in range(tokens - 2)] + [2] for _ in range(batch_size)]
    labels = torch.tensor([i % 2 for i in range(batch_size)])
    counter = StepOps()
    saved = flat.varlen_attention
    flat.varlen_attention = attention_as_one_op(counter)
    try:
        for i in range(steps):
            if i < steps - 1:
                steps_.step(seqs, labels, cfg.train.lr)
                continue
            with counter:
                steps_.step(seqs, labels, cfg.train.lr)
    finally:
        flat.varlen_attention = saved
    if top:
        print(counter.by_op.most_common(top))
    return counter.figures()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--tokens", type=int, default=64, help="tokens per review (the count does not depend on it)"
    )
    p.add_argument("--top", type=int, default=0, help="also print the N most frequent ops of each step")
    a = p.parse_args()
    torch.manual_seed(0)
    rows = {
        how: count_step(a.model, working, a.batch_size, a.tokens, top=a.top, fused=fused)
        for how, (working, fused) in HOWS.items()
    }
    keys = list(rows["today"])
    print(f"{'per step':<16}" + "".join(f"{k:>20}" for k in keys) + f"{'ops cut':>10}")
    for how, row in rows.items():
        cut = 1 - row["ops"] / rows["today"]["ops"]
        print(f"{how:<16}" + "".join(f"{row[k]:>20,}" for k in keys) + f"{cut:>10.1%}")


if __name__ == "__main__":
    main()
