"""Request batching: requests that arrive together share one model call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..inference.classifier import Prediction

log = logging.getLogger("imdb_lora.serve")


# ---------------------------------------------------------------- batching


class ModelError(Exception):
    """The model failed on a batch; the client gets a generic 500, the log gets the traceback."""


@dataclass(eq=False)
class Job:
    """One request's texts and the future its answer arrives on. `waiting` until a model call takes it:
    only then is it computed, so a job cancelled while waiting costs no model time at all."""

    texts: list[str]
    future: asyncio.Future
    waiting: bool = True


@dataclass
class BatchStats:
    calls: int = 0
    texts: int = 0
    requests: int = 0
    largest: int = 0
    dropped: int = 0  # texts of jobs cancelled before a model call took them (gone clients, deadlines)
    model_seconds: float = 0.0
    sizes: list[int] = field(default_factory=list, repr=False)

    def add(self, requests: int, texts: int, seconds: float) -> None:
        self.calls += 1
        self.requests += requests
        self.texts += texts
        self.model_seconds += seconds
        self.largest = max(self.largest, texts)
        self.sizes = (self.sizes + [texts])[-1000:]  # recent sizes, bounded

    def texts_per_second(self) -> float | None:
        """The model's measured throughput so far (None before the first call)."""
        return self.texts / self.model_seconds if self.model_seconds > 0 else None


class Batcher:
    """An asyncio queue drained by one worker: requests arriving within `max_wait_s` of each other share
    one model call of at most `max_batch` texts (a single larger request runs alone). The model runs in
    a thread, so the event loop keeps accepting requests while it computes.

    `queued` counts the texts admitted and not yet taken by a model call (the service bounds it);
    `on_call(texts, seconds)` is told about every model call (the service's metrics)."""

    def __init__(
        self,
        run: Callable[[list[str]], list[Prediction]],
        max_batch: int,
        max_wait_s: float,
        on_call: Callable[[int, float], None] | None = None,
    ):
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_call = on_call
        self.stats = BatchStats()
        self.queued = 0
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        # A queue.get() that outlived a timed wait is kept, not cancelled: cancelling one that has just
        # taken a job would drop that job (asyncio.wait_for can lose the result on Python < 3.12).
        self._getter: asyncio.Future | None = None

    async def submit(self, texts: list[str]) -> list[Prediction]:
        return await self.enqueue(texts).future

    def enqueue(self, texts: list[str]) -> Job:
        """Queue texts for the next model calls; cancel the job's future to withdraw them."""
        if self._task is None or self._task.done():  # started lazily, inside the serving event loop
            self._queue, self._getter = asyncio.Queue(), None
            self._task = asyncio.create_task(self._worker())
        job = Job(texts, asyncio.get_running_loop().create_future())
        self.queued += len(texts)
        # a job cancelled while it waits leaves the count at once, not when the worker reaches it
        job.future.add_done_callback(lambda _: self._leave_queue(job, dropped=True))
        self._queue.put_nowait(job)  # type: ignore[union-attr]
        return job

    def withdraw(self, job: Job) -> bool:
        """Cancel a job (its client left, or its deadline passed); True if it was never computed."""
        was_waiting = job.waiting
        job.future.cancel()
        self._leave_queue(job, dropped=True)
        return was_waiting

    def _leave_queue(self, job: Job, dropped: bool) -> None:
        if job.waiting:
            job.waiting = False
            self.queued -= len(job.texts)
            if dropped:
                self.stats.dropped += len(job.texts)

    async def stop(self) -> None:
        for task in (self._task, self._getter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._getter = None

    async def _worker(self) -> None:
        held: Job | None = None  # a job that did not fit the last batch opens the next one
        while True:
            first = held or await self._next(None)
            if first is None:
                continue
            jobs, held = await self._gather(first)
            await self._run_jobs(jobs)

    async def _next(self, timeout: float | None) -> Job | None:
        """The next queued job, waiting at most `timeout` seconds (None: for ever); None if none came."""
        if self._getter is None:
            try:
                return self._queue.get_nowait()  # type: ignore[union-attr]
            except asyncio.QueueEmpty:
                self._getter = asyncio.ensure_future(self._queue.get())  # type: ignore[union-attr]
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        job, self._getter = self._getter.result(), None
        return job

    async def _gather(self, first: Job) -> tuple[list[Job], Job | None]:
        loop = asyncio.get_running_loop()
        jobs, n = [first], len(first.texts)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            job = await self._next(max(0.0, deadline - loop.time()))
            if job is None:
                break
            if n + len(job.texts) > self.max_batch:
                return jobs, job
            jobs.append(job)
            n += len(job.texts)
        return jobs, None

    async def _run_jobs(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # gone clients and expired deadlines: not computed
        for j in jobs:
            self._leave_queue(j, dropped=False)
        texts = [t for j in jobs for t in j.texts]
        if not texts:
            return
        t0 = time.perf_counter()
        try:
            preds = await asyncio.to_thread(self._run, texts)
        except Exception:
            log.exception("model call failed on a batch of %d texts", len(texts))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(ModelError())
            return
        seconds = time.perf_counter() - t0
        self.stats.add(len(jobs), len(texts), seconds)
        if self.on_call is not None:
            self.on_call(len(texts), seconds)
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(preds[start : start + len(j.texts)])
            start += len(j.texts)
