"""LoRA merged into the base weights for an evaluation pass, restored exactly afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[None]:
    """Fold every LoRA adapter into its base weight (in the base weight's dtype, bf16 on CUDA when the
    frozen weights are stored in bf16) for the duration of the block: one matmul per module instead of
    three. The base weights are copied first and put back bit for bit (unmerging by subtraction would
    not restore bf16 weights exactly), so training continues from the same weights."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged]
    saved = [(m, m.get_base_layer().weight.detach().clone()) for m in layers]
    try:
        for m in layers:
            m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, weight in saved:
                m.get_base_layer().weight.copy_(weight)
                m.merged_adapters.clear()


def frozen_weights_to_bf16(model: nn.Module) -> int:
    """Store the frozen Linear weights (and biases) in bf16, once, instead of having autocast cast them
    at every step; returns how many tensors were converted. Under bf16 autocast a Linear computes with
    bf16 copies of its fp32 weight anyway, so the results are the same; trainable parameters (LoRA, the
    head) and their optimizer state stay fp32. CUDA only: the CPU path runs fp32 without autocast."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is not None and not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
                    n += 1
    return n
