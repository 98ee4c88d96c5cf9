"""Drains: what a stopped session had queued stays on record until claimed (uploader/drain.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import uploader.drain as drain_module
from uploader.drain import (
    Drains,
    Offers,
    decode_drain,
    encode_drain,
    offer,
    read_drains,
    still_there,
)
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout
from uploader.progress import Progress
from uploader.session import SessionControl, WatchFn
from uploader.worker import WorkItem

DATE = "20240102"


def layout_in(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    for root in (layout.incoming_root, layout.processing_root, layout.staging_root):
        root.mkdir()
    return layout


def drop(layout: Layout, session: str, rel: str, data: bytes = b"data") -> tuple[str, int, int]:
    path = layout.incoming_dir(session) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    info = os.lstat(path)
    return rel, info.st_size, info.st_mtime_ns


def test_offers_count_each_offer_and_know_what_is_still_out() -> None:
    offers = Offers()
    offers.add("a", (1, 10))
    offers.add("a", (1, 10))  # offered again by a watcher of a later start
    offers.add("b", (2, 20))
    offers.settle("a")
    assert offers.outstanding == 2 and offers.snapshot() == [("a", 1, 10), ("b", 2, 20)]
    offers.settle("a", failed=True)
    offers.settle("b")
    assert offers.outstanding == 0 and offers.snapshot() == [("a", 1, 10)]


def test_a_file_whose_claim_failed_is_left_to_drain_until_offered_again_or_gone() -> None:
    offers = Offers()
    offers.add("a", (1, 10))
    offers.add("b", (2, 20))
    offers.settle("a", failed=True)
    offers.settle("b", failed=True)
    assert offers.to_record and offers.snapshot() == [("a", 1, 10), ("b", 2, 20)]
    offers.add("a", (1, 10))
    offers.settle("a")
    offers.forget_failing(lambda rel: rel != "b")  # "b" left the folder
    assert not offers.to_record and offers.snapshot() == []


def test_a_drain_record_keeps_any_file_name() -> None:
    files = [("sub/ok.bin", 5, 123), ("bad-\udcff.bin", 1, 2)]  # a name that is no UTF-8
    assert decode_drain(encode_drain(DATE, "run-1", files)) == ((DATE, "run-1"), files)


@pytest.mark.parametrize("raw", [
    b"[]", b'{"date_prefix": "2024-01-02", "session_name": "s", "files": []}',
    b'{"date_prefix": "20240102", "session_name": "../s", "files": []}',
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["a", "1", 2]]}',
    b"not json",
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["../../outside/secret.txt", 1, 2]]}',
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["/etc/passwd", 1, 2]]}',
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["a//b", 1, 2]]}',
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["", 1, 2]]}',
    b'{"date_prefix": "20240102", "session_name": "s", "files": [["a\\ud800", 1, 2]]}',  # no name on disk
])
def test_a_drain_record_this_service_did_not_write_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_drain(raw)


def test_reading_the_drains_removes_what_cannot_be_one(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    good = layout.drain_file(DATE, "s")
    good.parent.mkdir(parents=True)
    good.write_bytes(encode_drain(DATE, "s", [("a", 1, 2)]))
    (good.parent / "t.json").write_text("{broken")
    (good.parent / "u.json.tmp").write_text("{}")  # a write that a crash interrupted
    assert [(path, key, files) for path, key, files in read_drains(layout)] == [(good, (DATE, "s"), [("a", 1, 2)])]
    assert sorted(p.name for p in good.parent.iterdir()) == ["s.json"]


def test_one_drain_that_cannot_be_read_or_removed_holds_up_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = layout_in(tmp_path)
    good = layout.drain_file(DATE, "s")
    good.parent.mkdir(parents=True)
    good.write_bytes(encode_drain(DATE, "s", [("a", 1, 2)]))
    (good.parent / "t.json").write_text("{broken")
    unlistable = layout.drains_root / "20240103"
    unlistable.mkdir()
    real_scandir, real_unlink = os.scandir, os.unlink

    def scandir(path: object) -> object:
        if Path(str(path)) == unlistable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    def unlink(path: object, *args: object, **kwargs: object) -> None:
        if Path(str(path)).name == "t.json":
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "unlink", unlink)
    assert [key for _, key, _ in read_drains(layout)] == [(DATE, "s")]


def test_a_drains_folder_that_cannot_be_listed_is_read_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = layout_in(tmp_path)
    layout.drains_root.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if Path(str(path)) == layout.drains_root:
            raise OSError(5, "Input/output error", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError):
        read_drains(layout)


async def test_a_drain_file_this_service_did_not_write_is_named_in_last_error(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, _, progress = drains
    path = drain.layout.drain_file(DATE, "s")
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    await drain.catch_up()
    assert progress.last_error is not None
    assert progress.last_error.startswith(f"removing drain file {path}, which this service did not write: ")
    assert not path.exists()


def test_no_drains_folder_is_no_drain(tmp_path: Path) -> None:
    assert read_drains(layout_in(tmp_path)) == []


def test_only_files_still_there_unchanged_are_caught_up(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    kept = drop(layout, "s", "sub/kept.bin")
    changed = drop(layout, "s", "changed.bin")
    gone = drop(layout, "s", "gone.bin")
    (layout.incoming_dir("s") / "changed.bin").write_bytes(b"other content")
    (layout.incoming_dir("s") / "gone.bin").unlink()
    assert still_there(layout, "s", [kept, changed, gone]) == [kept]


@pytest.fixture
async def drains(tmp_path: Path) -> AsyncIterator[tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress]]:
    send, receive = trio.open_memory_channel[WorkItem](100)
    progress = Progress()
    async with trio.open_nursery() as nursery:
        drains = await nursery.start(Drains(layout_in(tmp_path), ThreadLane("nfs", 2), send, progress).run)
        yield drains, receive, progress
        nursery.cancel_scope.cancel()


async def wait_for_file(path: Path, *, present: bool) -> None:
    for _ in range(500):
        if await trio.Path(path).exists() == present:
            return
        await trio.sleep(0.01)
    raise AssertionError(f"{path} {'never came' if present else 'never went'}")


async def recorded(drain: Drains, rel: str, expected: tuple[int, int]) -> Offers:
    """A stop of session s with ``rel`` queued and not claimed: its drain, once written."""
    with drain.watching(DATE, "s") as offers:
        offers.add(rel, expected)
    await drain.record(DATE, "s").wait()
    return offers


async def test_a_stop_with_offers_out_records_them_until_they_are_claimed(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, _, _ = drains
    offers = await recorded(drain, "a.bin", (4, 40))
    path = drain.layout.drain_file(DATE, "s")
    assert decode_drain(path.read_bytes())[1] == [("a.bin", 4, 40)]
    assert drain.names() == ["s"]
    offers.settle("a.bin")
    await wait_for_file(path, present=False)
    for _ in range(100):
        if not drain.names():
            break
        await trio.sleep(0.01)
    assert drain.names() == []


async def test_drains_lost_with_their_folder_are_written_again(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    """The processing root renamed or removed while the service runs (instance_lock)."""
    drain, _, _ = drains
    await recorded(drain, "a.bin", (4, 40))
    path = drain.layout.drain_file(DATE, "s")
    shutil.rmtree(drain.layout.drains_root)
    drain.record_again()
    await wait_for_file(path, present=True)
    assert decode_drain(path.read_bytes())[1] == [("a.bin", 4, 40)]


async def test_a_stop_with_nothing_out_records_nothing(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, _, _ = drains
    with drain.watching(DATE, "s"):
        pass
    assert drain.record(DATE, "s").is_set()
    assert not drain.layout.drain_file(DATE, "s").exists() and drain.names() == []


async def test_after_a_restart_what_a_drain_names_and_incoming_still_holds_is_offered(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, receive, _ = drains
    layout = drain.layout
    queued = drop(layout, "s", "queued.bin")
    drop(layout, "s", "late.bin")  # dropped after the stop: in no drain
    path = layout.drain_file(DATE, "s")
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_drain(DATE, "s", [queued, ("claimed-meanwhile.bin", 1, 2)]))

    await drain.catch_up()
    with trio.fail_after(5):
        item = await receive.receive()
    assert item.key == FileKey(DATE, "s", "queued.bin") and item.expected == queued[1:]
    assert receive.statistics().current_buffer_used == 0
    assert item.on_claim_settled is not None
    drain.layout.incoming_path(item.key).unlink()  # claimed
    item.on_claim_settled(False)
    await wait_for_file(path, present=False)


async def test_the_drain_of_a_session_active_again_offers_nothing_its_watcher_offered(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    """Resumed on another day: one folder, so one offer of a file at a time; the file is in
    the watcher's hands, which the next stop would record."""
    drain, receive, _ = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    path = drain.layout.drain_file(DATE, "s")
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_drain(DATE, "s", [(rel, size, mtime_ns)]))
    with drain.watching("20240103", "s") as offers:
        offers.add(rel, (size, mtime_ns))  # its watcher was first
        await drain.catch_up()
        await wait_for_file(path, present=False)
        assert receive.statistics().current_buffer_used == 0
        assert drain.record("20240103", "s").is_set() is False  # a stop now records it
    await wait_for_file(drain.layout.drain_file("20240103", "s"), present=True)


