"""Fused q/k/v for the flat training step (`--fused-qkv`): one GEMM where each self-attention ran three.

Why: a captured flat step on an H200 is bound by its kernel count, not its matmuls (docs/performance.md,
"Where the time goes"). Each self-attention runs query, key and value as three peft LoRA Linears on the
same input: three base GEMMs, three LoRA dropouts, three A and three B GEMMs, three scalings and three
adds, and as many kernels again in the backward.

What this does instead, inside the step's forward only (`swapped`): the self-attention's `query`, `key`
and `value` modules are stood in for by three small modules that share one computation on the input the
attention hands them (transformers' BERT-like attentions call self.query/self.key/self.value in turn):
- one base GEMM against the frozen q/k/v weights concatenated once into one [3H, H] tensor; the model's
  own frozen parameters are made views of it, so the weights are not stored twice, and in-place writes
  to them (evaluation's LoRA merge and its restore, loading a state dict) reach the fused tensor;
- one dropout of the input for the three LoRA branches: **one mask shared by q, k and v** (peft draws
  one per module), a recipe change that run.json's train_path names (`fused_note`);
- one GEMM for the three A matrices ([3r, H]) and one for the three B's as a block-diagonal [3H, 3r]
  matrix, whose `addmm` also scales by peft's own `scaling` (rsLoRA's alpha/sqrt(r)) and adds the base
  result; the result's three column blocks are q, k and v (one `split`, one concatenation backward).
  The B product's zero blocks add exact zeros, so without autocast q, k and v are peft's to rounding.
The trainable tensors (A's, B's, the wrapped layers' biases when trained) are gathered per step with
`cat`/`block_diag`, whose backward hands each parameter its own gradient; with `--bf16-working-copies`
(working.py) their working copies are views of one buffer per kind instead (`pack`), so no per-step
gather is needed. Outside the step's forward (evaluation, saving, merging, export) the model is the
unchanged peft model: same modules, same parameters, same state-dict keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Given, turn_off
from ..errors import UserError
from ..modeling.lora import ROLE_PATTERNS
from ..modeling.packing import classifier_of

KEY = "train.fused_qkv"
QKV = ("query", "key", "value")  # the BERT-like self-attention's projections, in the order it calls them

# (module, parameter name, fp32 master, region of the packed buffer it occupies)
PackedPart = tuple[nn.Module, str, nn.Parameter, tuple[slice, ...]]


@dataclass
class _Group:
    """One self-attention's query, key and value LoRA layers, fused."""

    attention: nn.Module
    layers: list[nn.Module]  # peft LoRA Linears, in QKV order
    adapter: str
    weight: torch.Tensor  # frozen [3H, H]; the base layers' weights are views of it
    bias: torch.Tensor | None  # frozen [3H] (views likewise), or None when the biases train
    sizes: list[int]  # output features of q, k, v
    rank: int
    scaling: float
    # (base layer, "weight" or "bias", the address of its rows in the fused tensor)
    views: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    stand_ins: list[nn.Module] = field(default_factory=list)
    packed: tuple[nn.Parameter, nn.Parameter, nn.Parameter | None] | None = None  # working buffers
    pending: list[torch.Tensor] | None = None  # [input, k, v] between the query call and key/value's

    def base_param(self, i: int, name: str) -> torch.Tensor | None:
        return getattr(self.layers[i].get_base_layer(), name)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A [3r, H], block-diagonal B [3H, 3r] and the trained bias [3H] (None when frozen or absent)
        gathered from the parameters; autograd's cat/block_diag backward splits the gradients again."""
        a = torch.cat([m.lora_A[self.adapter].weight for m in self.layers])
        b = torch.block_diag(*[m.lora_B[self.adapter].weight for m in self.layers])
        trained = self.bias is None and self.base_param(0, "bias") is not None
        bias = torch.cat([self.base_param(i, "bias") for i in range(3)]) if trained else None
        return a, b, bias

    def trainable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The trainable tensors for this forward: the working buffers, else gathered per step."""
        return self.packed if self.packed is not None else self.gathered()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v of input x [..., H], as the three peft LoRA Linears compute them (one dropout mask)."""
        a, b, trained_bias = self.trainable()
        bias = self.bias if self.bias is not None else trained_bias
        base = F.linear(x, self.weight, bias)  # [..., 3H]
        down = F.linear(self.layers[0].lora_dropout[self.adapter](x), a)  # [..., 3r]
        lead = base.shape[:-1]
        out = torch.addmm(
            base.reshape(-1, base.shape[-1]), down.reshape(-1, down.shape[-1]), b.t(), alpha=self.scaling
        )
        return out.view(*lead, out.shape[-1]).split(self.sizes, dim=-1)

    def project(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stand-in i's forward: query computes all three; key and value take theirs."""
        if i == 0:
            q, k, v = self.qkv(x)
            self.pending = [x, k, v]
            return q
        if self.pending is None or self.pending[0] is not x:
            raise RuntimeError(f"fused q/k/v: {QKV[i]} was called without query on the same input first")
        out = self.pending[i]
        if i == 2:
            self.pending = None
        return out

    def aliased(self) -> bool:
        """Whether the base layers' frozen weights (and biases) are still the views made at fusing."""
        return all(getattr(base, name).data_ptr() == address for base, name, address in self.views)

    def pack(self, dtype: torch.dtype) -> list[tuple[nn.Parameter, list[PackedPart]]]:
        """Working buffers of `dtype` for the trainable tensors, in the layout `qkv` reads, used from
        then on; returns each buffer with the parts (module, name, master, region) whose working copies
        are views of it. The block matrix's zero blocks stay zero: the copies written into it (working.py's
        refresh) are its diagonal blocks, and only their gradients are read."""
        r, spans = self.rank, _offsets(self.sizes)
        a_parts = [
            (m.lora_A[self.adapter], "weight", (slice(i * r, (i + 1) * r),))
            for i, m in enumerate(self.layers)
        ]
        b_parts = [
            (m.lora_B[self.adapter], "weight", (slice(off, off + n), slice(i * r, (i + 1) * r)))
            for i, (m, (off, n)) in enumerate(zip(self.layers, spans))
        ]
        bias_parts = [
            (m.get_base_layer(), "bias", (slice(off, off + n),)) for m, (off, n) in zip(self.layers, spans)
        ]
        with torch.no_grad():
            gathered = self.gathered()
        buffers = [None if t is None else nn.Parameter(t.to(dtype), requires_grad=True) for t in gathered]
        self.packed = (buffers[0], buffers[1], buffers[2])
        return [
            (buffer, [(m, name, getattr(m, name), region) for m, name, region in parts])
            for buffer, parts in zip(buffers, (a_parts, b_parts, bias_parts))
            if buffer is not None
        ]


class _StandIn(nn.Module):
    """Stands in for query, key or value during the step's forward (no parameters of its own)."""

    def __init__(self, group: _Group, index: int):
        super().__init__()
        self.index = index
        self.group = group  # a plain object, not a submodule: modules() and state_dict never see it

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.group.project(self.index, x)


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    return [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]


class FusedQKV:
    """Every self-attention of `model` with query, key and value computed as one (see the module doc).
    `given`: where the settings came from (config.Given), so that a refusal names a --config file's
    train.fused_qkv by the file and key (`my.yaml: train.fused_qkv needs ...`); by its flag by default."""

    def __init__(self, model: nn.Module, given: Given | None = None):
        given = given or Given()
        self.groups = [_fuse(attention, layers, given) for attention, layers in _attentions(model, given)]
        for g in self.groups:
            g.stand_ins = [_StandIn(g, i) for i in range(3)]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The stand-ins in place of query, key and value inside the block (the step's forward)."""
        if not all(g.aliased() for g in self.groups):  # e.g. .to() after fusing: stale weights here
            raise RuntimeError("fused q/k/v: the frozen weights were replaced after fusing")
        for g in self.groups:
            for name, stand_in in zip(QKV, g.stand_ins):
                g.attention._modules[name] = stand_in
        try:
            yield
        finally:
            for g in self.groups:
                g.pending = None
                for name, layer in zip(QKV, g.layers):
                    g.attention._modules[name] = layer


def _attentions(model: nn.Module, given: Given) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(self-attention, [query, key, value] LoRA layers) for each self-attention; refuses in one line
    where a projection is not a plain peft LoRA Linear with one active adapter."""
    from peft.tuners.lora import LoraLayer

    model_type = classifier_of(model).config.model_type
    pattern = ROLE_PATTERNS.get(model_type, {}).get("attention_qkv")
    modules = dict(model.named_modules())
    parents = sorted({n.rsplit(".", 1)[0] for n in modules if pattern and re.search(pattern, n)})
    flag = given.where(KEY)
    if not parents:
        raise UserError(f"{flag} is not built for model type {model_type!r}; {turn_off(flag)}")
    found = []
    for parent in parents:
        layers = [modules.get(f"{parent}.{name}") for name in QKV]
        if not all(isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), nn.Linear) for m in layers):
            raise UserError(
                f"{flag} needs LoRA on query, key and value of every self-attention ({parent} has it on "
                f"{', '.join(n for n, m in zip(QKV, layers) if isinstance(m, LoraLayer)) or 'none'}); "
                f"add the attention_qkv role to {given.said('lora.targets', KEY)} or {turn_off(flag, KEY)}"
            )
        found.append((modules[parent], layers))
    return found


def _adapter(layers: list[nn.Module], given: Given) -> str:
    """The one active adapter the three layers share, if they are plain LoRA (no DoRA, no LoRA bias)."""
    names = {tuple(m.active_adapters) for m in layers}
    adapter = next(iter(names))[0] if len(names) == 1 and len(next(iter(names))) == 1 else None
    plain = adapter is not None and all(
        adapter in m.lora_A
        and not m.merged
        and not m.disable_adapters
        and adapter not in getattr(m, "lora_variant", {})
        and not getattr(m, "use_dora", {}).get(adapter, False)
        and m.lora_B[adapter].bias is None
        for m in layers
    )
    if not plain:
        raise UserError(
            f"{given.where(KEY)} needs one plain LoRA adapter on query, key and value; {turn_off(given.where(KEY))}"
        )
    return adapter


def _fuse(attention: nn.Module, layers: list[nn.Module], given: Given) -> _Group:
    """The group for one self-attention: its frozen q/k/v weights concatenated once, the base layers'
    parameters rebound as views of the result (no second copy)."""
    adapter = _adapter(layers, given)
    flag = given.where(KEY)
    bases = [m.get_base_layer() for m in layers]
    ranks = {m.r[adapter] for m in layers}
    scalings = {m.scaling[adapter] for m in layers}
    dropouts = {getattr(m.lora_dropout[adapter], "p", 0.0) for m in layers}
    if len(ranks) != 1 or len(scalings) != 1 or len(dropouts) != 1:
        raise UserError(f"{flag} needs the same LoRA rank, scaling and dropout on query, key and value")
    if any(b.weight.requires_grad for b in bases):
        raise UserError(f"{flag} needs the query, key and value weights frozen (LoRA trains beside them)")
    trained = {None if b.bias is None else b.bias.requires_grad for b in bases}  # {False}: frozen biases
    if len(trained) != 1:
        raise UserError(f"{flag} needs query, key and value's biases all trained, all frozen or none")
    weight = _concatenated(bases, "weight")
    bias = _concatenated(bases, "bias") if trained == {False} else None
    sizes = [b.out_features for b in bases]
    group = _Group(attention, layers, adapter, weight, bias, sizes, ranks.pop(), float(scalings.pop()))
    fused = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    group.views = [
        (base, name, tensor[off : off + n].data_ptr())
        for name, tensor in fused
        for base, (off, n) in zip(bases, _offsets(sizes))
    ]
    return group


@torch.no_grad()
def _concatenated(bases: list[nn.Linear], name: str) -> torch.Tensor:
    """The three frozen tensors concatenated along the output dimension; each base layer's parameter
    becomes a view of its rows (`.data`, so the Parameter objects and their keys stay)."""
    fused = torch.cat([getattr(b, name).detach() for b in bases])
    offset = 0
    for b in bases:
        p = getattr(b, name)
        p.data = fused[offset : offset + p.shape[0]]
        offset += p.shape[0]
    return fused


def fused_note() -> str:
    """What run.json's train_path adds for --fused-qkv: the recipe change is the shared dropout mask."""
    return "fused q/k/v (one GEMM each for the base, the A's and the B's; one LoRA dropout mask shared by q, k, v)"
