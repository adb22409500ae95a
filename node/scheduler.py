"""The node's queue of block computations: ticketed requests first, bounded, never starved.

Every forward a node runs (inference steps and one-shot forwards alike) goes through one
`PriorityScheduler`: a heap ordered by (priority class, arrival), drained by one worker onto
the compute thread. Requests carrying a valid ticket are class HIGH and overtake every queued
free request; within a class it is first come, first served. The queue is bounded, and free
requests may fill only part of it, so a flood of free requests gets clear "busy" refusals while
ticketed ones still find room.

A computation expected to take under ``inline_seconds`` that arrives at an idle node (nothing
running, nothing queued) runs at once on the event loop instead: handing a decode step to the
compute thread and back costs two thread wake-ups, a large share of a small step. Nothing can be
overtaken when nothing waits, and the loop is blocked no longer than ``inline_seconds``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

from corolla.errors import InvalidInput, NodeBusy

__all__ = ["Priority", "PriorityScheduler", "SchedulerConfig", "Served"]

T = TypeVar("T")


class Priority(IntEnum):
    HIGH = 0  # carries a valid ticket
    FREE = 1


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 64
    """Computations waiting at most, all classes together."""
    max_free_queue: int = 48
    """Free computations waiting at most: the rest of the queue is kept for ticketed ones."""
    inline_seconds: float = 0.01
    """An idle node runs a computation expected to take less than this on the event loop."""

    def __post_init__(self) -> None:
        if self.max_queue < 1 or not 0 <= self.max_free_queue <= self.max_queue:
            raise InvalidInput("need max_queue >= 1 and 0 <= max_free_queue <= max_queue")


class Served(NamedTuple):
    """One computation the scheduler started, in the order it started them."""

    priority: Priority
    arrival: int
    """Its number in the order of arrival (all classes together)."""
    overtook: int
    """Computations that arrived before it and were still waiting when it started."""


@dataclass(order=True)
class _Job:
    priority: int
    arrival: int
    run: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)


class PriorityScheduler:
    """Runs submitted functions one at a time on `executor`, HIGH before FREE."""

    def __init__(self, config: SchedulerConfig, executor: Executor) -> None:
        self.config = config
        self._executor = executor
        self._heap: list[_Job] = []
        self._arrivals = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: _Job | None = None
        self.served: deque[Served] = deque(maxlen=1024)
        """The last computations started, in the order they started."""
        self.overtaken = 0
        """Computations that ticketed ones have overtaken in the queue, since the start."""

    def queued(self, priority: Priority | None = None) -> int:
        """Computations waiting (of one class, or all)."""
        return sum(1 for job in self._heap if priority is None or job.priority == priority)

    async def run(
        self, priority: Priority, function: Callable[[], T], seconds: float = math.inf
    ) -> T:
        """Queue `function` (expected to take `seconds`); wait for its result.

        NodeBusy at once if there is no room.
        """
        if seconds < self.config.inline_seconds and self._running is None and not self._heap:
            self.served.append(Served(priority, next(self._arrivals), 0))
            return function()
        if len(self._heap) >= self.config.max_queue:
            raise NodeBusy(f"busy: {len(self._heap)} computations queued, try again later")
        if priority == Priority.FREE and self.queued(Priority.FREE) >= self.config.max_free_queue:
            raise NodeBusy(
                f"busy: {self.config.max_free_queue} free computations queued; "
                "requests with a ticket go ahead"
            )
        loop = asyncio.get_running_loop()
        job = _Job(int(priority), next(self._arrivals), function, loop.create_future())
        heapq.heappush(self._heap, job)
        self._ensure_worker()
        if self._wakeup is not None:
            self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The requester left (its stream closed): free its place in the queue at once.
            if job in self._heap:
                self._heap.remove(job)
                heapq.heapify(self._heap)
            raise

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        while True:
            if not self._heap:
                if wakeup is None:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            job = heapq.heappop(self._heap)
            if job.future.done():
                continue
            overtook = sum(1 for other in self._heap if other.arrival < job.arrival)
            self.served.append(Served(Priority(job.priority), job.arrival, overtook))
            if job.priority == Priority.HIGH:
                self.overtaken += overtook
            self._running = job
            try:
                result = await loop.run_in_executor(self._executor, job.run)
            except Exception as error:  # delivered to the waiting request, not lost
                if not job.future.done():
                    job.future.set_exception(error)
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self._running = None

    def close(self) -> None:
        """Stop: every waiting (and the running) computation gets NodeBusy."""
        if self._worker is not None:
            self._worker.cancel()
        jobs = [*self._heap, *([self._running] if self._running is not None else [])]
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(NodeBusy("the node is shutting down"))
        self._heap.clear()
