"""Ctrl-C or SIGTERM during an epoch (its steps, its evaluation, its end-of-epoch checkpoint): the work
reaches a boundary where a resume checkpoint can be written, it is written, and only then does the run
stop (with the exception the signal raised before).

- During the steps: the step in flight finishes and the checkpoint is written at that step.
- During the epoch's evaluation (validation, test, the moving average's passes): the pass stops after
  its batch in flight (`check()` raises `StopRequested` there, so the LoRA merge and the moving average
  swapped in for the pass are undone by their own `finally` before anything is saved) and the
  checkpoint of the epoch's steps is written: all steps done, the epoch's row not yet recorded, the raw
  trained weights; `--resume` redoes the evaluation.
- Once the evaluation is over (the best adapter, the epoch's row, the end-of-epoch checkpoint): that
  work finishes (it is short) and the run stops with the end-of-epoch checkpoint.

Before, the signal raised where the loop stood and the run kept its last periodic checkpoint, losing
up to `checkpoint_every` steps, and a signal during the evaluation lost the whole epoch's steps
(scripts/gpu-checks.sh stops a cut training by SIGTERM: those steps were GPU time). A second Ctrl-C
while the work finishes or the checkpoint is written stops at once, as the first did before (the last
checkpoint stays: checkpoint writes are atomic). A second SIGTERM is ignored, as the CLI ignores it (a
process group's members each get one; compare passes its own on to its training child); SIGKILL still
ends it.

A data-parallel run (torchrun) stops at a step boundary too, but every rank must stop after the same
step: each takes part in the collectives of every step (the gradients' all-reduce) and of the stop's
save (the checkpoint's RNG gather), and torchrun passes the signal to each rank, which may then be a
step ahead of another. So the ranks agree at every step boundary (`agree`, with Dist.agree_on_stop: a
MAX over the signal numbers the ranks received) and stop together at the first boundary where any of
them has one, all with the same exception (SIGTERM's if any rank got SIGTERM), rank 0 alone printing.
The epoch's evaluation is not cut there (ranks can hold one evaluation batch more than another, so a
per-batch agreement could wait for a rank that is done): a stop during it is taken after the epoch's
record, at its end-of-epoch checkpoint. A second Ctrl-C does not stop such a run sooner (the first
signal's line says so there): torchrun starts each process in a session of its own, so a terminal's
Ctrl-C reaches torchrun alone, which passes the first on as it came (SIGINT) and, on a second, sends
SIGTERM, which a stopping process ignores, and kills the processes (SIGKILL) 30 s later; stopping at
once on one rank could leave another waiting in a collective anyway. A signal the process does not
take (SIGINT ignored by a background job, SIGTERM at its default outside the CLI) is left as it is.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

from ..errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STEPS = "finishing the step in flight and saving a checkpoint there"  # what the first signal's line says
AGAIN = "Ctrl-C again stops at once"
AGAIN_UNDER_TORCHRUN = "under torchrun, Ctrl-C again does not stop it sooner"  # see the module's docstring


def again_hint(env: Mapping[str, str] = os.environ) -> str:
    """What a second Ctrl-C does, as the first signal's line says it: torchrun's agent sets
    TORCHELASTIC_RUN_ID in every process it starts."""
    return AGAIN_UNDER_TORCHRUN if "TORCHELASTIC_RUN_ID" in env else AGAIN


class StopRequested(BaseException):
    """Raised by `check()` at a boundary inside the work (an evaluation batch) once a stop is requested:
    the caller catches it, saves, and raises `exception()`. A BaseException, so that no `except
    Exception` on the way mistakes it for a failure."""


class StopAtStepBoundary:
    """A context around the training loop: the first SIGINT or SIGTERM only sets `requested`; the loop
    saves and then raises `exception()`. A request the loop has not acted on when the context ends
    (one that came after its last check) is raised on leaving, as the signal would have raised it.
    `doing` is what the first signal's line says will happen (the loop sets it as it moves on)."""

    def __init__(self, enabled: bool = True, announce: bool = True):
        self.enabled = enabled
        self.announce = announce  # whether the first signal's line is printed (rank 0's, under torchrun)
        self.doing = STEPS
        self.again = again_hint()
        self.signum: int | None = None  # the first signal this process received
        self.agreed: int | None = None  # the stop's signal, as the data-parallel ranks agreed on it
        self.acted = False
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agree(self, agree_on_stop: Callable[[int], int]) -> bool:
        """Whether to stop at this boundary, decided with the other ranks of a data-parallel run:
        `agree_on_stop` (Dist.agree_on_stop, a collective) turns this rank's signal number (0: none) into
        the largest any rank has. A stop agreed on is taken here as that signal, received or not; it does
        not count as this process's first signal (its own, coming later, is not a second Ctrl-C)."""
        agreed = agree_on_stop(self.agreed or self.signum or 0)
        if agreed:
            self.agreed = agreed
        return bool(agreed)

    def exception(self) -> KeyboardInterrupt:
        """What the signal raised before (the CLI turns it into the stop line and the exit status)."""
        self.acted = True
        return Terminated() if (self.agreed or self.signum) == signal.SIGTERM else KeyboardInterrupt()

    def check(self) -> None:
        """A boundary inside the work: raise StopRequested if a stop is waiting there."""
        if self.requested and not self.acted:
            raise StopRequested

    def __enter__(self) -> StopAtStepBoundary:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            if callable(signal.getsignal(sig)):  # taken by Python (KeyboardInterrupt, the CLI's SIGTERM)
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            if self.announce:  # os.write, not print: a handler runs between any two bytecodes
                os.write(
                    2,
                    f"\nimdb-lora: {name}: {self.doing}, then stopping ({self.again})\n".encode(),
                )
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: at once, the last checkpoint kept
            raise KeyboardInterrupt
        # a second SIGTERM: ignored, as the CLI ignores it once stopping

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self.previous.items():
            stopping_by_sigterm = sig == signal.SIGTERM and signal.SIGTERM in (self.signum, self.agreed)
            signal.signal(sig, signal.SIG_IGN if stopping_by_sigterm else handler)  # type: ignore[arg-type]
        self.previous.clear()
        if exc_type is StopRequested:  # a check no caller acted on: the stop all the same, without a save
            raise self.exception() from None
        if exc_type is None and (self.requested or self.agreed) and not self.acted:
            raise self.exception()
