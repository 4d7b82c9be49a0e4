"""The one forward pass (padded, packed or flat) that training, evaluation and the benches run."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from ..config import turn_off
from ..data.batches import (
    flat_token_batches,
    flatten,
    length_sorted_batches,
    pack,
    pad_batch,
    to_device,
    token_budget_batches,
)
from ..errors import UserError
from .flat import flat_logits
from .merge import merged_lora
from .packing import classifier_of, packed_logits, position_start
from .pooling import mean_pooled_logits, pooling_of

# Flat evaluation on CUDA: rows of up to this many tokens, whatever the eval batch size. The row size
# measured on an H200 (2026-11-30, `bench eval --batch-size 256` at 256 tokens per review): the test set
# in 4.0 s, 30% MFU; `train`, then at eval batch 64 x 256 = 16,384 tokens per row, took ~7 s for the same
# reviews. Elsewhere rows stay at eval batch size x FLAT_EVAL_TOKENS_PER_REVIEW: the CPU's reference
# attention under torch.compile builds a dense row x row mask.
FLAT_EVAL_ROW_TOKENS = 65_536
FLAT_EVAL_TOKENS_PER_REVIEW = 256


def flat_eval_row_tokens(batch_size: int, device: torch.device) -> int:
    """Tokens per flat evaluation row: FLAT_EVAL_ROW_TOKENS on CUDA, batch_size x 256 elsewhere."""
    return FLAT_EVAL_ROW_TOKENS if device.type == "cuda" else batch_size * FLAT_EVAL_TOKENS_PER_REVIEW


def path_name(path: bool | str) -> str:
    """padded, packed or flat; True/False (the older packed flag) mean packed/padded."""
    if isinstance(path, str):
        return path
    return "packed" if path else "padded"


def encoder_layers(model: nn.Module, flag: str = "--compile") -> nn.ModuleList:
    """The encoder's repeated block: its ModuleList of num_hidden_layers layers of one class
    (encoder.layer on RoBERTa, BERT and MPNet; transformer.layer on DistilBERT). `flag`: the setting
    that asked for it, as given (`--compile`, or a --config file's `my.yaml: train.compile`)."""
    m = classifier_of(model)
    n = m.config.num_hidden_layers
    for module in getattr(m, m.base_model_prefix).modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len({type(x) for x in module}) == 1:
            return module
    raise UserError(
        f"{flag}: no list of {n} encoder layers found in this {m.config.model_type} model; {turn_off(flag)}"
    )


def compile_encoder(model: nn.Module, backend: str = "inductor", flag: str = "--compile") -> None:
    """Regional compilation: torch.compile each encoder layer in place, dynamic shapes (review lengths
    vary), so that one compiled graph serves every layer (PyTorch's regional compilation recipe).

    The layers are one class and dynamo treats their parameters as inputs (inlined nn modules, the
    default since torch 2.5), so the first layer's graph is reused by the others: compile time and the
    graph's size do not grow with the layer count, where compiling the whole encoder traced one graph
    of every layer (for roberta-base's 12, twelve times the ops to compile). The embeddings, the pooler
    and the head stay eager (a few ops). In place (nn.Module.compile), so PEFT, the state dict's keys,
    LoRA merging and the packed and flat paths (which call the encoder) see the same modules. `flag`:
    the setting as given, for the refusal of a model without such layers.
    """
    for layer in encoder_layers(model, flag):
        layer.compile(dynamic=True, backend=backend)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere (CPU bf16 is slower and less exact here)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    device: torch.device,
    packed: bool | str,
    row_tokens: int | None = None,
) -> torch.Tensor:
    """Logits for one batch of token-id sequences, in the given order, under the device's autocast.

    packed (the path: padded, packed or flat; a bool means packed/padded): flat concatenates the
    reviews into one row with per-review attention (flat.py). Packed: reviews share rows of up to
    row_tokens (default: the longest review) with block-diagonal attention. Padded: one row per review,
    padded to the longest. The one forward that training, evaluation and the benches all run.
    """
    path = path_name(packed)
    with autocast_for(device):
        if path == "flat":
            return flat_logits(model, flatten(seqs, pad_id, position_start(model)).to(device))
        if path == "packed":
            rows = pack(seqs, row_tokens or max(map(len, seqs)), pad_id, position_start(model))
            return packed_logits(model, rows.to(device))
        ids, mask = pad_batch(seqs, pad_id)
        return padded_logits(model, to_device(ids, device), to_device(mask, device))


def padded_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of a padded batch: the model's own forward, or its head on the mean with --pooling mean."""
    m = classifier_of(model)
    if pooling_of(m) == "mean":
        return mean_pooled_logits(m, input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress=None,
    packed: bool | str = False,
    max_tokens: int | None = None,
    after_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """fp32 logits for token-id sequences, in input order.

    Padded: length-sorted batches of batch_size, so padding is small; with max_tokens, also at most that
    many padded tokens per forward pass (inference: a large call costs no more per text than a small
    one). Packed: batch_size reviews at a time packed into rows as long as the longest of them, no
    padding but block-diagonal attention.
    Flat: consecutive reviews up to FLAT_EVAL_ROW_TOKENS tokens per row on CUDA (batch_size x
    FLAT_EVAL_TOKENS_PER_REVIEW elsewhere), with the LoRA adapters merged into the base weights for the
    pass (merge.merged_lora, restored after).
    after_batch: called after each batch; what it raises ends the pass (the trainer's stop on Ctrl-C or
    SIGTERM), the merged LoRA restored and the model back in its mode.
    """
    path = path_name(packed)
    was_training = model.training
    model.eval()
    out = torch.empty((len(seqs), model.config.num_labels), dtype=torch.float32)
    lengths = [len(s) for s in seqs]
    if path == "flat":
        batches = flat_token_batches(lengths, flat_eval_row_tokens(batch_size, device))
    elif path == "packed":
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    elif max_tokens:
        batches = token_budget_batches(lengths, batch_size, max_tokens)
    else:
        batches = length_sorted_batches(lengths, batch_size)
    try:
        with merged_lora(model) if path == "flat" else nullcontext():
            parts = []  # kept on the device until the end: one copy back instead of a sync per batch
            for idx in batches:
                parts.append(forward_logits(model, [seqs[i] for i in idx], pad_id, device, path).float())
                if progress is not None:
                    progress.update(len(idx))
                if after_batch is not None:
                    after_batch()
    finally:
        model.train(was_training)
    if parts:
        out[torch.tensor([i for idx in batches for i in idx])] = torch.cat(parts).cpu()
    return out
