"""Metrics shared by training, evaluation and the benches: loss, accuracy, peak memory."""

from __future__ import annotations

import resource

import torch
import torch.nn.functional as F


def loss_and_accuracy(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    y = torch.tensor(labels)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU (torch max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU (process peak RSS)"
