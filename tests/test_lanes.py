"""A lane counts its calls while they run in their threads, abandoned ones included."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import partial

import pytest
import trio

from uploader.lanes import StillRunning, ThreadLane


async def test_a_running_call_shows_its_age_and_counts_as_stuck_only_past_the_limit() -> None:
    lane = ThreadLane("azure", 2, stuck_after_s=0.5)
    release = threading.Event()
    assert lane.snapshot() == {"threads": 2, "running": 0, "stuck": 0, "longest_running_s": 0.0}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run, release.wait)
        await trio.sleep(0.25)
        early = lane.snapshot()
        assert early["running"] == 1 and early["stuck"] == 0
        assert 0.1 <= early["longest_running_s"] < 0.5
        await trio.sleep(0.5)
        late = lane.snapshot()
        assert late["stuck"] == 1 and late["longest_running_s"] >= 0.5
        release.set()
    assert lane.snapshot() == {"threads": 2, "running": 0, "stuck": 0, "longest_running_s": 0.0}


async def test_an_abandoned_call_still_counts_and_holds_its_thread_until_it_returns() -> None:
    lane = ThreadLane("nfs", 1, stuck_after_s=10)
    release = threading.Event()
    with trio.move_on_after(0.2):
        await lane.run(release.wait)
    assert lane.running() == 1  # cancelled, but the thread is still in the call
    release.set()
    # The lane's only thread is free again once the abandoned call has returned.
    await lane.run(lambda: None)
    assert lane.running() == 0


@pytest.mark.parametrize("threads", [1, 3])
async def test_a_lane_runs_at_most_its_thread_count_at_once(threads: int) -> None:
    lane = ThreadLane("staging", threads)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(threads + 2):
            nursery.start_soon(lane.run, release.wait)
        await trio.sleep(0.2)
        assert lane.running() == threads
        release.set()


async def test_a_call_answered_within_a_while_is_one_begun_and_returned_in_it() -> None:
    lane = ThreadLane("azure", 2)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run, release.wait)  # begun before the while
        await trio.sleep(0.05)
        after = time.monotonic()
        release.set()
    assert not lane.answered_within(after, time.monotonic())  # returned in it, begun before
    await lane.run(lambda: None)
    before = time.monotonic()
    assert lane.answered_within(after, before)
    assert not lane.answered_within(before, before + 10)  # nothing begun since
    with pytest.raises(ZeroDivisionError):
        await lane.run(lambda: 1 / 0)
    assert not lane.answered_within(before, time.monotonic())  # a failure is no answer


async def test_a_check_abandoned_on_a_hang_takes_one_thread_however_often_it_is_asked_again() -> None:
    lane = ThreadLane("nfs", 4)
    release = threading.Event()
    for _ in range(10):  # a failure of another file each time, the share still hung
        with trio.move_on_after(0.05):
            await lane.run_alone("probe", release.wait)
    assert lane.running() == 1  # the later ones waited for the first, in no thread
    await lane.run_alone("other", lambda: None)  # another kind is not held up
    release.set()
    with trio.fail_after(5):  # after the abandoned call has returned in its thread
        assert await lane.run_alone("probe", lambda: "answered") == "answered"


async def test_a_check_cancelled_before_it_had_a_thread_leaves_the_next_one_free() -> None:
    lane = ThreadLane("nfs", 1)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run, release.wait)  # the lane's only thread
        await trio.sleep(0.05)
        with trio.move_on_after(0.1):
            await lane.run_alone("probe", lambda: None)  # waits for a thread, then gives up
        release.set()
    assert await lane.run_alone("probe", lambda: "ran") == "ran"


async def test_a_call_that_waits_its_turn_runs_once_the_one_before_has_returned() -> None:
    lane = ThreadLane("nfs", 4)
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        release.wait(10)
        order.append("first")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run_alone, "state write", first)
        await trio.sleep(0.05)
        assert lane.alone_running("state write") is not None
        nursery.start_soon(partial(lane.run_alone, "state write", lambda: order.append("second")))
        await trio.sleep(0.1)
        assert order == [] and lane.running() == 1  # the second waits, in no thread
        release.set()
    assert order == ["first", "second"]
    assert lane.alone_running("state write") is None


async def test_a_caller_cancelled_as_its_thread_starts_never_runs_beside_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its thread has started, but the caller is gone (cancelled) before the call began: the
    turn is given back, so the thread must not run the call beside the next one."""
    lane = ThreadLane("nfs", 4)
    ran: list[str] = []
    outcome: list[BaseException] = []

    class CallerGone(Exception):
        pass

    async def thread_started_then_caller_gone(fn: Callable[..., object]) -> object:
        def late() -> None:
            try:
                fn()
            except BaseException as exc:
                outcome.append(exc)

        threading.Timer(0.1, late).start()  # the thread gets to it after the caller left
        raise CallerGone

    monkeypatch.setattr(lane, "run", thread_started_then_caller_gone)
    with pytest.raises(CallerGone):
        await lane.run_alone("probe", lambda: ran.append("late"))
    assert lane.alone_running("probe") is None  # the turn was given back at once
    await trio.sleep(0.3)
    assert ran == [] and isinstance(outcome[0], StillRunning)


async def test_a_call_run_alone_keeps_the_name_of_what_it_calls() -> None:
    """Its span is named after it (``nfs listdir``, not the wrapper's name)."""
    lane = ThreadLane("nfs", 1)
    names: list[str] = []
    real_run = lane.run

    async def named(fn: Callable[..., object], *args: object) -> object:
        names.append(fn.__name__)
        return await real_run(fn, *args)

    lane.run = named  # type: ignore[method-assign]
    await lane.run_alone("probe", os.listdir, ".")
    assert names == ["listdir"]
