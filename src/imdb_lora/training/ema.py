"""Exponential moving average (EMA) of the trainable weights, evaluated beside the raw weights.

The average lives on the weights' device and is updated after every optimizer step by one fused
foreach operation: no host sync, no copy to the CPU. It is bias-corrected like Adam's moments (the
average starts at zero and is divided by 1 - decay^steps when used), so early in training it is the
plain average of the steps so far rather than a pull towards the initial weights; later it averages
about the last 1 / (1 - decay) steps.

Training never reads the average: the raw weights take exactly the steps they take without it, and the
average is swapped in only to evaluate (and to save, when it wins on validation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError

PREFIX = "ema/"  # checkpoint keys: ema/<parameter name> and ema/.steps


class Ema:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        # Detached views share the weights' storage, so the optimizer's in-place updates show through:
        # built once, not per step (host time per step is what limits training on a fast GPU).
        self._sources = [p.detach() for p in self.params]
        self.steps = 0

    @classmethod
    def for_model(cls, model: nn.Module, decay: float) -> Ema | None:
        """An EMA of the model's trainable weights, or None when decay is 0 (off)."""
        return cls(model, decay) if decay > 0 else None

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, after an optimizer step."""
        self.steps += 1
        torch._foreach_lerp_(self.shadow, self._sources, 1.0 - self.decay)

    def averaged(self) -> list[torch.Tensor]:
        """The bias-corrected average, one tensor per trainable weight."""
        if self.steps == 0:
            return [p.detach().clone() for p in self.params]
        return torch._foreach_div(self.shadow, 1.0 - self.decay**self.steps)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the raw ones inside the block; the raw ones after it."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.averaged())
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        out[PREFIX + ".steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from checkpoint tensors (other keys are ignored); a checkpoint without EMA state
        (a run started without --ema-decay) cannot be resumed with it: the config check refuses that,
        and a checkpoint that lacks it all the same (another version's) is refused in one line."""
        missing = [n for n in [*self.names, ".steps"] if PREFIX + n not in tensors]
        if missing:
            raise UserError(f"--resume: the checkpoint has no moving average of {missing[0]} (--ema-decay)")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(tensors[PREFIX + n])
        self.steps = int(tensors[PREFIX + ".steps"])
