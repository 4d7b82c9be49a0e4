"""The flat training step captured as one CUDA graph per bucket: no per-step host cost.

An eager step dispatches every op from the host, one launch each, and is launch-bound: on an H200 the
eager flat step trained 79.0 k tokens/s against padded's 114.4 k, and captured 178.6 k (2026-11-30,
docs/performance.md). A CUDA graph replays the whole step (forward, loss, backward, clipping, fused
AdamW) with one launch, but still runs every kernel: the H200 profile counted ~2,960 per step, most of
them tiny casts and adds. A CPU count of the same step (scripts/step_ops.py: roberta-base, random init,
the default LoRA recipe, bf16 autocast as on CUDA, frozen weights in bf16, attention as one op each way
like the flash kernel) gives 2,675 non-view ops, of which 763 dtype casts (the profile's direct_copy +
bfloat16_copy kernels: 762). ~440 of them are the ~220 fp32 trainable tensors (LoRA A/B, the wrapped
layers' biases, the head) cast to bf16 at each use and their bf16 gradients cast back; most of the rest
are activations: peft casts a LoRA branch's input to its fp32 weight dtype and autocast casts it back
after the dropout, and each of q/k/v/intermediate casts the same fp32 LayerNorm output. Add to that 222
gradient accumulations (`add_` into the gradients kept at fixed addresses) and ~100 fp32 adds summing
the gradients of a LayerNorm output that several projections read (the profile's 319 fp32 adds).
What a graph needs, and how this module provides it:
- Fixed shapes: flat rows are rounded up to a bucket (data.batches.FLAT_BUCKET), so a graph per
  bucket width covers every full batch; the kernel's max sequence length is a fixed bound. Batches of
  another size (an epoch's last, partial batch) run the eager step.
- Fixed addresses: each graph reads its inputs from static buffers that a step copies the batch into;
  gradients are allocated once and zeroed in place inside the step; the learning rate is a device
  tensor filled before each replay (AdamW with `capturable=True`, `fused=True`).
- No host syncs: the loss sum and correct count stay on the device (as in the eager step), and each
  batch is copied into the static buffers from pinned host memory (a copy from pageable memory waits
  for the previous replay to finish, so the host could not prepare the next batch meanwhile).
- Warm-up: a bucket's first batch runs the step once uncaptured (on a side stream, as CUDA graphs
  require) and then puts the parameters and optimizer state back, so that capturing changes nothing
  the run computes; the step is then captured and replayed for that batch.
Dropout keeps working: PyTorch's CUDA generator advances per replay.

With `--bf16-working-copies` (working.py) the step reads bf16 working copies of the trainable weights,
copies their gradients to the fp32 masters before clipping and refreshes them from the masters after
the update, both in place, so the graph's addresses hold; the weight and gradient casts, the LoRA
inputs' round trips through fp32, the repeated casts of a shared input and the gradient accumulations
above go (the CPU count before and after: docs/performance.md, scripts/step_ops.py). With
`--fused-qkv` (fused.py) each self-attention's q, k and v run as one GEMM each for the base, the LoRA
A's and B's, with one dropout; the fused frozen weights and the packed working buffers keep their
addresses too.
On the CPU the same object runs the same static-buffer step eagerly (`capture=False`): the tests check
it against the plain eager step. The capture itself needs CUDA (scripts/gpu-checks.sh, part `fast`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.batches import FLAT_BUCKET, FlatBatch, flatten, pinned
from ..modeling.flat import flat_logits
from ..modeling.packing import position_start
from .fused import FusedQKV
from .step_rewrites import step_swaps
from .working import WorkingCopies


def make_optimizer(
    params: list[torch.Tensor], cfg: TrainConfig, device: torch.device, captured: bool = False
):
    """AdamW as training uses it: fused on CUDA; for captured steps also `capturable` with the learning
    rate held in a device tensor (a Python float would be baked into the graph)."""
    if captured and device.type == "cuda":
        return torch.optim.AdamW(
            params,
            lr=torch.tensor(cfg.lr, device=device),
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=True,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate in place where it is a tensor (a captured graph reads that tensor)."""
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


