"""What the classification head reads: the first token (cls, Hugging Face's heads) or the masked mean.

Sentence-transformers encoders (all-mpnet-base-v2, all-MiniLM-L6-v2) were trained to represent a text
by the mean of its token states, not by its first token. `--pooling mean` keeps the model's own head
modules (roberta/mpnet: dense, tanh, out_proj; bert: pooler, dropout, classifier) and feeds them the
masked mean of the last hidden states instead of the first token. No weight is added, so a LoRA run
still saves a standard PEFT adapter; what differs is the forward, and the choice travels with the
model: it is recorded on the Hugging Face config (`imdb_lora_pooling` in config.json of merged and full
models) and in the run's config.yaml, and every forward of this project (training, evaluation,
packed rows, predict, serve, the ONNX trace) reads it from there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

POOLINGS = ("cls", "mean")
CONFIG_KEY = (
    "imdb_lora_pooling"  # on the Hugging Face config: saved in config.json, read back by from_pretrained
)
FIRST_TOKEN_HEADS = {"roberta", "xlm-roberta", "camembert", "mpnet"}  # head reads features[:, 0]
POOLER_HEADS = {"bert"}  # pooler (dense + tanh) on the first token, dropout, then the classifier


def pooling_of(m: nn.Module) -> str:
    """cls or mean, for a Hugging Face *ForSequenceClassification module (not PEFT-wrapped)."""
    return getattr(m.config, CONFIG_KEY, "cls")


def set_pooling(m: nn.Module, pooling: str, flag: str = "--pooling") -> None:
    """Record the pooling on the model's config; mean needs a head this module knows how to feed.
    `flag`: the setting as given (`--pooling`, or a --config file's `my.yaml: model.pooling`)."""
    if pooling == "cls":
        if hasattr(m.config, CONFIG_KEY):
            delattr(m.config, CONFIG_KEY)
        return
    if m.config.model_type not in FIRST_TOKEN_HEADS | POOLER_HEADS:
        known = ", ".join(sorted(FIRST_TOKEN_HEADS | POOLER_HEADS))
        raise UserError(
            f"{flag} mean is not supported for model type {m.config.model_type!r} (known: {known})"
        )
    setattr(m.config, CONFIG_KEY, pooling)


def head_logits(m: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The model's own head on one vector per review ([n, hidden]: a first token or a mean)."""
    features = pooled.unsqueeze(1)  # [n, 1, hidden]: the heads read position 0
    if m.config.model_type in POOLER_HEADS:
        return m.classifier(m.dropout(getattr(m, m.base_model_prefix).pooler(features)))
    return m.classifier(features)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, hidden] mean of the states whose mask is 1 (the review's tokens, special tokens included)."""
    w = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1.0)


def segment_mean(hidden: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """[n, hidden] mean per review of packed rows (segments: review index per token, -1 for padding).

    Padding goes to an extra bucket that is dropped, so no data-dependent shape (and no host sync).
    """
    idx = torch.where(segments >= 0, segments, n).flatten()
    flat = hidden.flatten(0, 1).float()
    sums = flat.new_zeros(n + 1, flat.shape[-1]).index_add_(0, idx, flat)
    counts = flat.new_zeros(n + 1).index_add_(0, idx, flat.new_ones(idx.shape[0]))
    return (sums / counts.clamp(min=1.0).unsqueeze(-1))[:n]


def mean_pooled_logits(m: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of a padded batch with the head on the masked mean of the last hidden states."""
    encoder = getattr(m, m.base_model_prefix)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head_logits(m, masked_mean(hidden, attention_mask).to(hidden.dtype))
