"""The one forward pass (padded or packed) that training, evaluation and the benches run."""

from __future__ import annotations

import torch
from torch import nn

from ..data.batches import length_sorted_batches, pack, pad_batch
from .packing import classifier_of, packed_logits, position_start


def compile_encoder(model: nn.Module) -> None:
    """torch.compile the transformer encoder in place, with dynamic shapes (review lengths vary).

    In place, so PEFT, the state dict and the packed path (which calls the encoder directly) see the
    same modules; only the encoder's forward is replaced by its compiled version.
    """
    m = classifier_of(model)
    getattr(m, m.base_model_prefix).compile(dynamic=True)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere (CPU bf16 is slower and less exact here)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    device: torch.device,
    packed: bool,
    row_tokens: int | None = None,
) -> torch.Tensor:
    """Logits for one batch of token-id sequences, in the given order, under the device's autocast.

    Packed: reviews share rows of up to row_tokens (default: the longest review) with block-diagonal
    attention. Padded: one row per review, padded to the longest. The one forward that training,
    evaluation and the benches all run.
    """
    with autocast_for(device):
        if packed:
            rows = pack(seqs, row_tokens or max(map(len, seqs)), pad_id, position_start(model))
            return packed_logits(model, rows.to(device))
        ids, mask = pad_batch(seqs, pad_id)
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress=None,
    packed: bool = False,
) -> torch.Tensor:
    """fp32 logits for token-id sequences, in input order.

    Padded: length-sorted batches of batch_size, so padding is small. Packed: batch_size reviews at a
    time packed into rows as long as the longest of them, no padding but block-diagonal attention.
    """
    was_training = model.training
    model.eval()
    out = torch.empty((len(seqs), model.config.num_labels), dtype=torch.float32)
    if packed:
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    else:
        batches = length_sorted_batches([len(s) for s in seqs], batch_size)
    for idx in batches:
        logits = forward_logits(model, [seqs[i] for i in idx], pad_id, device, packed)
        out[idx] = logits.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return out
