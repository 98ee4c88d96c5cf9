"""The watcher's rules, on Trio's virtual clock (autojump_clock): no real sleeping."""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from uploader import watcher
from uploader.drain import Offers
from uploader.fileops import ScanEntry
from uploader.layout import FileKey, Layout
from uploader.progress import Progress
from uploader.watcher import Backoff, StabilityTracker
from uploader.worker import WorkItem

DATE = "20260101"


class InlineLane:
    """Runs the blocking call on the Trio thread: the virtual clock then sees every step."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[float] = []
        self.fail_first = fail_first

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.fail_first:
            raise OSError(errno.EIO, "Input/output error")
        return fn(*args, **kwargs)


def append(path: Path, data: bytes, *, mtime: float) -> None:
    with open(path, "ab") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def entry(rel: str, size: int = 10, mtime_s: float = 0.0) -> ScanEntry:
    return ScanEntry(rel, size, int(mtime_s * 1e9))


# --- StabilityTracker: pure bookkeeping -------------------------------------------------


def test_a_file_seen_once_is_not_stable() -> None:
    tracker = StabilityTracker(min_age_s=5)
    assert tracker.observe([entry("a", mtime_s=0)], wall_now=100, monotonic_now=0) == []


def test_a_file_unchanged_across_two_scans_and_old_enough_is_stable() -> None:
    tracker = StabilityTracker(min_age_s=5)
    tracker.observe([entry("a", mtime_s=0)], wall_now=100, monotonic_now=0)
    assert tracker.observe([entry("a", mtime_s=0)], wall_now=101, monotonic_now=1) == [entry("a", mtime_s=0)]


def test_a_changed_size_or_mtime_starts_over() -> None:
    tracker = StabilityTracker(min_age_s=5)
    tracker.observe([entry("a", size=1)], wall_now=100, monotonic_now=0)
    assert tracker.observe([entry("a", size=2)], wall_now=101, monotonic_now=1) == []
    assert tracker.observe([entry("a", size=2, mtime_s=1)], wall_now=102, monotonic_now=2) == []
    assert tracker.observe([entry("a", size=2, mtime_s=1)], wall_now=103, monotonic_now=3) != []


def test_a_young_file_waits_for_min_age() -> None:
    tracker = StabilityTracker(min_age_s=5)
    tracker.observe([entry("a", mtime_s=100)], wall_now=101, monotonic_now=0)
    assert tracker.observe([entry("a", mtime_s=100)], wall_now=102, monotonic_now=1) == []
    assert tracker.observe([entry("a", mtime_s=100)], wall_now=105, monotonic_now=4) != []


def test_an_mtime_in_the_future_is_stable_after_being_watched_for_min_age() -> None:
    """An NFS server whose clock runs ahead must not hold files back for ever."""
    tracker = StabilityTracker(min_age_s=5)
    future = entry("a", mtime_s=10_000)
    tracker.observe([future], wall_now=100, monotonic_now=0)
    assert tracker.observe([future], wall_now=104, monotonic_now=4) == []
    assert tracker.observe([future], wall_now=105, monotonic_now=5) == [future]


def test_a_pending_file_is_not_offered_again_until_released() -> None:
    tracker = StabilityTracker(min_age_s=0)
    tracker.observe([entry("a")], wall_now=100, monotonic_now=0)
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=1) == [entry("a")]
    tracker.mark_pending("a")
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=2) == []
    tracker.release("a")
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=3) == [entry("a")]


def test_a_listing_begun_before_a_release_does_not_offer_the_file_again() -> None:
    tracker = StabilityTracker(min_age_s=0)
    tracker.observe([entry("a")], wall_now=100, monotonic_now=0)
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=1) == [entry("a")]
    tracker.mark_pending("a")
    tracker.begin_scan()
    tracker.release("a")  # claimed while the folder was being listed: the listing is stale
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=2) == []
    # A listing begun after the release that still shows the file (its claim left it
    # there) offers it again.
    tracker.begin_scan()
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=3) == [entry("a")]


def test_a_file_that_left_the_folder_is_forgotten() -> None:
    tracker = StabilityTracker(min_age_s=0)
    tracker.observe([entry("a")], wall_now=100, monotonic_now=0)
    tracker.mark_pending("a")
    tracker.observe([], wall_now=100, monotonic_now=1)
    assert tracker.pending == frozenset()
    # Back again (a new file of that name): it needs two scans like any new file.
    assert tracker.observe([entry("a")], wall_now=100, monotonic_now=2) == []


def test_backoff_doubles_up_to_sixty_seconds_and_resets() -> None:
    backoff = Backoff()
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.reset()
    assert backoff.next_delay() == 1


# --- the watcher loop on a real folder, virtual time -------------------------------------


def virtual_wall_clock() -> Callable[[], float]:
    """Wall time that moves with the virtual clock: files written now are age 0 at time 0."""
    started = time.time()
    return lambda: started + trio.current_time()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "incoming", tmp_path / "processing", tmp_path / "staging")


def files_in(layout: Layout, *names: str) -> None:
    """Session s's folder, holding a one-byte file of each name."""
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"x")


