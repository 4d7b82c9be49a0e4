"""MPNet's flat path: FlexAttention with a document mask and MPNet's relative position bias as a score_mod.

MPNet's attention does not go through transformers' AttentionInterface, and its encoder builds the
relative position bias densely, once per forward, as [batch, heads, L, L] (`compute_position_bias`,
then passed to every layer). For a flat row of ~10k tokens that is 4.8 GB of fp32 before any score.
Here the bias stays a small table and is read inside the attention kernel:

- `bias_table`: table[h, d + R] = relative_attention_bias[bucket(d), h] for every distance
  d = key - query in [-R, R], with transformers' own `relative_position_bucket` (num_buckets 32,
  max_distance 128: the defaults `compute_position_bias` calls it with). R = max_position_embeddings,
  longer than any review; beyond max_distance the bucket no longer changes, so clamping is exact.
  Built once per forward from the embedding weight, so full fine-tuning trains it: FlexAttention
  returns gradients of tensors a score_mod reads since torch 2.6 (pytorch/pytorch#137452; on CUDA
  accumulated with atomics, so not bit-reproducible). The CPU tests check the bias gradient of the CPU
  reference against padded; test_mpnet_flex_on_cuda_matches_padded checks compiled FlexAttention's.
- The padded model computes the bias from row indices (`compute_position_bias` gets no position ids);
  inside one review the index difference equals the position difference, so the score_mod adds
  table[h, kv - q] and the document mask (`doc[q] == doc[kv]`, from cu_seqlens) keeps reviews apart.
- Each self-attention module is switched to FlatMPNetSelfAttention (a subclass: same parameters, so
  peft's LoRA wrappers on q/k/v/o keep working): given a FlatPositionBias it runs FlexAttention,
  given anything else it runs transformers' own forward, so padded calls on the same model are
  unchanged. The flat forward calls the embeddings and then each layer with the FlatPositionBias
  (MPNetModel.forward would build the dense bias and a mask; the layers themselves are transformers').

FlexAttention has no dropout: MPNet's flat path trains WITHOUT attention dropout (the configs' 0.1);
hidden dropout is unchanged. Whether that costs accuracy is what `scripts/gpu-checks.sh ... fast-mpnet`
measures (MPNet-base, real weights, 1 epoch, flat and padded).
On CUDA flex_attention runs compiled (one torch.compile(flex_attention) per process: the eager
version materialises the scores). On the CPU eager flex_attention has no backward (torch 2.13), so the
CPU runs a reference instead: SDPA review by review with the same bias added densely per review
(exact; the tests compare it with the padded model, and eager FlexAttention's forward with it).
Not built for this path: --compile and --cuda-graphs (refused with a one-line error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import FlatBatch
from ..errors import UserError

_flex = None  # torch.compile(flex_attention), created on first CUDA use


@dataclass
class FlatPositionBias:
    """Passed to every layer in place of MPNet's dense position bias: built once per flat forward."""

    table: torch.Tensor  # [heads, 2 * reach + 1]: bias of head h at distance d = key - query
    reach: int
    cu_seqlens: torch.Tensor  # the flat batch's segments (reviews, then the padding tail)
    block_mask: object = None  # FlexAttention's BlockMask (CUDA); None: the CPU reference


def _mpnet_classes():
    from transformers.models.mpnet import modeling_mpnet

    return modeling_mpnet.MPNetSelfAttention, modeling_mpnet.MPNetEncoder


def _layout_error(what: str) -> UserError:
    return UserError(
        f"--batching flat: MPNet's module layout in this transformers version is not the one "
        f"modeling/flat_mpnet.py hooks ({what}); use --batching padded"
    )


def _check_layout(base: nn.Module) -> None:
    self_attention, encoder_cls = _mpnet_classes()
    enc = getattr(base, "encoder", None)
    if not isinstance(enc, encoder_cls) or not hasattr(base, "embeddings"):
        raise _layout_error("no MPNetEncoder at .encoder or no .embeddings")
    for name in ("layer", "relative_attention_bias", "relative_position_bucket"):
        if not hasattr(enc, name):
            raise _layout_error(f"MPNetEncoder has no {name}")
    for i, layer in enumerate(enc.layer):
        attn = getattr(getattr(layer, "attention", None), "attn", None)
        if not isinstance(attn, self_attention):
            raise _layout_error(f"layer {i} has no MPNetSelfAttention at .attention.attn")
        missing = [a for a in ("q", "k", "v", "o", "num_attention_heads", "attention_head_size") if not hasattr(attn, a)]  # fmt: skip
        if missing:
            raise _layout_error(f"MPNetSelfAttention lacks {', '.join(missing)}")


_flat_classes: dict[type, type] = {}


