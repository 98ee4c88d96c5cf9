"""One service per processing root (instance_lock.py): a second one waits, not ready, and
says who holds the share, until the first is gone."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.support.service import Folders, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs
from uploader import instance_lock
from uploader.errors import Fatal
from uploader.instance_lock import HeldElsewhere, take
from uploader.lanes import ThreadLane
from uploader.progress import Progress

# POSIX record locks belong to a process: only another process can be refused one.
HOLDER = """
import sys
from pathlib import Path
from uploader.instance_lock import take
take(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_lock_another_process_holds_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / ".uploader.lock"
    with held_by_another_process(path) as child, pytest.raises(
        HeldElsewhere, match=rf"^{socket.gethostname()} pid {child.pid} since \d{{4}}-"
    ):
        take(path)


def test_the_lock_is_free_again_once_its_holder_ends(tmp_path: Path) -> None:
    path = tmp_path / ".uploader.lock"
    with held_by_another_process(path):
        pass
    os.close(take(path))
    assert path.read_text().startswith(f"{socket.gethostname()} pid {os.getpid()} since ")


async def test_run_waits_for_the_holder_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(instance_lock, "RETRY_S", 0.05)
    path = tmp_path / ".uploader.lock"
    progress = Progress()
    with held_by_another_process(path) as child, caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            holding = trio.Event()

            async def take_the_lock() -> None:
                await nursery.start(partial(instance_lock.run, timeout_s=5), path, ThreadLane("nfs", 2), progress)
                holding.set()

            nursery.start_soon(take_the_lock)
            await trio.sleep(0.5)
            assert progress.last_error is not None
            assert progress.last_error.startswith(f"another uploader holds {path} (")
            assert f"pid {child.pid}" in progress.last_error
            child.kill()
            child.wait()
            with trio.fail_after(5):
                await holding.wait()
            assert progress.last_error is None  # the wait is over: no longer said
            nursery.cancel_scope.cancel()
    assert sum("another uploader holds" in r.getMessage() for r in caplog.records) == 1  # not every retry


async def test_run_waits_out_a_share_that_does_not_answer_without_asking_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls abandoned on a hung share would pile up in the lane's threads, and a late one
    that fails would close a descriptor of the file, which drops this process's lock."""
    monkeypatch.setattr(instance_lock, "RETRY_S", 0.05)
    released = threading.Event()
    calls: list[Path] = []

    def hangs(path: Path) -> int:
        calls.append(path)
        released.wait(10)  # a hard-mounted share whose server went away, for a while
        return take(path)

    monkeypatch.setattr(instance_lock, "take", hangs)
    progress = Progress()
    path = tmp_path / ".uploader.lock"
    try:
        with caplog.at_level(logging.WARNING):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, lambda: time.sleep(0.7) or released.set())
                with trio.fail_after(5):
                    await nursery.start(partial(instance_lock.run, timeout_s=0.2), path, ThreadLane("nfs", 2), progress)
                nursery.cancel_scope.cancel()
    finally:
        released.set()
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot lock {path} now: no answer within 0.2 s; still waiting for it"
    ]
    assert progress.last_error is None  # said while it lasted, not after


async def test_a_hung_check_of_the_lock_file_is_not_sent_again_beside_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 0.05)
    released = threading.Event()
    checks: list[int] = []

    def hung_check(path: Path, fd: int) -> bool:
        checks.append(fd)
        released.wait(10)
        return True

    monkeypatch.setattr(instance_lock, "still_there", hung_check)
    lane = ThreadLane("nfs", 4)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(instance_lock.run, timeout_s=0.1), tmp_path / ".uploader.lock", lane, Progress())
            await trio.sleep(1)  # twenty rounds of checks
            assert lane.snapshot()["running"] == 1
            nursery.cancel_scope.cancel()
    finally:
        released.set()
    assert len(checks) == 1


def another_process_can_lock(path: Path) -> bool:
    probe = "import sys; from pathlib import Path; from uploader.instance_lock import take, HeldElsewhere\n"
    probe += "try:\n    take(Path(sys.argv[1]))\nexcept HeldElsewhere:\n    sys.exit(3)\n"
    return subprocess.run([sys.executable, "-c", probe, str(path)], check=False).returncode == 0


async def test_a_lock_file_removed_while_held_is_locked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 0.05)
    path = tmp_path / ".uploader.lock"
    replaced: list[None] = []
    with caplog.at_level(logging.WARNING):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(instance_lock.run, timeout_s=5, on_replaced=lambda: replaced.append(None)),
                path, ThreadLane("nfs", 2), Progress(),
            )
            path.unlink()  # someone cleaning up: a second service could lock a new file
            await trio.sleep(0.5)
            assert path.exists()
            assert not await trio.to_thread.run_sync(another_process_can_lock, path)
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} was removed or replaced while this service held it; locked again"
    ]
    assert len(replaced) == 1  # the service writes its session state again


