"""Metrics shared by training, evaluation and the benches: loss, accuracy, peak memory, the machine."""

from __future__ import annotations

import os
import platform
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


def machine() -> dict[str, object]:
    """The machine a run computed on, in words a reader can compare (no host name, no path): CPU model,
    logical CPUs, torch's threads and, on CUDA, the GPU's name."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out: dict[str, object] = {
        "cpu": cpu or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.system(),
    }
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out
