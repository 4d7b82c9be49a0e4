"""Learning-rate schedule and the per-epoch data order (a function of seed and epoch alone)."""

from __future__ import annotations

import torch


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to `peak`, then linear decay to 0 at `total` steps."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()
