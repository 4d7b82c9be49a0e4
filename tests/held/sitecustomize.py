"""Holds a real `imdb-lora train` (or `score`) process at a chosen point until a signal comes (tests that
send one).

A test that sends Ctrl-C or SIGTERM to a real training process at some point of its work cannot time the
signal by watching its files: the setup of a tiny model, from its run folder appearing to its first step,
takes ~0.08 s, and a test process that the machine's load keeps off the CPU for longer than that sends
the signal into the steps instead (a different stop, with a checkpoint: the flake this replaces).

Put this folder first on PYTHONPATH (`conftest.hold_train_at`, `conftest.hold_score_at`) and Python
imports it at start-up, as `sitecustomize`, in every process of the command (`imdb-lora compare`'s
children, torchrun's ranks too). In a process that runs `imdb-lora train` (under torchrun, the rank
IMDB_LORA_TEST_HOLD_RANK alone, if set) it wraps `Trainer.<method>` (IMDB_LORA_TEST_HOLD_AT="method"
or "method:n"); in one that runs `imdb-lora score` (IMDB_LORA_TEST_HOLD_COMMAND=score), the local
engine's `PartWriter.<method>`. The n-th call (the first by default) creates the file
IMDB_LORA_TEST_HOLD_READY and waits there. The test
sends its signal once that file exists, so the process is in that call whatever the load, and the
product's own handling decides what follows: a handler that raises (KeyboardInterrupt, the CLI's SIGTERM)
ends the wait as it would end the method; one that only records the stop (training's stop at a step
boundary) ends the wait too, and the method then runs as it would have.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

WAIT_S = 300  # a signal that never comes fails the run rather than hang the test
# The class whose method is held, by command.
TARGETS = {
    "train": ("imdb_lora.training.trainer", "Trainer"),
    "score": ("imdb_lora.scale.engines", "PartWriter"),
}


def stop_recorded() -> bool:
    """Whether a signal was taken by a handler that records it (training.stopping.StopAtStepBoundary)."""
    return any(
        getattr(getattr(signal.getsignal(sig), "__self__", None), "requested", False)
        for sig in (signal.SIGINT, signal.SIGTERM)
    )


def hold(command: str, spec: str, ready: Path) -> None:
    import importlib

    module, name = TARGETS[command]
    target = getattr(importlib.import_module(module), name)
    method, _, nth = spec.partition(":")
    original = getattr(target, method)
    calls = {"n": 0}

    def held(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth or 1):
            ready.touch()
            deadline = time.monotonic() + WAIT_S
            while not stop_recorded():
                if time.monotonic() > deadline:
                    raise SystemExit(f"held in {name}.{method} for {WAIT_S} s and no signal came")
                time.sleep(0.02)  # a handler that raises raises here
        return original(self, *args, **kwargs)

    setattr(target, method, held)


def chosen(command: str) -> bool:
    """An `imdb-lora COMMAND` process the test holds: every one, or under torchrun the rank named in
    IMDB_LORA_TEST_HOLD_RANK only."""
    rank = os.environ.get("RANK", "0")
    return sys.argv[1:2] == [command] and os.environ.get("IMDB_LORA_TEST_HOLD_RANK", rank) == rank


COMMAND = os.environ.get("IMDB_LORA_TEST_HOLD_COMMAND", "train")
if os.environ.get("IMDB_LORA_TEST_HOLD_AT") and chosen(COMMAND):
    hold(COMMAND, os.environ["IMDB_LORA_TEST_HOLD_AT"], Path(os.environ["IMDB_LORA_TEST_HOLD_READY"]))