async def test_a_processing_root_renamed_while_held_is_made_again_and_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 0.05)
    root = tmp_path / "proc"
    root.mkdir()
    path = root / ".uploader.lock"
    replaced: list[None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(instance_lock.run, timeout_s=5, on_replaced=lambda: replaced.append(None)),
            path, ThreadLane("nfs", 2), Progress(),
        )
        root.rename(tmp_path / "proc.gone")
        with trio.fail_after(5):
            while not replaced:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert not await trio.to_thread.run_sync(another_process_can_lock, path)
        nursery.cancel_scope.cancel()


async def test_a_lock_taken_again_is_reported_at_once_not_a_check_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """The session state beside the lock is written again as soon as the lock is back."""
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 10)
    path = tmp_path / ".uploader.lock"
    replaced = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(instance_lock.run, timeout_s=5, on_replaced=replaced.set),
            path, ThreadLane("nfs", 2), Progress(),
        )
        path.unlink()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(10)  # one check, and only one: the clock stands still after it
        for _ in range(200):  # real time, for the threads of the check and the take
            if replaced.is_set():
                break
            await trio.to_thread.run_sync(time.sleep, 0.02)
        assert replaced.is_set()
        assert not await trio.to_thread.run_sync(another_process_can_lock, path)
        nursery.cancel_scope.cancel()


async def test_a_check_that_misses_the_lock_file_for_a_moment_keeps_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS can answer ENOENT for a file that is there: the file opened again is the held one,
    and closing either descriptor would drop the process's lock on it."""
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 0.05)
    misses = [False]  # one check answers "not there"
    real_check = instance_lock.still_there
    monkeypatch.setattr(
        instance_lock, "still_there", lambda path, fd: misses.pop() if misses else real_check(path, fd)
    )
    path = tmp_path / ".uploader.lock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(instance_lock.run, timeout_s=5), path, ThreadLane("nfs", 2), Progress())
        await trio.sleep(0.5)  # the miss, the file opened again, further checks
        assert not misses
        assert not await trio.to_thread.run_sync(another_process_can_lock, path)
        nursery.cancel_scope.cancel()


async def test_a_service_whose_removed_lock_file_another_locked_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(instance_lock, "CHECK_EVERY_S", 0.3)
    path = tmp_path / ".uploader.lock"
    with pytest.RaisesGroup(pytest.RaisesExc(Fatal, match=r"another uploader locked it since"), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(instance_lock.run, timeout_s=5), path, ThreadLane("nfs", 2), Progress())
            path.unlink()
            with held_by_another_process(path):
                await trio.sleep(5)  # the check stops the service long before


async def test_run_releases_the_lock_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / ".uploader.lock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(instance_lock.run, timeout_s=5), path, ThreadLane("nfs", 2), Progress())
        nursery.cancel_scope.cancel()
    with held_by_another_process(path):
        pass  # the child got it


def test_a_second_service_on_the_same_share_waits_until_the_first_is_gone(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    first = service_factory()
    first.start_session("one")
    second = service_factory(start=False, APP_LOCAL_STAGING_ROOT=str(folders.root / "staging-2"))
    second.start(wait_ready=False)

    def says_who_holds_the_share() -> bool:
        try:
            return "another uploader holds" in str(second.status().get("last_error"))
        except httpx.TransportError:
            return False  # not listening yet

    wait_for(says_who_holds_the_share, timeout=30, what="the second service to say who holds the share")
    assert second.http.get("/readyz").status_code == 503
    assert second.status()["ready"] is False
    refused = second.http.post("/v1/watch/start", json={"session_name": "two"})
    assert refused.status_code == 503 and "last_error" in refused.json()["error"]
    expected = {f"{today()}/one/a.bin": write_file(folders.session("one") / "a.bin", 1000)}
    assert wait_for_blobs(container, set(expected)) == expected  # the first works on
    first.kill()
    second.wait_ready(timeout=30)
    status = second.status()
    assert (status["active"], status["session_name"]) == (True, "one")  # it took over the session


def test_a_lock_file_this_user_may_not_open_is_explained_with_its_owner_and_mode(tmp_path: Path) -> None:
    """An earlier run as root left it: "EACCES; trying again" would read as a passing failure."""
    path = tmp_path / ".uploader.lock"
    path.write_text("root's\n")
    path.chmod(0o644)
    said = instance_lock._explained(path, PermissionError(errno.EACCES, "Permission denied", str(path)))
    assert said == (f"this service (uid {os.geteuid()}) may not open it for writing (owner uid "
                    f"{os.getuid()}, mode 0644): change its owner or mode, or remove it while no service runs")
