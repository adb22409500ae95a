"""The node's priority queue: ticketed first, FIFO within a class, bounded, busy when full."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from corolla.errors import NodeBusy
from corolla.node.scheduler import Priority, PriorityScheduler, SchedulerConfig


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


async def _blocked(scheduler: PriorityScheduler, gate: threading.Event) -> asyncio.Task:
    """Occupy the worker until `gate` is set, so later jobs queue up."""
    task = asyncio.ensure_future(scheduler.run(Priority.FREE, gate.wait))
    while not scheduler.served:
        await asyncio.sleep(0.001)
    return task


async def test_ticketed_jobs_overtake_queued_free_jobs_fifo_within_a_class(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    order: list[str] = []
    jobs = [
        asyncio.ensure_future(scheduler.run(priority, lambda name=name: order.append(name)))
        for name, priority in [
            ("free-1", Priority.FREE),
            ("free-2", Priority.FREE),
            ("paid-1", Priority.HIGH),
            ("free-3", Priority.FREE),
            ("paid-2", Priority.HIGH),
        ]
    ]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(blocker, *jobs)
    assert order == ["paid-1", "paid-2", "free-1", "free-2", "free-3"]


async def test_a_flood_of_free_jobs_is_refused_busy_but_ticketed_jobs_still_get_in(executor):
    scheduler = PriorityScheduler(SchedulerConfig(max_queue=6, max_free_queue=4), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    free = [asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: "f")) for _ in range(4)]
    await asyncio.sleep(0.01)
    with pytest.raises(NodeBusy, match="busy"):
        await scheduler.run(Priority.FREE, lambda: "one too many")
    paid = [asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: "p")) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(NodeBusy, match="busy"):
        await scheduler.run(Priority.HIGH, lambda: "queue full")
    gate.set()
    assert await asyncio.gather(*paid) == ["p", "p"]
    assert await asyncio.gather(*free) == ["f"] * 4
    await blocker


async def test_a_failing_job_reports_its_error_and_the_queue_keeps_serving(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)

    def fail() -> None:
        raise ValueError("broken step")

    with pytest.raises(ValueError, match="broken step"):
        await scheduler.run(Priority.FREE, fail)
    assert await scheduler.run(Priority.FREE, lambda: 42) == 42


async def test_served_records_how_many_waiting_jobs_each_overtook(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    jobs = [
        asyncio.ensure_future(scheduler.run(priority, lambda: None))
        for priority in (Priority.FREE, Priority.FREE, Priority.HIGH, Priority.FREE)
    ]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(blocker, *jobs)
    started = [(job.priority, job.overtook) for job in list(scheduler.served)[1:]]
    assert started == [
        (Priority.HIGH, 2),  # went past the two free jobs that came first
        (Priority.FREE, 0),
        (Priority.FREE, 0),
        (Priority.FREE, 0),
    ]
    assert scheduler.overtaken == 2


async def test_a_request_that_leaves_the_queue_frees_its_place(executor):
    scheduler = PriorityScheduler(SchedulerConfig(max_queue=2, max_free_queue=1), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    waiting = asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: "left"))
    await asyncio.sleep(0.01)
    with pytest.raises(NodeBusy):
        await scheduler.run(Priority.FREE, lambda: "no room")
    waiting.cancel()
    await asyncio.sleep(0.01)
    assert scheduler.queued() == 0
    later = asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: "room again"))
    await asyncio.sleep(0.01)
    gate.set()
    assert await later == "room again"
    await blocker


async def test_closing_refuses_the_waiting_and_the_running_jobs(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    waiting = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: "never"))
    await asyncio.sleep(0.01)
    scheduler.close()
    gate.set()
    for job in (blocker, waiting):
        with pytest.raises(NodeBusy, match="shutting down"):
            await job


async def test_an_idle_scheduler_runs_a_cheap_job_on_the_loop_and_a_costly_one_on_the_executor(
    executor,
):
    scheduler = PriorityScheduler(SchedulerConfig(inline_seconds=0.01), executor)
    loop_thread = threading.get_ident()
    assert await scheduler.run(Priority.FREE, threading.get_ident, seconds=0.001) == loop_thread
    assert await scheduler.run(Priority.FREE, threading.get_ident, seconds=0.5) != loop_thread
    assert await scheduler.run(Priority.FREE, threading.get_ident) != loop_thread  # unknown cost


async def test_a_cheap_job_queues_behind_a_running_one_instead_of_running_on_the_loop(executor):
    scheduler = PriorityScheduler(SchedulerConfig(inline_seconds=0.01), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    loop_thread = threading.get_ident()
    cheap = asyncio.ensure_future(scheduler.run(Priority.HIGH, threading.get_ident, seconds=0))
    await asyncio.sleep(0.01)
    assert not cheap.done()
    gate.set()
    assert await cheap != loop_thread
    await blocker
