"""Unit tests for the stored session state (encode_state, decode_state, read_state) and for
when SessionControl records it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from uploader import fileops
from uploader.lanes import ThreadLane
from uploader.layout import Layout
from uploader.session import (
    MAX_STATE_BYTES,
    BadStateFile,
    NfsUnavailable,
    SessionControl,
    SessionState,
    StateFile,
    decode_state,
    encode_state,
    read_state,
)


def layout_in(tmp_path: Path) -> Layout:
    """The folders as the service has them once started: the roots are there."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    for root in (layout.incoming_root, layout.processing_root, layout.staging_root):
        root.mkdir()
    return layout


async def watch(date: str, session: str, *, task_status: trio.TaskStatus[None]) -> None:
    """A watcher that starts at once and watches until cancelled."""
    task_status.started()
    await trio.sleep_forever()


ACTIVE = SessionState(
    active=True,
    session_name="run-1",
    date_prefix="20240102",
    started_at="2024-01-02T03:04:05+00:00",
)
STOPPED = SessionState(
    active=False,
    session_name="run-1",
    date_prefix="20240102",
    started_at="2024-01-02T03:04:05+00:00",
    stopped_at="2024-01-02T05:00:00+00:00",
)


@pytest.mark.parametrize(
    "state", [ACTIVE, STOPPED, SessionState()], ids=["active", "stopped", "none"]
)
def test_encode_decode_round_trip(state: SessionState) -> None:
    assert decode_state(encode_state(state)) == state


def test_encode_state_is_a_json_object_with_every_field() -> None:
    data = json.loads(encode_state(ACTIVE))
    assert data == {
        "active": True,
        "session_name": "run-1",
        "date_prefix": "20240102",
        "started_at": "2024-01-02T03:04:05+00:00",
        "stopped_at": None,
    }


@pytest.mark.parametrize("state", [ACTIVE, STOPPED], ids=["active", "stopped"])
def test_read_state_round_trip(tmp_path: Path, state: SessionState) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(encode_state(state))
    assert read_state(path) == state


def test_read_state_missing_file_is_inactive(tmp_path: Path) -> None:
    assert read_state(tmp_path / "session.json") == SessionState()


def test_decode_state_without_name_and_date_is_inactive() -> None:
    assert decode_state(b'{"active": false}') == SessionState()


UNUSABLE = [
    pytest.param(b"", id="empty"),
    pytest.param(b'{"active": true, "session_na', id="truncated"),
    pytest.param(b"\x00\x00\x00\x00", id="zeros"),
    pytest.param(b"\xff\xfe garbage", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"run-1"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="number"),
    pytest.param(
        b'{"active": true, "session_name": "../x", "date_prefix": "20240102"}',
        id="name-dotdot-slash",
    ),
    pytest.param(
        b'{"active": true, "session_name": "..", "date_prefix": "20240102"}', id="name-dotdot"
    ),
    pytest.param(
        b'{"active": true, "session_name": "", "date_prefix": "20240102"}', id="name-empty"
    ),
    pytest.param(
        b'{"active": true, "session_name": 7, "date_prefix": "20240102"}', id="name-number"
    ),
    pytest.param(b'{"active": true, "date_prefix": "20240102"}', id="name-missing"),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "2024-01-02"}', id="date-dashes"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "20241302"}', id="date-month-13"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "../../x"}', id="date-path"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": 20240102}', id="date-number"
    ),
    pytest.param(b'{"active": true, "session_name": "run-1"}', id="date-missing"),
    pytest.param(b'{"active": true}', id="active-without-session"),
    pytest.param(b'{"active": "false", "session_name": "run-1", "date_prefix": "20240102"}',
                 id="active-string"),
    pytest.param(
        b'{"active": false, "session_name": "run-1", "date_prefix": "20240102", "stopped_at": 5}',
        id="time-number",
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "20240102", "started_at": "garbage"}',
        id="time-garbage",
    ),
]


@pytest.mark.parametrize("raw", UNUSABLE)
def test_decode_state_refuses_unusable_content(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_state(raw)


def set_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".bad-*"))


@pytest.mark.parametrize("raw", UNUSABLE)
def test_read_state_moves_unusable_content_aside_and_says_why(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(raw)
    with pytest.raises(BadStateFile) as refused:
        read_state(path)
    [aside] = set_aside(path)
    assert aside.read_bytes() == raw  # kept for a human, never overwritten by the next start
    assert not path.exists()
    assert str(path) in str(refused.value) and aside.name in str(refused.value)


def test_a_state_file_that_cannot_be_moved_aside_is_still_refused_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"not json")

    def read_only_share(source: object, target: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(source))

    monkeypatch.setattr(os, "rename", read_only_share)
    with pytest.raises(BadStateFile, match=r"nor moved aside .*EROFS.*remove or fix it"):
        read_state(path)
    assert path.read_bytes() == b"not json"


