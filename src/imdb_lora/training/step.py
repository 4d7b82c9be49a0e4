"""One optimizer step: the only training step there is, run by `train` and by `bench train`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..modeling.forward import forward_logits


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    seqs: list[list[int]],
    labels: torch.Tensor,
    pad_id: int,
    device: torch.device,
    packed: bool,
    lr: float,
    train_cfg: TrainConfig,
    row_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clipping and the optimizer update for one batch at learning rate `lr`.

    Returns the batch's summed loss and its correct count as device tensors: reading them back here
    would make the host wait for the device every step instead of queueing the next one.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    logits = forward_logits(model, seqs, pad_id, device, packed, row_tokens=row_tokens).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=train_cfg.label_smoothing)
    loss.backward()
    if train_cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float() * len(seqs), (logits.argmax(-1) == labels).sum().float()