async def start_watcher(
    nursery: trio.Nursery,
    layout: Layout,
    lane: InlineLane,
    *,
    queue: int = 100,
    min_age: float = 5.0,
    poll: float = 1.0,
    progress: Progress | None = None,
    extensions: tuple[str, ...] = (),
    wall_clock: Callable[[], float] | None = None,
    offers: Offers | None = None,
) -> trio.MemoryReceiveChannel[WorkItem]:
    send, receive = trio.open_memory_channel[WorkItem](queue)
    await nursery.start(
        lambda task_status: watcher.run(
            send,
            date_prefix=DATE,
            session="s",
            layout=layout,
            nfs=lane,  # type: ignore[arg-type]
            progress=progress or Progress(),
            poll_interval_s=poll,
            min_file_age_s=min_age,
            extensions=extensions,
            wall_clock=wall_clock or virtual_wall_clock(),
            offers=offers,
            task_status=task_status,
        )
    )
    return receive


async def test_a_new_file_is_queued_once_it_is_old_enough(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 10)
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=5, poll=1)
        item = await receive.receive()
        assert item.key == FileKey(DATE, "s", "a.bin")
        assert item.claimed is False
        assert 5 <= trio.current_time() < 7
        nursery.cancel_scope.cancel()


async def test_a_growing_file_waits_until_it_stops_changing(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    path = folder / "grow.bin"
    path.write_bytes(b"")
    wall = virtual_wall_clock()
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=3, poll=1, wall_clock=wall)

        async def writer() -> None:
            # Pauses longer than the poll interval: only the age rule holds the file back.
            for _ in range(10):
                await trio.sleep(1.5)
                append(path, b"more", mtime=wall())

        nursery.start_soon(writer)
        item = await receive.receive()
        assert trio.current_time() >= 15 + 3  # last write at 15 s, then min_age
        assert item.expected == (40, os.stat(path).st_mtime_ns)
        nursery.cancel_scope.cancel()


async def test_a_queued_file_is_not_queued_twice(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x")
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=0, poll=1)
        first = await receive.receive()
        with trio.move_on_after(30):
            await receive.receive()
            pytest.fail("the same file was queued twice")
        # A worker that could not claim it (say, busy) releases it: it is offered again.
        assert first.on_claim_settled is not None
        first.on_claim_settled(False)
        again = await receive.receive()
        assert again.key == first.key
        nursery.cancel_scope.cancel()


async def test_a_file_claimed_while_the_folder_is_listed_is_not_offered_again(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x")
    claimed = trio.Event()

    class ClaimDuringListing(InlineLane):
        """The second listing sees the file, then a worker claims it before it returns."""

        async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            listing = await super().run(fn, *args, **kwargs)
            if len(self.calls) == 3:
                first.on_claim_settled(False)
                (folder / "a.bin").unlink()
                claimed.set()
            return listing

    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, ClaimDuringListing(), min_age=0, poll=1)
        first = await receive.receive()
        assert first.on_claim_settled is not None
        await claimed.wait()
        with trio.move_on_after(30):
            again = await receive.receive()
            pytest.fail(f"{again.key} was offered again after its claim")
        nursery.cancel_scope.cancel()