@contextlib.asynccontextmanager
async def sessions_with_drains(
    layout: Layout, watch: WatchFn, *, nfs_timeout_s: float = 5
) -> AsyncIterator[tuple[SessionControl, Drains]]:
    """A SessionControl whose stops record drains, as the service wires them."""
    send, _ = trio.open_memory_channel[WorkItem](100)
    async with trio.open_nursery() as nursery:
        drains = await nursery.start(Drains(layout, ThreadLane("nfs", 2), send, Progress()).run)
        control = SessionControl(layout, ThreadLane("nfs", 2), watch, drains=drains, nfs_timeout_s=nfs_timeout_s)
        await nursery.start(control.run)
        yield control, drains
        nursery.cancel_scope.cancel()


async def test_what_is_kept_for_a_session_goes_once_it_is_stopped_and_drained(tmp_path: Path) -> None:
    """A service that runs for months starts many thousands of sessions."""
    layout = layout_in(tmp_path)
    queued: list[Offers] = []

    async def watch(date: str, session: str, *, offers: Offers, task_status: trio.TaskStatus[None]) -> None:
        if session == "queued":
            offers.add("a.bin", (1, 2))
            queued.append(offers)
        task_status.started()
        await trio.sleep_forever()

    async with sessions_with_drains(layout, watch) as (control, drains):
        for name in ("s1", "s2", "queued"):
            await control.start(name)
            await control.stop()
        assert [session for _, session in drains._offers] == ["queued"]  # its file is still queued
        queued[0].settle("a.bin")
        await forgotten(drains)
        with trio.fail_after(5):
            while drains._offers or drains._names:  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_a_session_started_again_and_stopped_at_once_keeps_the_first_stop_s_drain(
    tmp_path: Path,
) -> None:
    """The new watcher has offered nothing yet; the old one's offers are still out."""
    layout = layout_in(tmp_path)
    started = 0

    async def watch(date: str, session: str, *, offers: Offers, task_status: trio.TaskStatus[None]) -> None:
        nonlocal started
        started += 1
        if started == 1:
            offers.add("queued.bin", (1, 2))  # the first run queued a file no worker took yet
        task_status.started()
        await trio.sleep_forever()

    async with sessions_with_drains(layout, watch) as (control, drains):
        await control.start("s")
        await control.stop()
        await control.start("s")
        await control.stop()
        [path] = [p for p in layout.drains_root.rglob("*.json")]
        assert json.loads(path.read_bytes())["files"] == [["queued.bin", 1, 2]]
        assert drains.names() == ["s"]


