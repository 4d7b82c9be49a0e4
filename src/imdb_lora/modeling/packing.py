"""Padding-free batches: several reviews packed into one row, attention kept inside each review.

A padded batch of IMDB reviews (median ~230 tokens, cut at 512) spends about half its compute on pad
tokens. Packing (data.batches.pack) concatenates reviews into rows of `row_tokens`, restarts position ids at each review,
gives attention a block-diagonal mask (so no review sees another), and reads each review's first token
for the classifier (or the mean of its tokens, with --pooling mean). The result is the same computation
as the padded forward (tests check logits, loss and gradients), on fewer tokens.

Supported: roberta-like heads (roberta, xlm-roberta, camembert, mpnet: the head reads features[:, 0])
and bert (pooler on the first token, then the classifier), with the eager or SDPA attention kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batches import PackedBatch
from ..errors import UserError
from .load import OFFSET_POSITIONS
from .pooling import FIRST_TOKEN_HEADS, POOLER_HEADS, head_logits, pooling_of, segment_mean


def classifier_of(model: nn.Module) -> nn.Module:
    """The Hugging Face *ForSequenceClassification module inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model: nn.Module) -> bool:
    m = classifier_of(model)
    impl = getattr(m.config, "_attn_implementation", "eager")
    return m.config.model_type in FIRST_TOKEN_HEADS | POOLER_HEADS and impl in ("eager", "sdpa")


def use_packing(mode: str, model: nn.Module, device: torch.device, training: bool) -> bool:
    """The --batching decision: packed where asked; under auto, packed only for evaluation on CUDA.

    Measured on an H200 (roberta-base, docs/performance.md): packing made evaluation 1.57x faster
    (582k vs 372k tokens/s) but training slower (74.5k vs 97.4k tokens/s at batch 32), because the
    block-diagonal mask costs more in the backward pass than the padding it saves.
    """
    ok = supports_packing(model)
    if mode == "packed" and not ok:
        model_type = classifier_of(model).config.model_type
        raise UserError(f"--batching packed is not supported for model type {model_type!r}")
    return mode == "packed" or (mode == "auto" and ok and device.type == "cuda" and not training)


def position_start(model: nn.Module) -> int:
    """Where a review's position ids start: 0 for bert, padding_idx + 1 for roberta/mpnet."""
    m = classifier_of(model)
    return m.config.pad_token_id + 1 if m.config.model_type in OFFSET_POSITIONS else 0


def block_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, width, width] mask letting each token attend only inside its own review.

    Padding attends to padding, so no row of the softmax is empty (its outputs are never read).
    SDPA takes a boolean mask (True = attend); the eager kernel adds a float mask to its scores.
    """
    same = segments[:, None, :, None] == segments[:, None, None, :]
    if implementation == "sdpa":
        return same
    return torch.zeros(same.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~same, torch.finfo(dtype).min
    )


def packed_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Classifier logits [n, labels] for a packed batch, in the order the reviews were given."""
    m = classifier_of(model)
    encoder = getattr(m, m.base_model_prefix)
    impl = getattr(m.config, "_attn_implementation", "eager")
    mask = block_mask(batch.segments, impl, encoder.get_input_embeddings().weight.dtype)
    kwargs = {"token_type_ids": torch.zeros_like(batch.input_ids)} if m.config.model_type == "bert" else {}
    hidden = encoder(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, **kwargs
    ).last_hidden_state
    if pooling_of(m) == "mean":
        pooled = segment_mean(hidden, batch.segments, len(batch.rows)).to(hidden.dtype)
    else:
        pooled = hidden[batch.rows, batch.offsets]  # [n, hidden]: each review's <s>/[CLS]
    return head_logits(m, pooled)
