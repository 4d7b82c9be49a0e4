"""One optimizer step: the only training step there is, run by `train` and by `bench train`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from .distributed import step_logits
from .fused import FusedQKV
from .graphs import CapturedSteps, set_lr
from .step_rewrites import step_swaps
from .working import WorkingCopies


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
    captured: CapturedSteps | None = None,
    loss_scale: float = 1.0,
    working: WorkingCopies | None = None,
    fused: FusedQKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clipping and the optimizer update for one batch at learning rate `lr`.

    packed: the path (padded, packed or flat; a bool means packed/padded). captured: flat steps of its
    batch size run its static-buffer step (a CUDA graph per bucket on CUDA); other batches (an epoch's
    last, partial one) run eagerly here, keeping the gradient buffers the graphs write to.

    Returns the batch's summed loss and its correct count as device tensors: reading them back here
    would make the host wait for the device every step instead of queueing the next one.
    `loss_scale` multiplies the loss before backward (data-parallel: this rank's share of the global
    batch, see distributed.py); 0 makes the step a stand-in that adds no gradient and no statistics.
    `working`: bf16 working copies of the trainable weights (working.py) for the forward and backward;
    their gradients go to the fp32 masters before clipping, the updated masters back after the step.
    `fused`: each self-attention's q, k and v computed as one in the forward (fused.py, --fused-qkv).
    """
    if captured is not None and captured.handles(len(seqs)):
        return captured.step(seqs, labels, lr)
    set_lr(optimizer, lr)
    with step_swaps(working, fused):
        logits = step_logits(model, seqs, pad_id, device, packed, row_tokens=row_tokens).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=train_cfg.label_smoothing)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if working is not None:
        working.grads_to_masters()
    if train_cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
    optimizer.step()
    if working is not None:
        working.refresh()
    # gradients kept where graphs or working copies write them (zeroed, not freed)
    optimizer.zero_grad(set_to_none=captured is None and working is None)
    weight = 1.0 if loss_scale else 0.0
    return loss.detach().float() * (len(seqs) * weight), (logits.argmax(-1) == labels).sum().float() * weight
