"""Flat batches: a batch's reviews as one padding-free row, attention by cumulative sequence lengths.

The packed path (packing.py) fills fixed-width rows and keeps reviews apart with a dense
[rows, 1, L, L] mask, which measured slower than padding in training on an H200. Here the batch is one
row [1, T] (data.batches.flatten), positions restart per review, and attention runs per review from
`cu_seqlens`: no mask and no pad token inside the row (only a short tail rounding T up to its bucket).

It plugs into transformers' own attention hooks instead of re-implementing the encoder: an attention
function registered with `AttentionInterface` and a mask function with `AttentionMaskInterface` under
one name (FLAT_ATTENTION), selected with `set_attn_implementation`. The encoder passes the keywords
`cu_seq_lens_q/k` and `max_length_q/k` through to the attention function unchanged.
- CUDA: the flash-attention varlen kernel (`aten::_flash_attention_forward`, differentiable, with
  dropout; `torch.nn.attention.varlen.varlen_attn` has no dropout, and the configs' attention dropout
  is 0.1).
- CPU: a reference that runs SDPA review by review: the same computation, exact, for the tests.
Calls without `cu_seq_lens_q` (padded batches on the same model) go to transformers' SDPA function
with its usual mask, so one model serves both layouts.

Supported: roberta-like heads, bert and mpnet (see FLAT_MODELS). MPNet's attention does not go through
the attention interface and adds a relative position bias that it builds densely as [batch, heads, L, L];
its flat path (flat_mpnet.py) runs FlexAttention with a document mask and the bias as a score_mod, and
trains without attention dropout (FlexAttention has none); --compile and --cuda-graphs are not built
for it (flat_options_check refuses them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Given, turn_off
from ..data.batches import FlatBatch
from ..errors import UserError
from .flat_mpnet import mpnet_flat_hidden
from .packing import POOLER_HEADS, classifier_of, supports_packing
from .pooling import pooling_of

FLAT_ATTENTION = "imdb_lora_flat"
FLAT_MODELS = {"roberta", "xlm-roberta", "camembert", "bert", "mpnet"}
FLEX_MODELS = {"mpnet"}  # flat through FlexAttention (flat_mpnet.py), not the attention interface
BATCHING_MODES = ("auto", "padded", "packed", "flat")


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float, scale
) -> torch.Tensor:
    """Attention inside each segment of cu_seqlens; q, k, v and the result are [T, heads, dim]."""
    if q.is_cuda:
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # the flash kernel takes half precision only
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, dropout, False, False, scale=scale
        )[0]
        return out.to(dtype)
    if torch.compiler.is_compiling():
        # Traced: one SDPA over the row with a block-diagonal mask (no data-dependent loop to break the
        # graph); O(T^2) memory, which only the tests' tiny rows afford on the CPU.
        seg = torch.repeat_interleave(
            torch.arange(cu.numel() - 1, device=q.device), cu.diff(), output_size=q.shape[0]
        )
        mask = seg[:, None] == seg[None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            dropout_p=dropout,
            scale=scale,
        )
        return out.transpose(0, 1)
    # CPU reference: SDPA per segment, [heads, n, dim] each; the tests compare it with the padded model.
    bounds = cu.tolist()
    parts = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            dropout_p=dropout,
            scale=scale,
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts)


def flat_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention function registered as FLAT_ATTENTION: query/key/value are [1, heads, T, dim]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a padded batch on a model switched to the flat implementation
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
    out = varlen_attention(q, k, v, cu, kwargs["max_length_q"], dropout, scaling)
    return out.unsqueeze(0), None  # [1, T, heads, dim], as transformers' kernels return


_registered = False


def register_flat_attention() -> None:
    """Register FLAT_ATTENTION with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLAT_ATTENTION, flat_attention)
    # The flat call passes no attention mask, so SDPA's mask function returns None there; padded calls
    # on the same model get SDPA's usual mask.
    AttentionMaskInterface.register(FLAT_ATTENTION, sdpa_mask)
    _registered = True


def supports_flat(model: nn.Module) -> bool:
    return classifier_of(model).config.model_type in FLAT_MODELS