@dataclass
class _Bucket:
    batch: FlatBatch  # static input buffers
    labels: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None  # static outputs of the graph
    correct: torch.Tensor | None = None


class CapturedSteps:
    """Flat training steps of `batch_size` reviews: captured per bucket on CUDA, eager elsewhere."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        cfg: TrainConfig,
        device: torch.device,
        pad_id: int,
        batch_size: int,
        max_length: int,
        capture: bool | None = None,
        working: WorkingCopies | None = None,
        fused: FusedQKV | None = None,
    ):
        self.model, self.optimizer, self.params, self.cfg = model, optimizer, params, cfg
        self.working = working  # bf16 working copies of the trainable weights (working.py), or None
        self.fused = fused  # q/k/v fused in the forward (fused.py), or None
        self.autocast = device.type == "cuda"  # bf16 autocast as the eager step has it (tests: CPU too)
        self.device, self.pad_id, self.batch_size = device, pad_id, batch_size
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.position_start = position_start(model)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None  # one memory pool shared by all graphs: they never run at the same time
        # the kernel's fixed bound on a segment: a review, or a padding tail (at most one bucket)
        self.max_len = max(max_length, FLAT_BUCKET)
        if self.capture:
            for g in optimizer.param_groups:  # a loaded checkpoint may have put back a float
                if not torch.is_tensor(g["lr"]):
                    g["lr"] = torch.tensor(float(g["lr"]), device=device)
                g["capturable"] = True
        for p in params:  # gradients live at fixed addresses, zeroed in place by the step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # the masters of working copies get their gradients copied over whole: no zeroing needed
        self.copied = {id(m) for m in working.masters} if working is not None else set()

    def handles(self, n_reviews: int) -> bool:
        return n_reviews == self.batch_size

    def step(
        self, seqs: list[list[int]], labels: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (summed loss, correct count) as device tensors."""
        set_lr(self.optimizer, lr)
        batch = flatten(seqs, self.pad_id, self.position_start)
        bucket = self.buckets.get(batch.width)
        if bucket is None:
            bucket = self.buckets[batch.width] = _Bucket(batch.to(self.device), labels.clone())
        else:
            for dst, src in zip(
                (
                    bucket.batch.input_ids,
                    bucket.batch.position_ids,
                    bucket.batch.cu_seqlens,
                    bucket.batch.starts,
                ),
                (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.starts),
            ):
                # from pinned memory on CUDA: queued behind the last replay instead of waiting for it
                dst.copy_(pinned(src) if self.device.type == "cuda" else src, non_blocking=True)
            bucket.labels.copy_(labels, non_blocking=True)  # on the device already (device to device)
        if not self.capture:
            loss, correct = self._static_step(bucket)
            return loss.clone(), correct.clone()
        if bucket.graph is None:
            self._warm_up_and_capture(bucket)
        bucket.graph.replay()
        return bucket.loss.clone(), bucket.correct.clone()

    def _static_step(self, b: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on the static buffers: only in-place updates, no host sync, no new parameters."""
        # autocast's weight cache must be off while capturing (its cached casts would be freed)
        w = self.working
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False
        ):
            with step_swaps(w, self.fused):
                logits = flat_logits(self.model, b.batch, static_max_len=self.max_len).float()
        loss = F.cross_entropy(logits, b.labels, label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        if w is not None:
            w.grads_to_masters()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        if w is not None:
            w.refresh()  # in place: the graph keeps the working copies' addresses
        zeroed = [p.grad for p in self.params if id(p) not in self.copied]
        if zeroed:
            torch._foreach_zero_(zeroed)
        return loss.detach() * b.labels.numel(), (logits.argmax(-1) == b.labels).sum().float()

    def _warm_up_and_capture(self, b: _Bucket) -> None:
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._static_step(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # undo the warm-up step: capturing must not change the run
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if p in state:
                        v.copy_(state[p][k])
                    else:
                        v.zero_()  # AdamW's state before its first step: step 0, zero moments
            if self.working is not None:
                self.working.refresh()
        b.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b.graph, pool=self.pool):
            b.loss, b.correct = self._static_step(b)
        self.pool = b.graph.pool()
