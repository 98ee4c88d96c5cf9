"""Room on the staging disk is reserved before a copy starts (uploader/staging_space.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.test_watcher import InlineLane
from uploader import staging_space
from uploader.staging_space import StagingSpace

MB = 1_000_000


def simulated_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> list[int]:
    """A disk with ``free`` bytes on which running copies have written nothing yet; returns
    the list that counts the looks at it."""
    looks: list[int] = []

    def room(root: Path, running: list[tuple[int, Path]], budget: int = 0) -> int:
        looks.append(len(running))
        return free - sum(size for size, _ in running)

    monkeypatch.setattr(staging_space, "_room_on_disk", room)
    return looks


def space() -> StagingSpace:
    # The look runs on the Trio thread: the virtual clock then sees every step.
    return StagingSpace(Path("/unused"), InlineLane())  # type: ignore[arg-type]


async def test_a_copy_that_would_not_fit_beside_the_running_ones_waits_for_one_to_end(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulated_disk(monkeypatch, 24 * MB)
    staging = space()
    started: list[str] = []

    async def copy(name: str, seconds: float) -> None:
        async with staging.reserve(10 * MB, Path(name)):
            started.append(name)
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, "a", 5)
        nursery.start_soon(copy, "b", 10)
        await trio.sleep(0.1)
        nursery.start_soon(copy, "c", 1)
        await trio.sleep(1)
        assert sorted(started) == ["a", "b"]  # 24 MB free, 20 still to write: c waits
        assert staging.snapshot() == {"copies": 2, "held_bytes": 20 * MB, "waiting_for_room": 1}
        await trio.sleep(4.5)  # a has ended
        assert sorted(started) == ["a", "b", "c"]
        assert staging.snapshot() == {"copies": 2, "held_bytes": 20 * MB, "waiting_for_room": 0}


async def test_a_copy_larger_than_the_disk_starts_when_it_is_alone(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It fails on its own then (ENOSPC), instead of waiting for ever."""
    simulated_disk(monkeypatch, 1 * MB)
    with trio.fail_after(1):
        async with space().reserve(10 * MB, Path("big")):
            pass


async def test_a_large_copy_waiting_for_room_is_not_overtaken_for_ever(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small copies that keep overlapping would otherwise never leave room for it."""
    simulated_disk(monkeypatch, 100 * MB)
    staging = space()
    large_started = trio.Event()

    async def small_copies(offset: float) -> None:
        await trio.sleep(offset)
        while not large_started.is_set():
            async with staging.reserve(10 * MB, Path(f"small-{offset}")):
                await trio.sleep(1)

    async def large_copy() -> None:
        await trio.sleep(0.1)
        async with staging.reserve(95 * MB, Path("large")):
            large_started.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(small_copies, 0)
            nursery.start_soon(small_copies, 0.5)
            nursery.start_soon(large_copy)


async def test_copies_beside_others_look_at_a_roomy_disk_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small file must not cost a trip to a thread each."""
    looks = simulated_disk(monkeypatch, 10_000 * MB)
    staging = space()
    async with staging.reserve(MB, Path("first")):  # alone: it starts without a look
        for n in range(100):
            async with staging.reserve(MB, Path(f"f{n}")):
                pass
    assert len(looks) == 1


def test_the_room_on_disk_leaves_out_what_running_copies_have_still_to_write(
    tmp_path: Path,
) -> None:
    half_written = tmp_path / "half"
    half_written.write_bytes(b"x" * 4096)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    room = staging_space._room_on_disk(
        tmp_path, [(8192, half_written), (1000, tmp_path / "not-started")]
    )
    assert abs(free - room - (4096 + 1000)) < 1024 * 1024  # the disk may move a little meanwhile


async def test_with_a_budget_copies_wait_until_the_reserved_copies_leave_room(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An emptyDir's sizeLimit: the folder shows the node's disk, the kubelet evicts past it.
    A copy holds its room until it is removed, not only while it is written."""
    simulated_disk(monkeypatch, 10_000 * MB)
    staging = StagingSpace(Path("/unused"), InlineLane(), budget=25 * MB)  # type: ignore[arg-type]
    first = await staging.take(10 * MB, Path("a"))
    await staging.take(10 * MB, Path("b"))  # copied, waiting for its upload
    started = trio.Event()

    async def third() -> None:
        await staging.take(10 * MB, Path("c"))
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(30)
        assert not started.is_set()  # 20 MB held of 25
        staging.release(first)  # a's copy is removed
        with trio.fail_after(5):
            await started.wait()


async def test_a_file_larger_than_the_budget_fails_at_once_with_enospc() -> None:
    staging = StagingSpace(Path("/unused"), InlineLane(), budget=10 * MB)  # type: ignore[arg-type]
    with pytest.raises(OSError) as refused:
        async with staging.reserve(11 * MB, Path("big")):
            pytest.fail("a copy that can never fit started")
    assert refused.value.errno == errno.ENOSPC and "APP_LOCAL_STAGING_MAX_BYTES" in str(refused.value)
    assert await staging.larger_than_disk(11 * MB)
    assert not await staging.larger_than_disk(9 * MB)


async def test_a_file_that_fits_the_disk_only_with_the_blocks_kept_for_root_is_larger_than_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ext4 volume keeps 5 % for root: the service's user can never fill them."""
    disk = os.statvfs_result((4096, 4096, 1000, 1000, 950, 0, 0, 0, 0, 255))  # 1000 blocks, 50 kept
    monkeypatch.setattr(os, "statvfs", lambda root: disk)
    staging = StagingSpace(Path("/unused"), InlineLane())  # type: ignore[arg-type]
    assert await staging.larger_than_disk(951 * 4096)
    assert not await staging.larger_than_disk(950 * 4096)