def test_a_move_aside_whose_answer_was_lost_counts_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"not json")
    real_rename = os.rename

    def rename_then_lose_the_answer(source: str, target: str) -> None:
        real_rename(source, target)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", source)

    monkeypatch.setattr(os, "rename", rename_then_lose_the_answer)
    with pytest.raises(BadStateFile, match=r"the file was kept as session\.json\.bad-"):
        read_state(path)


def test_read_state_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"[" * 100_000)
    with pytest.raises(BadStateFile):
        read_state(path)


def test_read_state_of_a_fifo_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(BadStateFile, match="not a regular file"):
        read_state(path)
    assert time.monotonic() - started < 1
    assert len(set_aside(path)) == 1


def test_read_state_of_a_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.mkdir()
    with pytest.raises(BadStateFile, match="not a regular file"):
        read_state(path)


def test_read_state_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(encode_state(ACTIVE))
    path = tmp_path / "session.json"
    path.symlink_to(target)
    with pytest.raises(BadStateFile, match="symbolic link"):
        read_state(path)
    assert target.read_bytes() == encode_state(ACTIVE)  # the link moved aside, not its target


def test_read_state_of_a_huge_file_reads_none_of_it(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    with open(path, "wb") as file:
        file.truncate(MAX_STATE_BYTES + 1)
    with pytest.raises(BadStateFile, match="more than a session state"):
        read_state(path)


async def test_stop_has_recorded_the_stopped_state_when_it_answers(tmp_path: Path) -> None:
    """A crash right after a stop's answer must not resume the session."""
    layout = layout_in(tmp_path)

    control = SessionControl(layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        await control.start("run-1")
        assert read_state(layout.state_file).active is True
        await control.stop()
        assert read_state(layout.state_file).active is False
        nursery.cancel_scope.cancel()


async def test_a_start_whose_caller_goes_away_is_carried_through(tmp_path: Path) -> None:
    """A client hanging up cancels its request: the start must not stop half-way, recorded
    as active on NFS (and resumed after a restart) while the service says it is not."""
    layout = layout_in(tmp_path)
    release, watching = trio.Event(), trio.Event()

    async def slow_watch(date: str, session: str, *, task_status: trio.TaskStatus[None]) -> None:
        await release.wait()
        task_status.started()
        watching.set()
        await trio.sleep_forever()

    control = SessionControl(layout, ThreadLane("nfs", 2), slow_watch, nfs_timeout_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        with trio.move_on_after(1):
            await control.start("run-1")
        assert not control.state.active  # the caller gave up; the start goes on
        release.set()
        with trio.fail_after(5):
            await watching.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert control.state.active and control.state.session_name == "run-1"
        assert read_state(layout.state_file).active is True
        nursery.cancel_scope.cancel()


async def test_a_stop_that_cannot_be_recorded_yet_says_so_and_is_recorded_later(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    noted: list[str] = []
    resolved: list[str] = []

    control = SessionControl(
        layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=5, note_error=noted.append, resolve_error=resolved.append
    )
    blocker = layout.processing_root / "session.json.tmp" / "something"
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        await control.start("run-1")
        blocker.mkdir(parents=True)  # the state file cannot be written for now
        stopped = await control.stop()
        assert stopped.active is False and control.state.active is False
        assert noted == [
            "session run-1 is stopped, but the stop is not recorded on NFS yet: a restart "
            "before it is would resume the session"
        ]
        assert read_state(layout.state_file).active is True
        blocker.rmdir()
        for _ in range(100):  # the background retry waits 1 s, then 2 s
            await trio.sleep(0.1)
            if not read_state(layout.state_file).active:
                break
        assert read_state(layout.state_file) == stopped
        assert resolved == noted  # status no longer says it is not recorded
        nursery.cancel_scope.cancel()


async def test_a_state_that_cannot_be_recorded_yet_is_logged_with_its_reason_and_no_stray_full_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = layout_in(tmp_path)
    control = SessionControl(layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=5)
    (layout.processing_root / "session.json.tmp" / "something").mkdir(parents=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        with pytest.raises(NfsUnavailable):
            await control.start("run-1")
        await trio.sleep(0.3)  # the background loop's first try
        nursery.cancel_scope.cancel()
    [line] = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
    assert line.startswith("cannot record the session state (the NFS share failed: ")
    assert line.endswith("); retrying in 1 s") and ".)" not in line


async def test_starts_retried_while_the_state_cannot_be_written_add_no_background_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retrying its start against a failing share: one background loop records the
    state of the moment, not one per failed start (each would leave a thread per try on a
    hung share)."""
    layout = layout_in(tmp_path)
    writes: list[Path] = []
    real_write = fileops.write_atomically

    def counted(path: Path, payload: bytes) -> None:
        writes.append(path)
        real_write(path, payload)

    monkeypatch.setattr(fileops, "write_atomically", counted)
    control = SessionControl(layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=5)
    blocker = layout.processing_root / "session.json.tmp" / "something"
    blocker.mkdir(parents=True)  # the state file cannot be written for now
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        for _ in range(5):
            with pytest.raises(NfsUnavailable):
                await control.start("run-1")
        await trio.sleep(0.3)  # the background loop's first try; its next is 1 s later
        assert len(writes) == 5 + 1
        nursery.cancel_scope.cancel()


async def test_a_start_whose_state_write_is_given_up_on_leaves_no_session_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write abandoned on a slow share ends later, in its thread: the session the client
    was told did not start must not be recorded as active (a restart would resume it)."""
    layout = layout_in(tmp_path)
    released = threading.Event()
    real_write = fileops.write_atomically

    def slow_once(path: Path, payload: bytes) -> None:
        if not released.is_set():
            released.wait(10)
        real_write(path, payload)

    monkeypatch.setattr(fileops, "write_atomically", slow_once)

    control = SessionControl(layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        with pytest.raises(NfsUnavailable):
            await control.start("run-1")
        released.set()
        for _ in range(100):  # the abandoned write lands, then the state as it is goes over it
            await trio.sleep(0.1)
            if layout.state_file.exists() and not read_state(layout.state_file).active:
                break
        assert read_state(layout.state_file) == SessionState()
        assert not control.state.active
        nursery.cancel_scope.cancel()


def test_a_state_write_that_ends_late_never_puts_an_older_state_back(tmp_path: Path) -> None:
    """A stop's write abandoned on a slow share, then a start's write: the start's state stays."""
    state_file = StateFile(tmp_path / "session.json")
    stopped, started = state_file.writer(STOPPED), state_file.writer(ACTIVE)
    started()
    stopped()  # the abandoned write ends last
    assert read_state(tmp_path / "session.json") == ACTIVE


@dataclass
class HungMkdir:
    released: threading.Event = field(default_factory=threading.Event)  # the share answers
    made: threading.Event = field(default_factory=threading.Event)  # a folder was made


def hang_making_folders(monkeypatch: pytest.MonkeyPatch, *, after_making: bool = False) -> HungMkdir:
    """Make every making of a session folder hang (before it makes anything, or once it has
    made the folder) until ``released`` is set, as on a hung share."""
    hung = HungMkdir()
    real_make = fileops.make_session_folder

    def make(path: Path) -> bool:
        if not after_making:
            hung.released.wait(10)
        made = real_make(path)
        hung.made.set()
        hung.released.wait(10)
        return made

    monkeypatch.setattr(fileops, "make_session_folder", make)
    return hung


async def test_concurrent_starts_and_stops_on_a_hung_share_each_answer_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each waited for the lock behind the ones before it: the fifth answered after five
    timeouts. The wait for the lock counts against the timeout too."""
    layout = layout_in(tmp_path)
    hung = hang_making_folders(monkeypatch)
    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=0.3)
    took: list[float] = []

    async def timed(call: Callable[[], Awaitable[object]]) -> None:
        started = trio.current_time()
        # 503, or for the stop, 200 where the lock came its way in time (no session to stop).
        with contextlib.suppress(NfsUnavailable):
            await call()
        took.append(trio.current_time() - started)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            async with trio.open_nursery() as clients:
                clients.start_soon(timed, partial(control.start, "run-0"))
                await trio.sleep(0.05)  # it holds the lock now, its mkdir hung; the others queue
                for i in range(1, 4):
                    clients.start_soon(timed, partial(control.start, f"run-{i}"))
                clients.start_soon(timed, control.stop)
            nursery.cancel_scope.cancel()
    finally:
        hung.released.set()
    assert len(took) == 5 and max(took) < 0.3 + 0.2, took
    assert not control.state.active


async def test_a_start_behind_a_background_state_write_answers_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that records a failed start again holds the lock while the share hangs."""
    layout = layout_in(tmp_path)
    released = threading.Event()

    def hung_write(path: Path, payload: bytes) -> None:
        released.wait(10)

    monkeypatch.setattr(fileops, "write_atomically", hung_write)
    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=0.5)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            with pytest.raises(NfsUnavailable):
                await control.start("run-1")  # its write hangs; one in the background now
            await trio.sleep(0.05)  # the background write has the lock
            started = trio.current_time()
            with pytest.raises(NfsUnavailable):
                await control.start("run-2")
            assert trio.current_time() - started < 0.5 + 0.2
            nursery.cancel_scope.cancel()
    finally:
        released.set()


async def test_a_folder_made_after_its_start_gave_up_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client was told the session did not start: no folder says otherwise."""
    layout = layout_in(tmp_path)
    hung = hang_making_folders(monkeypatch)
    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        with pytest.raises(NfsUnavailable):
            await control.start("late")
        hung.released.set()  # the share answers: the mkdir given up on is done now
        for _ in range(100):
            await trio.sleep(0.05)
            if hung.made.is_set() and not layout.incoming_dir("late").exists():
                break
        assert hung.made.is_set() and not layout.incoming_dir("late").exists()
        nursery.cancel_scope.cancel()


async def test_a_folder_made_late_stays_when_its_session_has_started_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = layout_in(tmp_path)
    hung = hang_making_folders(monkeypatch, after_making=True)
    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        with pytest.raises(NfsUnavailable):
            await control.start("again")  # its folder is made; the call hangs after
        hung.released.set()
        await control.start("again")  # the client retries, and the folder is there
        await trio.sleep(0.2)  # the first call has ended by now, and gone by the folder
        assert layout.incoming_dir("again").is_dir()
        nursery.cancel_scope.cancel()


async def test_state_writes_retried_against_a_hung_share_hold_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts and stops a client retries while the share hangs, and the background loop's
    tries: each write abandoned at its timeout would hold a thread until the share answers."""
    layout = layout_in(tmp_path)
    released = threading.Event()

    def hung_write(path: Path, payload: bytes) -> None:
        released.wait(10)

    monkeypatch.setattr(fileops, "write_atomically", hung_write)
    lane = ThreadLane("nfs", 8)
    control = SessionControl(layout, lane, watch, nfs_timeout_s=0.2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            for name in ("run-1", "run-2", "run-3", "run-4"):
                with pytest.raises(NfsUnavailable):
                    await control.start(name)
            assert lane.running() == 1
            nursery.cancel_scope.cancel()
    finally:
        released.set()


async def test_a_start_right_after_a_stop_on_a_slow_share_waits_for_the_stop_s_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop answers before its write is done (STOP_SAVE_WAIT_S); the start's write goes
    after it, within the start's own time, not refused because one is still running."""
    layout = layout_in(tmp_path)
    real_write = fileops.write_atomically
    delay = [0.0]

    def slow(path: Path, payload: bytes) -> None:
        time.sleep(delay[0])
        real_write(path, payload)

    monkeypatch.setattr(fileops, "write_atomically", slow)
    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        await control.start("run-1")
        delay[0] = 1.5
        await control.stop()  # answered after 1 s, its write still going
        started = await control.start("run-2")
        assert started.active and read_state(layout.state_file) == started
        nursery.cancel_scope.cancel()


async def test_the_write_of_a_start_given_up_on_is_overwritten_as_soon_as_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client was told the start failed: once the share answers, the state of the moment
    (stopped) goes over the start's late write at once, not at the next retry's turn."""
    layout = layout_in(tmp_path)
    real_write = fileops.write_atomically
    released = threading.Event()

    def hung(path: Path, payload: bytes) -> None:
        released.wait(10)
        real_write(path, payload)

    control = SessionControl(layout, ThreadLane("nfs", 8), watch, nfs_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        monkeypatch.setattr(fileops, "write_atomically", hung)
        with pytest.raises(NfsUnavailable):
            await control.start("run-1")
        await trio.sleep(2.5)  # the background loop's retries wait on the write still held
        released.set()
        for _ in range(75):  # 1.5 s
            await trio.sleep(0.02)
            if layout.state_file.exists() and read_state(layout.state_file) == SessionState():
                break
        assert read_state(layout.state_file) == SessionState()
        nursery.cancel_scope.cancel()