async def test_a_file_the_watcher_was_still_queueing_at_the_stop_is_in_no_drain(tmp_path: Path) -> None:
    """The queue was full: the stop cancels that offer, so the file stays in incoming, and a
    restart must not upload it either."""
    layout = layout_in(tmp_path)
    send, _receive = trio.open_memory_channel[WorkItem](1)

    async def watch(date: str, session: str, *, offers: Offers, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        for rel in ("queued.bin", "waiting.bin"):
            await offer(send, offers, FileKey(date, session, rel), (1, 2))
        await trio.sleep_forever()

    async with sessions_with_drains(layout, watch) as (control, _):
        await control.start("s")
        await trio.testing.wait_all_tasks_blocked()  # waiting.bin waits for room in the queue
        await control.stop()
        [path] = list(layout.drains_root.rglob("*.json"))
        assert json.loads(path.read_bytes())["files"] == [["queued.bin", 1, 2]]


async def forgotten(drain: Drains) -> None:
    with trio.fail_after(5):
        while drain.names():  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.mark.parametrize("claim_failed", [False, True], ids=["left-by-estale", "failed"])
async def test_a_drained_file_its_claim_left_in_incoming_is_offered_again_until_claimed(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress], claim_failed: bool,
) -> None:
    drain, receive, _ = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    offers = await recorded(drain, rel, (size, mtime_ns))
    offers.settle(rel, failed=claim_failed)  # not claimed: still in incoming
    with trio.fail_after(5):
        item = await receive.receive()
    assert item.key == FileKey(DATE, "s", rel) and item.expected == (size, mtime_ns)
    assert drain.names() == ["s"]
    drain.layout.incoming_path(item.key).unlink()  # claimed this time
    assert item.on_claim_settled is not None
    item.on_claim_settled(False)
    await wait_for_file(drain.layout.drain_file(DATE, "s"), present=False)
    await forgotten(drain)