async def test_a_file_whose_claim_failed_is_offered_again_after_a_doubling_delay(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x")
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=0, poll=1)
        offered = [await receive.receive()]
        offered_at = [trio.current_time()]
        for _ in range(4):
            settled = offered[-1].on_claim_settled
            assert settled is not None
            settled(True)  # the claim failed (say, EACCES): not offered at every scan
            offered.append(await receive.receive())
            offered_at.append(trio.current_time())
        waits = [later - earlier for earlier, later in itertools.pairwise(offered_at)]
        # 1, 2, 4, 8 s after each failure (give or take the 1 s poll)
        for wait, delay in zip(waits, [1, 2, 4, 8], strict=True):
            assert delay <= wait <= delay + 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("in_flight", "new_file"),
    [
        ("same.bin", "same.bin"),  # a newer file of the name of one still going up
        ("a", "a/b/c.bin"),  # file 'a' still going up, now a folder 'a/' with files
    ],
    ids=["same-name", "below-the-name"],
)
async def test_a_file_waits_while_its_name_or_folder_s_name_is_in_flight(
    autojump_clock: trio.testing.MockClock, layout: Layout, in_flight: str, new_file: str
) -> None:
    """It cannot be claimed under that name until the file in flight has left the
    processing folder."""
    path = layout.incoming_dir("s") / new_file
    path.parent.mkdir(parents=True)
    path.write_bytes(b"newer")
    progress = Progress()
    progress.claimed.add(FileKey(DATE, "s", in_flight))
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=0, poll=1, progress=progress)
        with trio.move_on_after(20):
            await receive.receive()
            pytest.fail(f"{new_file} queued while {in_flight} was in flight")
        progress.claimed.clear()
        assert (await receive.receive()).key.rel == new_file
        nursery.cancel_scope.cancel()


async def test_a_full_queue_pauses_scanning(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    files_in(layout, *(f"{i}.bin" for i in range(3)))
    lane = InlineLane()
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, lane, queue=1, min_age=0, poll=1)
        await trio.sleep(100)
        scans_while_full = len(lane.calls)
        await trio.sleep(100)
        assert len(lane.calls) == scans_while_full  # blocked on send, not scanning
        assert receive.statistics().current_buffer_used == 1
        names = {(await receive.receive()).key.rel for _ in range(3)}
        assert names == {"0.bin", "1.bin", "2.bin"}
        nursery.cancel_scope.cancel()


async def test_listing_errors_back_off_exponentially_up_to_sixty_seconds(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    layout.incoming_dir("s").mkdir(parents=True)
    lane = InlineLane(fail_first=9)
    progress = Progress()
    async with trio.open_nursery() as nursery:
        await start_watcher(nursery, layout, lane, poll=1, progress=progress)
        await trio.sleep(400)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(lane.calls, lane.calls[1:], strict=False)]
    assert gaps[:10] == [1, 2, 4, 8, 16, 32, 60, 60, 60, 1]
    assert set(gaps[10:]) == {1}
    assert progress.last_error is not None and "EIO" in progress.last_error


