"""The node's queue of block computations: ticketed requests first, bounded, never starved.

Every forward a node runs (inference steps and one-shot forwards alike) goes through one
`PriorityScheduler`: a heap ordered by (priority class, arrival), drained by one worker onto
the compute thread. Requests carrying a valid ticket are class HIGH and overtake every queued
free request; within a class it is first come, first served. The queue is bounded, and free
requests may fill only part of it, so a flood of free requests gets clear "busy" refusals while
ticketed ones still find room.

A ticketed request that arrives while a free one is being computed does not wait for it to end:
computations call :meth:`PriorityScheduler.between_blocks` after each block, and there the
compute thread runs the waiting ticketed computations before going on with the free one. Blocks'
weights are read-only and every session has its own cache, so the paused computation resumes
unchanged; the ticketed one waits at most one block instead of a whole free step.

A computation expected to take under ``inline_seconds`` that arrives at an idle node (nothing
running, nothing queued) runs at once on the event loop instead: handing a decode step to the
compute thread and back costs two thread wake-ups, a large share of a small step. Nothing can be
overtaken when nothing waits, and the loop is blocked no longer than ``inline_seconds``. But a
step on the loop cannot be paused (nor a ticketed request even read) until it ends, so free steps
stay on the compute thread while the node has seen ticketed work in the last
``ticketed_recently_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import threading
import time
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
    ticketed_recently_seconds: float = 2.0
    """Free computations never run on the loop this long after a ticketed one started."""

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
        # The heap is shared with the compute thread, which takes ticketed jobs between blocks.
        self._lock = threading.Lock()
        self._in_free_job = threading.local()
        self._last_ticketed = -math.inf
        self.served: deque[Served] = deque(maxlen=1024)
        """The last computations started, in the order they started."""
        self.overtaken = 0
        """Computations that ticketed ones have overtaken in the queue, since the start."""
        self.preempted = 0
        """Times a free computation was paused between two blocks for ticketed ones."""
        self.paused_seconds = 0.0
        """Compute-thread seconds spent in ticketed computations run inside paused free ones
        (a paused computation's wall time includes them). Written by the compute thread only."""

    def queued(self, priority: Priority | None = None) -> int:
        """Computations waiting (of one class, or all)."""
        with self._lock:
            return sum(1 for job in self._heap if priority is None or job.priority == priority)

    async def run(
        self, priority: Priority, function: Callable[[], T], seconds: float = math.inf
    ) -> T:
        """Queue `function` (expected to take `seconds`); wait for its result.

        NodeBusy at once if there is no room.
        """
        if (
            seconds < self.config.inline_seconds
            and self._running is None
            and not self._heap
            and (priority == Priority.HIGH or not self._ticketed_recently())
        ):
            if priority == Priority.HIGH:
                self._last_ticketed = time.monotonic()
            self.served.append(Served(priority, next(self._arrivals), 0))
            result, error = _outcome(function)
            if error is not None:
                raise error
            return result
        if len(self._heap) >= self.config.max_queue:
            raise NodeBusy(f"busy: {len(self._heap)} computations queued, try again later")
        if priority == Priority.FREE and self.queued(Priority.FREE) >= self.config.max_free_queue:
            raise NodeBusy(
                f"busy: {self.config.max_free_queue} free computations queued; "
                "requests with a ticket go ahead"
            )
        loop = asyncio.get_running_loop()
        job = _Job(int(priority), next(self._arrivals), function, loop.create_future())
        with self._lock:
            heapq.heappush(self._heap, job)
        self._ensure_worker()
        if self._wakeup is not None:
            self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The requester left (its stream closed): free its place in the queue at once.
            with self._lock:
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
            job = self._take(running=None)
            if job is None:
                if wakeup is None:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            self._running = job
            try:
                result = await loop.run_in_executor(self._executor, self._call, job)
            except Exception as error:  # delivered to the waiting request, not lost
                _deliver(job, None, error)
            else:
                _deliver(job, result, None)
            finally:
                self._running = None

    def _ticketed_recently(self) -> bool:
        return time.monotonic() - self._last_ticketed < self.config.ticketed_recently_seconds

    def _take(self, running: _Job | None) -> _Job | None:
        """The next job whose requester still waits, noted as started; None if there is none.

        With `running` (a free job to pause, on the compute thread) only a ticketed job is taken.
        """
        with self._lock:
            while self._heap and (running is None or self._heap[0].priority == Priority.HIGH):
                job = heapq.heappop(self._heap)
                if job.future.done():
                    continue
                overtook = sum(1 for other in self._heap if other.arrival < job.arrival)
                overtook += running is not None
                self.served.append(Served(Priority(job.priority), job.arrival, overtook))
                if job.priority == Priority.HIGH:
                    self.overtaken += overtook
                    self._last_ticketed = time.monotonic()
                return job
        return None

    def _call(self, job: _Job) -> Any:
        """On the compute thread: run `job`, pausable between blocks if it is free."""
        self._in_free_job.job = job if job.priority == Priority.FREE else None
        try:
            result, error = _outcome(job.run)
        finally:
            self._in_free_job.job = None
        if error is not None:
            raise error
        return result

    def between_blocks(self) -> None:
        """Called by a computation after each block: if it is a free one running on the compute
        thread and ticketed ones wait, run them now, then return to it."""
        running: _Job | None = getattr(self._in_free_job, "job", None)
        job = self._take(running) if running is not None else None
        if job is None:
            return
        self.preempted += 1
        while job is not None:
            began = time.perf_counter()
            self._in_free_job.job = None  # the ticketed job's own boundaries pause nothing
            try:
                result, error = _outcome(job.run)
            finally:
                self._in_free_job.job = running
            self.paused_seconds += time.perf_counter() - began
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                job.future.get_loop().call_soon_threadsafe(_deliver, job, result, error)
            job = self._take(running)

    def close(self) -> None:
        """Stop: every waiting (and the running) computation gets NodeBusy."""
        if self._worker is not None:
            self._worker.cancel()
        with self._lock:
            jobs = [*self._heap, *([self._running] if self._running is not None else [])]
            self._heap.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(NodeBusy("the node is shutting down"))


def _outcome(function: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """Run `function`: its result, or what it raised as an error a future can carry.

    Whatever a computation raises goes to its requester and never further: not into a free
    computation it ran inside, not out of the compute thread. Futures refuse StopIteration, and
    a BaseException would end the worker, leaving every request waiting.
    """
    try:
        return function(), None
    except Exception as error:
        if isinstance(error, StopIteration):
            return None, RuntimeError(f"the computation raised {error!r}")
        return None, error
    except BaseException as error:
        return None, RuntimeError(f"the computation raised {error!r}")


def _deliver(job: _Job, result: Any, error: BaseException | None) -> None:
    """On the event loop: hand a job's result (or error) to its requester, if it still waits."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)