async def test_a_file_whose_claim_failed_before_the_stop_is_drained_too(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    """Its watcher would have offered it again after a delay; the stop ended the watcher."""
    drain, receive, _ = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    with drain.watching(DATE, "s") as offers:
        offers.add(rel, (size, mtime_ns))
        offers.settle(rel, failed=True)
    await drain.record(DATE, "s").wait()
    assert decode_drain(drain.layout.drain_file(DATE, "s").read_bytes())[1] == [(rel, size, mtime_ns)]
    with trio.fail_after(5):
        item = await receive.receive()
    assert item.key == FileKey(DATE, "s", rel) and item.expected == (size, mtime_ns)
    drain.layout.incoming_path(item.key).unlink()  # claimed this time
    assert item.on_claim_settled is not None
    item.on_claim_settled(False)
    await forgotten(drain)
    assert not offers.to_record


async def test_a_drained_file_goes_after_an_older_file_of_its_name_in_flight(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, receive, progress = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    older = FileKey(DATE, "s", rel)
    progress.claimed.add(older)  # its claim found the name busy
    offers = await recorded(drain, rel, (size, mtime_ns))
    offers.settle(rel)
    await trio.sleep(1.5)  # a round came and went: not offered while the older one is in flight
    assert receive.statistics().current_buffer_used == 0
    progress.claimed.discard(older)
    with trio.fail_after(5):
        item = await receive.receive()
    assert item.key == older


async def test_a_drain_of_a_session_watched_again_lets_the_watcher_offer_and_goes_once_claimed(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, receive, _ = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    offers = await recorded(drain, rel, (size, mtime_ns))
    offers.settle(rel, failed=True)
    path = drain.layout.drain_file(DATE, "s")
    with drain.watching(DATE, "s"):
        await trio.sleep(1.5)  # a round of the drain came and went
        assert receive.statistics().current_buffer_used == 0 and path.exists()
        drain.layout.incoming_path(FileKey(DATE, "s", rel)).unlink()  # its watcher's offer, claimed
        await wait_for_file(path, present=False)
        await forgotten(drain)


async def test_a_start_and_stop_before_the_new_watcher_offered_a_drained_file_keep_its_drain(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    drain, receive, _ = drains
    rel, size, mtime_ns = drop(drain.layout, "s", "a.bin")
    offers = await recorded(drain, rel, (size, mtime_ns))
    offers.settle(rel, failed=True)  # still in incoming
    with drain.watching(DATE, "s"):
        await trio.sleep(1.5)  # its watcher had not offered it yet
    await drain.record(DATE, "s").wait()  # stopped again, nothing of its own queued
    assert drain.layout.drain_file(DATE, "s").exists() and drain.names() == ["s"]
    with trio.fail_after(5):
        item = await receive.receive()  # offered again by the drain
    assert item.key == FileKey(DATE, "s", rel)


async def test_a_stop_while_the_drain_checks_incoming_keeps_the_files_it_recorded(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress], monkeypatch: pytest.MonkeyPatch,
) -> None:
    drain, _, _ = drains
    layout = drain.layout
    a, b = drop(layout, "s", "a.bin"), drop(layout, "s", "b.bin")
    offers = await recorded(drain, a[0], a[1:])
    checking, go_on = threading.Event(), threading.Event()
    real_still_there = drain_module.still_there

    def slow_still_there(*args: Any) -> list[tuple[str, int, int]]:
        checking.set()
        go_on.wait(10)
        return real_still_there(*args)

    monkeypatch.setattr(drain_module, "still_there", slow_still_there)
    layout.incoming_path(FileKey(DATE, "s", "a.bin")).unlink()  # a.bin claimed
    offers.settle("a.bin")
    assert await trio.to_thread.run_sync(checking.wait, 10)
    with drain.watching(DATE, "s") as again:  # started again, b.bin queued, stopped
        again.add(b[0], b[1:])
    await drain.record(DATE, "s").wait()
    go_on.set()
    await trio.sleep(0.5)
    path = layout.drain_file(DATE, "s")
    assert [entry[0] for entry in decode_drain(path.read_bytes())[1]] == ["a.bin", "b.bin"]
    assert drain.names() == ["s"]


async def test_a_stop_while_the_drains_are_read_at_start_up_keeps_both_drains_files(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress], monkeypatch: pytest.MonkeyPatch,
) -> None:
    drain, _, _ = drains
    layout = drain.layout
    a, b = drop(layout, "s", "a.bin"), drop(layout, "s", "b.bin")
    path = layout.drain_file(DATE, "s")
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_drain(DATE, "s", [a]))  # from before the restart
    reading, go_on = threading.Event(), threading.Event()
    real_read_drains = drain_module.read_drains

    def slow_read_drains(layout: Layout, *args: Any) -> Any:
        found = real_read_drains(layout, *args)
        reading.set()
        go_on.wait(10)
        return found

    monkeypatch.setattr(drain_module, "read_drains", slow_read_drains)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain.catch_up)
        assert await trio.to_thread.run_sync(reading.wait, 10)
        with drain.watching(DATE, "s") as offers:  # the resumed session: b.bin queued, stopped
            offers.add(b[0], b[1:])
        await drain.record(DATE, "s").wait()
        go_on.set()
    for _ in range(500):
        if [entry[0] for entry in decode_drain(path.read_bytes())[1]] == ["a.bin", "b.bin"]:
            break
        await trio.sleep(0.01)
    assert [entry[0] for entry in decode_drain(path.read_bytes())[1]] == ["a.bin", "b.bin"]