async def test_a_deleted_session_folder_is_made_again_and_said(
    autojump_clock: trio.testing.MockClock, layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    layout.incoming_root.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        await start_watcher(nursery, layout, InlineLane(), poll=1)
        await trio.sleep(1.5)
        assert layout.incoming_dir("s").is_dir()
        nursery.cancel_scope.cancel()
    assert f"{layout.incoming_dir('s')} was missing and is made again" in caplog.text


async def test_a_missing_incoming_root_is_not_made_but_said(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    """A share that is not mounted, a root renamed away: a new empty root would hide it."""
    progress = Progress()
    async with trio.open_nursery() as nursery:
        await start_watcher(nursery, layout, InlineLane(), poll=1, progress=progress)
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert not layout.incoming_root.exists()
    assert progress.last_error == (
        f"watcher: ENOENT on '{layout.incoming_root}': the incoming root is gone (a share not mounted? renamed?)"
    )


async def test_only_matching_extensions_are_queued(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    for name in ("keep.CSV", "skip.txt", "keep.tar.gz"):
        (folder / name).write_bytes(b"x")
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=0, poll=1,
                                      extensions=(".csv", ".tar.gz"))
        names = {(await receive.receive()).key.rel for _ in range(2)}
        with trio.move_on_after(10):
            await receive.receive()
            pytest.fail("a filtered file was queued")
        assert names == {"keep.CSV", "keep.tar.gz"}
        nursery.cancel_scope.cancel()


async def test_the_backlog_beyond_a_full_queue_is_counted(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    files_in(layout, *(f"f{n}.bin" for n in range(5)))
    progress = Progress()
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), queue=1, min_age=0, poll=1, progress=progress)
        await trio.sleep(10)  # one file queued, the watcher waits for room for the next
        assert receive.statistics().current_buffer_used == 1
        assert progress.incoming_files == 5
        # A worker claims what it takes; the watcher, waiting, does not scan again meanwhile.
        first = await receive.receive()
        progress.left_incoming(first.key)
        progress.left_incoming(FileKey(DATE, "another-session", "f1.bin"))  # not this folder's
        assert progress.incoming_files == 4
        nursery.cancel_scope.cancel()


async def test_cancelling_the_watcher_closes_its_channel_end(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    layout.incoming_dir("s").mkdir(parents=True)
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane())
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()


async def test_stable_files_are_offered_oldest_first(autojump_clock: trio.testing.MockClock, layout: Layout) -> None:
    """Listing order says nothing of age: files late in it must not wait behind newer ones."""
    folder = layout.incoming_dir("s")
    folder.mkdir(parents=True)
    ages = {"a.bin": 10, "b.bin": 30, "c.bin": 20, "d.bin": 40}  # seconds old
    now = time.time()
    for name, age in ages.items():
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (now - age, now - age))
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=1, poll=1,
                                      wall_clock=time.time)
        offered = [(await receive.receive()).key.rel for _ in ages]
        nursery.cancel_scope.cancel()
    assert offered == ["d.bin", "b.bin", "c.bin", "a.bin"]


async def test_a_file_another_watcher_of_the_session_queued_is_not_queued_again(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    """Started again while its files from before a stop wait in the queue: offered twice,
    the second would only be found gone (and counted as skipped)."""
    files_in(layout, "queued.bin", "new.bin")
    offers = Offers()
    offers.add("queued.bin", (1, 0))  # by the watcher of the session's previous start
    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, InlineLane(), min_age=0, offers=offers)
        await trio.sleep(10)
        assert [item.key.rel for item in [receive.receive_nowait()]] == ["new.bin"]
        assert receive.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()


async def test_a_file_another_offer_had_claimed_while_the_folder_was_listed_is_not_queued_again(
    autojump_clock: trio.testing.MockClock, layout: Layout
) -> None:
    """A drain's offer, or the previous watcher's, claimed it after this listing saw it:
    offered again, it would only be found gone (and counted as skipped)."""
    folder = layout.incoming_dir("s")
    files_in(layout, "queued.bin")
    offers = Offers()
    offers.add("queued.bin", (1, 0))  # by the watcher of the session's previous start

    class ClaimedDuringListing(InlineLane):
        async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            listing = await super().run(fn, *args, **kwargs)
            if len(self.calls) == 2 and (folder / "queued.bin").exists():
                (folder / "queued.bin").unlink()  # the earlier offer's claim, meanwhile
                offers.settle("queued.bin")
            return listing

    async with trio.open_nursery() as nursery:
        receive = await start_watcher(nursery, layout, ClaimedDuringListing(), min_age=0, offers=offers)
        await trio.sleep(10)
        assert receive.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()
