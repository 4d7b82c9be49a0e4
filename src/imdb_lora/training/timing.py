"""Where a `train` command's wall time went, phase by phase, from the command's start to its record.

Why: run.json's `wall_seconds` covers the loop and the post-training steps only; a GPU run spent a fifth
of its wall outside it (imports, CUDA's start, the model load, the reports) with nothing saying where.
Each phase is timed exclusively: a phase timed inside another (a checkpoint written during the steps)
counts for itself alone and not again for the one around it, so the phases never add up to more than
the total, and `other` is the time no phase covered (progress bars, the loop's bookkeeping).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# In the order a run goes through them (run.json's `time_breakdown` keeps this order)
PHASES = (
    "startup",  # the CLI's start to the trainer's setup: importing torch and the trainer, the config
    "setup",  # device start (CUDA's init), directory checks, the model's config, the tokenizer, the
    # optimizer (a resume: its checkpoint read)
    "data",  # reading, splitting and tokenizing the data (= data_seconds)
    "model",  # building or loading the model, its move to the device, frozen weights cast to bf16, and
    # (a fresh run) the tokenizer written to tokenizer/, a random-init LoRA base to base_model/
    "train_steps",  # the epochs' optimizer steps (first-step compilation and graph capture included)
    "evaluation",  # the epochs' validation and test passes (and the EMA's)
    "saving",  # kept weights, resume checkpoints, metrics.jsonl and run.json during the loop
    "after_training",  # restoring the kept weights, calibration, the --eval-file reports
    "reports",  # curves.png and reliability.png
)


class Phases:
    """Seconds per phase of one process, measured on a monotonic clock from `start` (time.monotonic)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._inner: list[float] = []  # per open phase: the seconds its nested phases took

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as `name`, less any phase timed inside it (counted there)."""
        t0 = time.monotonic()
        self._inner.append(0.0)
        try:
            yield
        finally:
            span = time.monotonic() - t0
            self.seconds[name] += span - self._inner.pop()
            if self._inner:
                self._inner[-1] += span

    def add(self, name: str, seconds: float) -> None:
        """Count `seconds` measured by the caller (a span no other phase covers) as `name`."""
        self.seconds[name] += seconds
        if self._inner:
            self._inner[-1] += seconds

    def since_start(self, name: str) -> None:
        """Count the time from `start` to now as `name` (the first phase: nothing is timed before it)."""
        self.seconds[name] += time.monotonic() - self.start

    def breakdown(self) -> dict[str, float]:
        """Each phase's seconds, `other` (what none covered) and `total` (start to now), in run order."""
        total = time.monotonic() - self.start
        covered = sum(self.seconds.values())
        return {**self.seconds, "other": max(0.0, total - covered), "total": total}


def breakdown_line(breakdown: dict[str, float]) -> str:
    """One line for the end of `train`: the total, then each phase that shows as 0.1 s or more."""
    parts = [
        f"{name.replace('_', ' ')} {s:.1f}" for name, s in breakdown.items() if name != "total" and s >= 0.05
    ]
    total = f"time: {breakdown['total']:.1f} s"
    # a resume that only calibrates a tiny run: nothing to list, and a bare `=` would read as cut off
    return f"{total} = " + " + ".join(parts) if parts else f"{total} (every phase under 0.05 s)"
