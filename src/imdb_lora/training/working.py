"""bf16 working copies of the trainable weights for the flat step (`--bf16-working-copies`).

Why: under bf16 autocast a Linear casts its fp32 weight and bias to bf16 at every use, and the backward
casts their bf16 gradients back to fp32. The LoRA step on roberta-base has ~220 such trainable tensors
(LoRA A/B, the wrapped layers' biases, the head): 442 of the step's 762 casts (graphs.py's docstring).
Most of the other casts are activations: peft casts a LoRA branch's input to its fp32 weight's dtype and
autocast casts it back to bf16 for the GEMM, and q, k and v each cast the same fp32 LayerNorm output.

What this does instead, for the step's forward and backward only:
- Each trainable fp32 weight or bias of an nn.Linear (LoRA A/B, the wrapped layers' biases, the head's
  Linears) gets a bf16 working copy, swapped into its module for the forward (`swapped`). Autocast then
  has nothing to cast, and the gradients arrive in the working copies in bf16, as the cast's backward
  had them. The model's own parameters stay the fp32 masters outside the forward: the optimizer and
  its state, clipping, checkpoints, the state dict's keys, EMA and evaluation see only them.
- `grads_to_masters` moves the working gradients into the masters' fp32 gradients with one
  multi-tensor copy (before clipping); `refresh` copies the updated masters into the working copies
  with another (after the optimizer step). Both write in place, so a captured CUDA graph keeps the
  addresses it recorded; the working gradients are dropped after each step (autograd hands each
  tensor's gradient over without accumulating into a kept buffer).
- Activations are cast once: the self-attention's input (fp32, a LayerNorm output) is cast to bf16
  before q, k and v read it, and each LoRA layer's input before its base GEMM and its branch share it.
  The residual paths keep their fp32 tensors.

What changes numerically, all at bf16 rounding: a LoRA branch's dropout runs on the bf16 input (it ran
on fp32 and was then rounded to bf16), and the gradient reaching a shared bf16 input (q, k, v and a
LoRA branch beside its base GEMM) is summed in bf16 before its one cast back to fp32 (it was summed in
fp32). Without autocast (the CPU) the copies are fp32 and the step computes exactly what it did.
Trainable tensors autocast does not cast (peft's embedding LoRA, LayerNorms trained in full) are left
as they are. Masters change only in the optimizer step (EMA's evaluation swap puts them back bit for
bit), so the working copies stay in step with them; `refresh` is also called after anything that
writes the masters (the capture's warm-up undo).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..modeling.lora import ROLE_PATTERNS
from ..modeling.packing import classifier_of

if TYPE_CHECKING:
    from .fused import FusedQKV


@dataclass
class _Slot:
    module: nn.Module
    name: str  # "weight" or "bias"
    master: nn.Parameter  # fp32, the model's own parameter
    working: torch.Tensor  # the working dtype: its own leaf swapped in for the forward, or a packed view
    leaf: nn.Parameter  # the leaf whose .grad holds the working gradient: `working`, or its packed buffer
    region: tuple[slice, ...] | None = None  # where in a packed buffer (and its gradient) it lies

    def grad(self) -> torch.Tensor:
        return self.leaf.grad if self.region is None else self.leaf.grad[self.region]


def _cast_once(x):
    """x in autocast's dtype when autocast is on and x is an fp32 tensor; else x unchanged."""
    if not (torch.is_tensor(x) and x.dtype == torch.float32):
        return x
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))


class WorkingCopies:
    """Working copies of `model`'s trainable Linear weights in `dtype`, and the input casts. With `fused`
    (fused.py, --fused-qkv) the copies of q/k/v's LoRA matrices and biases are views of one packed
    buffer per kind and self-attention, which the fused forward reads whole (no per-step gather)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, fused: FusedQKV | None = None):
        self.dtype = dtype
        self.slots: list[_Slot] = []
        for group in fused.groups if fused is not None else []:
            for buffer, parts in group.pack(dtype):
                for module, name, master, region in parts:
                    self.slots.append(_Slot(module, name, master, buffer.detach()[region], buffer, region))
        packed = {id(s.master) for s in self.slots}
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None and p.requires_grad and p.dtype == torch.float32 and id(p) not in packed:
                    working = nn.Parameter(p.detach().to(dtype), requires_grad=True)
                    self.slots.append(_Slot(module, name, p, working, working))
        self.masters = [s.master for s in self.slots]
        self.workings = [s.working for s in self.slots]
        self.leaves = list({id(s.leaf): s.leaf for s in self.slots}.values())
        self.own = [s for s in self.slots if s.region is None]  # swapped into their modules
        self.active = False
        self.hooks = [
            m.register_forward_pre_hook(self._cast_input, with_kwargs=True) for m in _cast_points(model)
        ]

    def _cast_input(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: the module's input (first argument or `hidden_states`) cast once."""
        if not self.active:
            return None
        if args:
            return (_cast_once(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": _cast_once(kwargs["hidden_states"])}
        return None

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The working copies in place of the masters inside the block (the step's forward); autograd
        keeps what the backward needs, so the masters are back before it runs."""
        for s in self.own:
            s.module._parameters[s.name] = s.working
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for s in self.own:
                s.module._parameters[s.name] = s.master

    def grads_to_masters(self) -> None:
        """The working gradients into the masters' fp32 gradients (one multi-tensor copy), then dropped.
        A master without a gradient buffer gets one (the eager step sets them to None)."""
        missing = [leaf for leaf in self.leaves if leaf.grad is None]
        if missing:  # every wrapped Linear runs in every forward; a step without them is a bug here
            raise RuntimeError(f"{len(missing)} working copies got no gradient")
        for m in self.masters:
            if m.grad is None:
                m.grad = torch.empty_like(m)
        torch._foreach_copy_([m.grad for m in self.masters], [s.grad() for s in self.slots])
        for leaf in self.leaves:
            leaf.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """The masters' values into the working copies, in place (one multi-tensor copy)."""
        if self.slots:
            torch._foreach_copy_(self.workings, self.masters)

    def close(self) -> None:
        """Remove the input-cast hooks (the model is back to plain autocast)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _cast_points(model: nn.Module) -> list[nn.Module]:
    """Modules whose input is cast once: each LoRA Linear (its base GEMM and branch share the cast) and
    each self-attention module that q, k and v belong to (they share one cast of its input)."""
    from peft.tuners.lora import LoraLayer

    points = [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m, nn.Module)]
    points = [m for m in points if isinstance(m.get_base_layer(), nn.Linear)]
    patterns = ROLE_PATTERNS.get(classifier_of(model).config.model_type)
    if patterns:
        modules = dict(model.named_modules())
        parents = {n.rsplit(".", 1)[0] for n in modules if re.search(patterns["attention_qkv"], n)}
        points += [modules[p] for p in sorted(parents)]
    return points


def working_note(working: WorkingCopies) -> str:
    """What run.json's train_path adds for the working copies."""
    if working.dtype == torch.bfloat16:
        return "bf16 working copies of the trainable weights, shared input casts"
    return "fp32 working copies of the trainable weights (no autocast: the same computation)"


def working_dtype(device: torch.device) -> torch.dtype:
    """The training step's autocast dtype on this device (forward.autocast_for): bf16 on CUDA, fp32
    (no autocast) elsewhere, where the copies change nothing but run the same code."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