def flat_options_check(
    model: nn.Module,
    path: str,
    compile: bool,
    cuda_graphs: bool,
    working_copies: bool = False,
    fused_qkv: bool = False,
    name: Callable[[str], str] | None = None,
) -> None:
    """Refuse what the flat path does not build for a model: MPNet's has no --compile, --cuda-graphs,
    --bf16-working-copies or --fused-qkv. `name`: how the refusal names the setting's key
    (config.Given.where: its flag, or a --config file's key)."""
    name = name or Given().where  # by its flag
    model_type = classifier_of(model).config.model_type
    asked = {
        "train.compile": compile,
        "train.cuda_graphs": cuda_graphs,
        "train.bf16_working_copies": working_copies,
        "train.fused_qkv": fused_qkv,
    }
    key = next((k for k, on in asked.items() if on), None)
    if path == "flat" and model_type in FLEX_MODELS and key is not None:
        subject = name(key)
        raise UserError(
            f"{subject} is not built for {model_type}'s flat path (FlexAttention, compiled on its own); "
            f"{turn_off(subject)} or use --batching padded"
        )


def flat_note(model: nn.Module) -> str:
    """What run.json adds to a flat path's name for the model: MPNet's differs (FlexAttention)."""
    if classifier_of(model).config.model_type in FLEX_MODELS:
        return ", FlexAttention with the relative position bias as a score_mod, no attention dropout"
    return ""


def enable_flat(model: nn.Module) -> None:
    """Switch the model's attention to FLAT_ATTENTION (padded calls keep working, through SDPA)."""
    m = classifier_of(model)
    if m.config.model_type in FLEX_MODELS:
        return  # flat_mpnet switches its modules itself, on the first flat call
    if m.config._attn_implementation != FLAT_ATTENTION:
        register_flat_attention()
        if hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation(FLAT_ATTENTION)
        else:  # an older transformers: the layers read the (shared) config's setting
            m.config._attn_implementation = FLAT_ATTENTION


def batching_path(
    mode: str, model: nn.Module, device: torch.device, training: bool, flag: str = "--batching"
) -> str:
    """The --batching decision: padded, packed or flat (`flag`: the setting as given, `--batching` or a
    --config file's `my.yaml: train.batching`, for the refusals of a path the model does not have).

    auto, as measured on an H200 (docs/performance.md, docs/measurements/2026-11-30-fast-h200.json):
    padded training (eager flat trained slower than padded; flat is faster only with --cuda-graphs,
    which asks for --batching flat itself); evaluation on CUDA flat with LoRA merged for RoBERTa/BERT
    (the test set warm in 4.0 s against packed's 7.9 s, cold 4.3 s against 10.8 s), packed for the
    other architectures that pack (MPNet's flat path is not measured yet); padded on the CPU. With
    --pooling mean, flat falls back to padded (the flat forward reads each review's first token;
    padded and packed compute the mean).
    """
    model_type = classifier_of(model).config.model_type
    mean_pooled = pooling_of(classifier_of(model)) == "mean"
    if mode == "flat" and mean_pooled:
        return "padded"
    if mode == "flat":
        if not supports_flat(model):
            raise UserError(
                f"{flag} flat is not supported for model type {model_type!r} "
                f"(supported: {', '.join(sorted(FLAT_MODELS))}); use padded or packed"
            )
        return "flat"
    if mode == "packed" and not supports_packing(model):
        raise UserError(f"{flag} packed is not supported for model type {model_type!r}")
    if mode == "packed":
        return "packed"
    if mode == "auto" and device.type == "cuda" and not training:
        if supports_flat(model) and model_type not in FLEX_MODELS and not mean_pooled:
            return "flat"
        if supports_packing(model):
            return "packed"
    return "padded"


def flat_logits(model: nn.Module, batch: FlatBatch, static_max_len: int | None = None) -> torch.Tensor:
    """Classifier logits [n, labels] for a flat batch, in input order.

    static_max_len: the kernel's max sequence length when it must not depend on the batch (a captured
    CUDA graph bakes it in); any bound >= the longest segment gives the same result.
    """
    enable_flat(model)
    m = classifier_of(model)
    encoder = getattr(m, m.base_model_prefix)
    if m.config.model_type in FLEX_MODELS:  # its own flat forward; static_max_len: FlexAttention has none
        hidden = mpnet_flat_hidden(encoder, batch)
        return m.classifier(hidden[0, batch.starts].unsqueeze(1))
    kwargs = {"token_type_ids": torch.zeros_like(batch.input_ids)} if m.config.model_type == "bert" else {}
    max_len = static_max_len or batch.max_len
    hidden = encoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=max_len,
        max_length_k=max_len,
        **kwargs,
    ).last_hidden_state
    first = hidden[0, batch.starts].unsqueeze(1)  # [n, 1, hidden]: each review's <s>/[CLS]
    if m.config.model_type in POOLER_HEADS:
        return m.classifier(m.dropout(encoder.pooler(first)))
    return m.classifier(first)