async def test_a_catch_up_does_not_offer_a_file_the_session_s_watcher_claimed_while_it_read(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offered again, it would only be found gone (and counted as skipped)."""
    drain, receive, _ = drains
    layout = drain.layout
    rel, size, mtime_ns = drop(layout, "s", "a.bin")
    path = layout.drain_file(DATE, "s")
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_drain(DATE, "s", [(rel, size, mtime_ns)]))
    real_still_there = drain_module.still_there
    with drain.watching(DATE, "s") as offers:  # the resumed session's watcher

        def still_there_while_the_watcher_claims(*args: Any) -> list[tuple[str, int, int]]:
            left = real_still_there(*args)
            if (layout.incoming_dir("s") / rel).exists():
                trio.from_thread.run_sync(offers.add, rel, (size, mtime_ns))
                (layout.incoming_dir("s") / rel).unlink()  # its claim
                trio.from_thread.run_sync(offers.settle, rel)
            return left

        monkeypatch.setattr(drain_module, "still_there", still_there_while_the_watcher_claims)
        await drain.catch_up()
        await trio.sleep(0.5)
        assert receive.statistics().current_buffer_used == 0
        await wait_for_file(path, present=False)


async def test_one_file_is_offered_by_one_run_of_its_session_at_a_time_whatever_their_dates(
    drains: tuple[Drains, trio.MemoryReceiveChannel[WorkItem], Progress],
) -> None:
    """Stopped on one day with a file queued, started again the next: one folder."""
    drain, _, _ = drains
    a = drop(drain.layout, "s", "a.bin")
    offers = await recorded(drain, a[0], a[1:])
    with drain.watching("20240103", "s") as next_day:
        assert next_day.is_pending("a.bin")  # its watcher leaves it to the first offer
        offers.settle("a.bin", failed=True)
        assert not next_day.is_pending("a.bin")


async def test_no_state_is_written_before_the_drain_a_stop_asked_for(tmp_path: Path) -> None:
    """A restart must not find the session stopped and nothing to say what it had queued."""
    layout = layout_in(tmp_path)

    async def watch(date: str, session: str, *, offers: Offers, task_status: trio.TaskStatus[None]) -> None:
        offers.add("queued.bin", (1, 2))
        task_status.started()
        await trio.sleep_forever()

    blocker = layout.drains_root  # a file where the drains' folder goes: no drain can be written
    blocker.write_bytes(b"")
    async with sessions_with_drains(layout, watch, nfs_timeout_s=0.5) as (control, _):
        await control.start("s")
        assert (await control.stop()).active is False
        await trio.sleep(1.5)
        assert json.loads(layout.state_file.read_bytes())["active"] is True  # not yet
        blocker.unlink()
        await wait_for_file(layout.drain_file(control.state.date_prefix or "", "s"), present=True)
        for _ in range(500):
            if json.loads(layout.state_file.read_bytes())["active"] is False:
                break
            await trio.sleep(0.01)
        assert json.loads(layout.state_file.read_bytes())["active"] is False
