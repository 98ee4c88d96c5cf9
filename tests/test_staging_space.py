"""Room on the staging disk is reserved before a copy starts (uploader/staging_space.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from uploader.lanes import ThreadLane
from uploader.staging_space import StagingSpace

MB = 1_000_000


def space_with_free_bytes(monkeypatch: pytest.MonkeyPatch, free: int) -> StagingSpace:
    space = StagingSpace(Path("/unused"), ThreadLane("staging", 1))

    async def fixed() -> int:
        return free

    monkeypatch.setattr(space, "_look", fixed)
    return space


async def test_a_copy_that_would_not_fit_beside_the_running_ones_waits_for_one_to_end(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = space_with_free_bytes(monkeypatch, 24 * MB)
    started: list[str] = []

    async def copy(name: str, seconds: float) -> None:
        async with space.reserve(10 * MB):
            started.append(name)
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, "a", 5)
        nursery.start_soon(copy, "b", 10)
        await trio.sleep(0.1)
        nursery.start_soon(copy, "c", 1)
        await trio.sleep(1)
        assert sorted(started) == ["a", "b"]  # 24 MB free, 20 reserved: c waits
        await trio.sleep(4.5)  # a has ended
        assert sorted(started) == ["a", "b", "c"]


async def test_a_copy_larger_than_the_disk_starts_when_it_is_alone(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It fails on its own then (ENOSPC), instead of waiting for ever."""
    space = space_with_free_bytes(monkeypatch, 1 * MB)
    with trio.fail_after(1):
        async with space.reserve(10 * MB):
            pass


async def test_copies_beside_others_look_at_a_roomy_disk_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file must not cost a trip to a thread for statvfs each."""
    looks: list[str] = []
    statvfs = os.statvfs

    def counted(path: os.PathLike[str]) -> os.statvfs_result:
        looks.append(os.fspath(path))
        return statvfs(path)

    monkeypatch.setattr(os, "statvfs", counted)
    space = StagingSpace(tmp_path, ThreadLane("staging", 1))
    async with space.reserve(1000):  # alone: it starts without a look
        for _ in range(100):
            async with space.reserve(1000):
                pass
    assert len(looks) == 1