def _flat_class(cls: type) -> type:
    """FlatMPNetSelfAttention over transformers' class (made once per class, so deepcopy keeps it)."""
    if cls not in _flat_classes:

        def forward(
            self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kw
        ):
            if isinstance(position_bias, FlatPositionBias):
                return (flat_self_attention(self, hidden_states, position_bias),)
            return cls.forward(self, hidden_states, attention_mask, position_bias, output_attentions, **kw)

        _flat_classes[cls] = type("Flat" + cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _flat_classes[cls]


def enable_flat_mpnet(base: nn.Module) -> None:
    """Switch every MPNet self-attention module to its flat-capable subclass (idempotent)."""
    _check_layout(base)
    for layer in base.encoder.layer:
        attn = layer.attention.attn
        if type(attn) not in _flat_classes.values():
            attn.__class__ = _flat_class(type(attn))


def bias_table(encoder: nn.Module, reach: int) -> torch.Tensor:
    """[heads, 2 * reach + 1]: the bias MPNet adds at key - query = d, stored at column d + reach."""
    weight = encoder.relative_attention_bias.weight
    distance = torch.arange(-reach, reach + 1, device=weight.device)
    # transformers' own bucketing, with the arguments compute_position_bias uses (its defaults)
    buckets = encoder.relative_position_bucket(distance).to(weight.device)
    return encoder.relative_attention_bias(buckets).t()


def document_ids(cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """[width]: which segment (review, or the padding tail) each token of the flat row belongs to."""
    cu = cu_seqlens.long()
    return torch.repeat_interleave(
        torch.arange(cu.numel() - 1, device=cu.device), cu.diff(), output_size=width
    )


def document_block_mask(cu_seqlens: torch.Tensor, width: int):
    """FlexAttention's block mask: a token attends to its own segment only (the tail to itself)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens, width)

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return create_block_mask(same_document, None, None, width, width, device=doc.device)


def _compiled_flex():
    """torch.compile(flex_attention), made once per process (CUDA: the eager version materialises the
    [heads, T, T] scores; compiled, it is a fused kernel that skips the masked blocks)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention)
    return _flex


def relative_bias_mod(bias: FlatPositionBias):
    """The score_mod: adds table[h, clamp(kv - q, -R, R) + R] (the block mask keeps reviews apart)."""
    table, reach = bias.table, bias.reach

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-reach, reach) + reach]

    return relative_bias


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: FlatPositionBias, scale: float):
    """[1, heads, T, dim] FlexAttention inside each document with MPNet's bias (compiled on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if q.is_cuda else flex_attention  # eager: no backward on the CPU (torch 2.13)
    return fn(q, k, v, score_mod=relative_bias_mod(bias), block_mask=bias.block_mask, scale=scale)


def reference_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: FlatPositionBias, scale: float):
    """The same attention review by review with SDPA and the bias added densely ([heads, n, n] per
    review, O(sum n^2)): the CPU path, differentiable in every input and in the table."""
    bounds = bias.cu_seqlens.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = torch.arange(b - a, device=q.device)
        add = bias.table[:, (idx[None, :] - idx[:, None]).clamp(-bias.reach, bias.reach) + bias.reach]
        parts.append(
            F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=add[None].to(q.dtype), scale=scale
            )
        )
    return torch.cat(parts, dim=2)


def flat_self_attention(attn: nn.Module, hidden: torch.Tensor, bias: FlatPositionBias) -> torch.Tensor:
    """MPNetSelfAttention's computation on a flat row [1, T, hidden], without attention dropout."""
    width = hidden.shape[1]
    heads, dim = attn.num_attention_heads, attn.attention_head_size

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, width, heads, dim).transpose(1, 2)

    q, k, v = split(attn.q(hidden)), split(attn.k(hidden)), split(attn.v(hidden))
    attend = flex_attend if bias.block_mask is not None else reference_attend
    c = attend(q, k, v, bias, scale=dim**-0.5)
    return attn.o(c.transpose(1, 2).reshape(1, width, heads * dim))


def mpnet_flat_hidden(base: nn.Module, batch: FlatBatch) -> torch.Tensor:
    """Last hidden states [1, T, hidden] of MPNetModel `base` for a flat batch."""
    enable_flat_mpnet(base)
    enc = base.encoder
    hidden = base.embeddings(input_ids=batch.input_ids, position_ids=batch.position_ids)
    reach = base.config.max_position_embeddings
    cu = batch.cu_seqlens
    mask = document_block_mask(cu, batch.width) if cu.is_cuda else None  # the CPU runs the reference
    bias = FlatPositionBias(bias_table(enc, reach), reach, cu, mask)
    for layer in enc.layer:  # as MPNetEncoder.forward, with the flat bias in place of the dense one
        hidden = layer(hidden, None, bias)[0]
    return hidden
