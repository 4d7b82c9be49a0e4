"""The training step's optional rewrites, built together and swapped in together: --bf16-working-copies
(working.py) and --fused-qkv (fused.py). Here, above both: working.py reads FusedQKV's groups, so fused.py
must not import working.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..config import Given
from .fused import FusedQKV
from .working import WorkingCopies, working_dtype


def step_extras(
    model: nn.Module,
    path: str,
    device: torch.device,
    working_copies: bool,
    fused_qkv: bool,
    say: Callable[[str], None],
    given: Given | None = None,
) -> tuple[WorkingCopies | None, FusedQKV | None]:
    """--bf16-working-copies and --fused-qkv for the training step, built after the model is placed,
    its frozen weights converted and any checkpoint loaded (the copies start from the loaded weights).
    Flat path only: on another (--pooling mean trains padded) each asked for is said to have no effect.
    `given`: where the settings came from (config.Given): notes and refusals name a setting by its flag,
    or by the --config file and key that set it (by its flag when None)."""
    given = given or Given()
    name = given.where
    if path != "flat":
        for key, on in (("train.bf16_working_copies", working_copies), ("train.fused_qkv", fused_qkv)):
            if on:
                say(f"{name(key)}: no effect with the {path} path (flat only)")
        return None, None
    fused = FusedQKV(model, given) if fused_qkv else None
    dtype = working_dtype(device)
    if working_copies and dtype == torch.float32:  # run, as on CUDA, but they change nothing here
        say(
            f"{name('train.bf16_working_copies')}: no effect on {device.type} (no autocast: the copies are fp32, the same computation)"
        )
    working = WorkingCopies(model, dtype, fused=fused) if working_copies else None
    return working, fused


@contextmanager
def step_swaps(working: WorkingCopies | None, fused: FusedQKV | None) -> Iterator[None]:
    """What the step's forward runs inside: the working copies swapped in, the fused q/k/v."""
    with working.swapped() if working is not None else nullcontext():
        with fused.swapped() if fused is not None else nullcontext():
            yield
