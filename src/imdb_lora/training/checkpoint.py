"""Resume state: trainable weights, optimizer moments, RNG state and progress in one safetensors file.

Written with an atomic rename, so a crash leaves the previous checkpoint valid; read back into the
same model and optimizer, so a resumed run continues exactly where the saved one stood.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import UserError
from ..modeling.load import open_to_readers

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Progress:
    """Where the loop stands; saved in the checkpoint's metadata."""

    epoch: int = 1  # epoch being trained (1-based)
    step_in_epoch: int = 0  # optimizer steps done in this epoch
    global_step: int = 0
    loss_sum: float = 0.0  # running train loss x examples, this epoch
    correct: int = 0
    seen: int = 0
    epoch_train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_weights: str = "raw"  # raw, or ema: the moving average won on validation and was saved
    # max_steps or max_time: the budget that cut training short (None: not cut; the epochs end it). Kept
    # here so that a run stopped after the cut (during the cut epoch's evaluation) trains no further.
    ended_by: str | None = None


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    device: torch.device,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """`extra`: more tensors to keep, each under its own key prefix (a data-parallel run's other ranks'
    RNG states, `rng/rank{r}/...`; the weights' moving average, `ema/...`)."""
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    for n, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"param/{n}"] = p.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        for k, v in s.items():
            tensors[f"opt/{i}/{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng/cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    meta = {
        "progress": json.dumps(progress.__dict__),
        "param_groups": json.dumps(opt["param_groups"], default=float),  # lr: a tensor when captured
        "version": __version__,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        open_to_readers(tmp)  # safetensors writes 0600: a shared or copied run's checkpoint stays readable
        os.replace(tmp, path)  # atomic: the old checkpoint stays valid until here
    except BaseException:  # a full disk, or a second Ctrl-C during a stop's save: no half-written file left
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Load weights and optimizer state in place; return the progress and the other saved tensors
    (RNG states under rng/, and whatever save_checkpoint was given as `extra`).

    Everything is checked against this run before anything is loaded: a checkpoint of another model or
    another version of imdb-lora ends in one line, never in a traceback or a silently different run."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user-facing problem
        raise UserError(f"--resume: cannot read {path} ({e})") from None
    progress = _progress(path, meta)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_params(path, tensors, params)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = value
    # A weight that never had a gradient has no optimizer state, so only none at all (or another
    # layout) is a mismatch; AdamW would otherwise silently restart its moments.
    if (progress.global_step > 0 and not state) or any(i >= len(params) for i in state):
        raise _mismatch(path, f"optimizer state for {len(state)} of {len(params)} trainable tensors")
    if "rng/cpu" not in tensors:
        raise _mismatch(path, "no random-number-generator state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (KeyError, TypeError, ValueError) as e:
        raise _mismatch(path, f"optimizer settings that do not fit ({type(e).__name__})") from None
    rest = {k: v for k, v in tensors.items() if not k.startswith(("param/", "opt/"))}
    return progress, rest


def _mismatch(path: Path, what: str) -> UserError:
    return UserError(
        f"--resume: {path} does not fit this run ({what}); it comes from another model, other settings or "
        f"another imdb-lora version (this is {__version__})"
    )


def _progress(path: Path, meta: dict[str, str]) -> Progress:
    """The saved progress; fields a later version added are refused, fields it lacks take their default."""
    try:
        saved = json.loads(meta["progress"])
        unknown = sorted(set(saved) - set(Progress.__dataclass_fields__))
        if unknown:
            raise _mismatch(path, f"unknown progress fields {', '.join(unknown)}")
        return Progress(**saved)
    except (KeyError, TypeError, ValueError):
        raise _mismatch(path, "no readable progress record") from None


def _check_params(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    saved = {k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        detail = f"{len(missing)} trainable weights missing" + (f", e.g. {missing[0]}" if missing else "")
        detail += f", {len(unexpected)} unknown" + (f", e.g. {unexpected[0]}" if unexpected else "")
        raise _mismatch(path, detail)
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise _mismatch(path, f"{name} is {tuple(saved[name].shape)} there, {tuple(p.shape)} here")


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["rng/cpu"])
    if "rng/cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["rng/cuda"], device)
