"""The node's priority queue: ticketed first, FIFO within a class, bounded, busy when full."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from corolla.errors import NodeBusy
from corolla.node.scheduler import Priority, PriorityScheduler, SchedulerConfig


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until `condition()` holds; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition never held in {seconds:g} s")
        await asyncio.sleep(0.001)


async def _blocked(scheduler: PriorityScheduler, gate: threading.Event) -> asyncio.Task:
    """Occupy the worker until `gate` is set, so later jobs queue up; returns once the blocking
    job runs on the compute thread."""
    started = threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(60)  # bounded: a failed test must not leave the executor stuck

    task = asyncio.ensure_future(scheduler.run(Priority.FREE, hold))
    await _until(started.is_set)
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
    await _until(lambda: scheduler.queued() == 5)
    gate.set()
    await asyncio.gather(blocker, *jobs)
    assert order == ["paid-1", "paid-2", "free-1", "free-2", "free-3"]


async def test_a_flood_of_free_jobs_is_refused_busy_but_ticketed_jobs_still_get_in(executor):
    scheduler = PriorityScheduler(SchedulerConfig(max_queue=6, max_free_queue=4), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    free = [asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: "f")) for _ in range(4)]
    await _until(lambda: scheduler.queued(Priority.FREE) == 4)
    with pytest.raises(NodeBusy, match="busy"):
        await scheduler.run(Priority.FREE, lambda: "one too many")
    paid = [asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: "p")) for _ in range(2)]
    await _until(lambda: scheduler.queued(Priority.HIGH) == 2)
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
    await _until(lambda: scheduler.queued() == 4)
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
    await _until(lambda: scheduler.queued() == 1)
    with pytest.raises(NodeBusy):
        await scheduler.run(Priority.FREE, lambda: "no room")
    waiting.cancel()
    await _until(waiting.done)  # the request has left
    assert scheduler.queued() == 0
    later = asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: "room again"))
    await _until(lambda: scheduler.queued() == 1)
    gate.set()
    assert await later == "room again"
    await blocker


async def test_closing_refuses_the_waiting_and_the_running_jobs(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    gate = threading.Event()
    blocker = await _blocked(scheduler, gate)
    waiting = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: "never"))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
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
    await _until(lambda: cheap.done() or scheduler.queued() == 1)  # run inline, or queued
    assert not cheap.done()
    gate.set()
    assert await cheap != loop_thread
    await blocker


def _blocks(
    scheduler: PriorityScheduler, name: str, order: list[str], gate: threading.Event, count: int = 3
):
    """A job of `count` "blocks" that waits for `gate` after its first one, like a span forward
    calling `between_blocks` after each block but the last."""

    def run() -> str:
        for index in range(count):
            if index:
                scheduler.between_blocks()
            order.append(f"{name}-{index}")
            if index == 0:
                gate.wait(5)
        return name

    return run


async def _running(
    scheduler: PriorityScheduler, priority: Priority, name: str, order: list[str]
) -> tuple[asyncio.Future[str], threading.Event]:
    """A `_blocks` job of `priority`, started and held after its first block until the
    returned gate is set."""
    gate = threading.Event()
    job = asyncio.ensure_future(scheduler.run(priority, _blocks(scheduler, name, order, gate)))
    await _until(lambda: f"{name}-0" in order)
    return job, gate


async def test_a_ticketed_job_runs_between_two_blocks_of_a_running_free_one(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)
    queued_free = asyncio.ensure_future(scheduler.run(Priority.FREE, lambda: order.append("next")))
    paid = [
        asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda n=n: order.append(f"paid-{n}")))
        for n in (1, 2)
    ]
    await _until(lambda: scheduler.queued() == 3)
    gate.set()
    assert await free == "free"
    await asyncio.gather(queued_free, *paid)
    # Both ticketed jobs ran at the first block boundary; the queued free job after the free one.
    assert order == ["free-0", "paid-1", "paid-2", "free-1", "free-2", "next"]
    assert scheduler.preempted == 1  # one pause, two ticketed jobs in it
    overtook = [(job.priority, job.overtook) for job in scheduler.served]
    assert overtook == [
        (Priority.FREE, 0),
        (Priority.HIGH, 2),  # the running free job and the queued one
        (Priority.HIGH, 2),
        (Priority.FREE, 0),
    ]
    assert scheduler.overtaken == 4


async def test_a_running_ticketed_job_is_not_paused_for_another_ticketed_one(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    order: list[str] = []
    first, gate = await _running(scheduler, Priority.HIGH, "paid-1", order)
    second = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: order.append("paid-2")))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    gate.set()
    await asyncio.gather(first, second)
    assert order == ["paid-1-0", "paid-1-1", "paid-1-2", "paid-2"]
    assert scheduler.preempted == 0


async def test_a_ticketed_job_run_between_blocks_is_not_paused_for_the_next_ticketed_one(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)
    paid_gate = threading.Event()
    first = asyncio.ensure_future(
        scheduler.run(Priority.HIGH, _blocks(scheduler, "paid-1", order, paid_gate))
    )
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    gate.set()  # the free job reaches its first boundary and runs paid-1, held after a block
    await _until(lambda: "paid-1-0" in order)
    second = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: order.append("paid-2")))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    paid_gate.set()
    await asyncio.gather(free, first, second)
    assert order == ["free-0", "paid-1-0", "paid-1-1", "paid-1-2", "paid-2", "free-1", "free-2"]
    assert scheduler.preempted == 1


async def test_a_ticketed_job_failing_between_blocks_reports_its_error_and_the_free_one_ends(
    executor,
):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)

    def fail() -> None:
        raise ValueError("broken ticketed step")

    paid = asyncio.ensure_future(scheduler.run(Priority.HIGH, fail))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    gate.set()
    with pytest.raises(ValueError, match="broken ticketed step"):
        await paid
    assert await free == "free"
    assert order == ["free-0", "free-1", "free-2"]


async def test_between_blocks_pauses_nothing_off_the_compute_thread_or_outside_a_free_job(
    executor,
):
    scheduler = PriorityScheduler(SchedulerConfig(inline_seconds=0.01), executor)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)
    paid = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: order.append("paid")))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    scheduler.between_blocks()  # on the loop thread, while a free job holds the compute thread
    assert "paid" not in order and scheduler.queued(Priority.HIGH) == 1
    gate.set()
    await asyncio.gather(free, paid)
    assert order == ["free-0", "paid", "free-1", "free-2"]  # at the free job's own boundary
    # A cheap job on an idle node runs on the loop, where its boundaries pause nothing.
    opened = threading.Event()
    opened.set()
    cheap = _blocks(scheduler, "inline", order, opened)
    assert await scheduler.run(Priority.FREE, cheap, seconds=0) == "inline"
    assert scheduler.preempted == 1


@pytest.mark.parametrize("raised", [StopIteration(), KeyboardInterrupt(), SystemExit(3)])
async def test_whatever_a_job_raises_reaches_its_requester_and_the_queue_keeps_serving(
    executor, raised
):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)

    def escape() -> None:
        raise raised

    for seconds in (0, math.inf):  # on the loop (cheap, idle node), on the compute thread
        with pytest.raises(RuntimeError, match="the computation raised"):
            await scheduler.run(Priority.FREE, escape, seconds)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)
    paid = asyncio.ensure_future(scheduler.run(Priority.HIGH, escape))  # run at a boundary
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    gate.set()
    with pytest.raises(RuntimeError, match="the computation raised"):
        await paid
    assert await free == "free"
    assert await scheduler.run(Priority.FREE, lambda: 42) == 42


async def test_paused_seconds_count_the_ticketed_jobs_run_inside_a_free_one(executor):
    scheduler = PriorityScheduler(SchedulerConfig(), executor)
    order: list[str] = []
    free, gate = await _running(scheduler, Priority.FREE, "free", order)
    paid = asyncio.ensure_future(scheduler.run(Priority.HIGH, lambda: time.sleep(0.05)))
    await _until(lambda: scheduler.queued(Priority.HIGH) == 1)
    gate.set()
    await asyncio.gather(free, paid)
    assert scheduler.paused_seconds >= 0.05


async def test_after_ticketed_work_cheap_free_jobs_stay_on_the_compute_thread_to_be_pausable(
    executor,
):
    scheduler = PriorityScheduler(
        SchedulerConfig(inline_seconds=0.01, ticketed_recently_seconds=60), executor
    )
    loop_thread = threading.get_ident()
    assert await scheduler.run(Priority.FREE, threading.get_ident, seconds=0) == loop_thread
    assert await scheduler.run(Priority.HIGH, threading.get_ident, seconds=0) == loop_thread
    assert await scheduler.run(Priority.FREE, threading.get_ident, seconds=0) != loop_thread
    forgetful = PriorityScheduler(
        SchedulerConfig(inline_seconds=0.01, ticketed_recently_seconds=0), executor
    )
    await forgetful.run(Priority.HIGH, threading.get_ident, seconds=0)
    assert await forgetful.run(Priority.FREE, threading.get_ident, seconds=0) == loop_thread
