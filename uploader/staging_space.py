"""Room on the local staging disk, reserved before a copy to it starts.

Copies that cannot all fit must not all start: on a small disk they would run out of space
together half-way (ENOSPC), and the parts they wrote would keep each other from ever
finishing. A copy waits, in turn, until the disk's free space less what the copies already
running have still to write holds its file; a copy alone always starts (a file larger than
the whole disk then fails on its own, and is quarantined).

A reservation lasts from before a copy until the copy is removed, so the reservations are
what staging holds (its leftovers are removed at start-up). A budget
(``APP_LOCAL_STAGING_MAX_BYTES``) stands in for the disk's size where the disk cannot tell
it: a Kubernetes ``emptyDir`` with a ``sizeLimit`` is a folder on the node's disk, and the
kubelet evicts the pod that writes past it. The room is then also at most the budget less
what is reserved, and a file larger than the budget fails at once (ENOSPC), before a byte
of it is written.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import trio

from uploader.lanes import ThreadLane


class StagingSpace:
    NOTHING: ClassVar[dict[str, int]] = {"copies": 0, "held_bytes": 0, "waiting_for_room": 0}  # (before start-up)

    def __init__(self, root: Path, lane: ThreadLane, *, recheck_s: float = 1.0, budget: int = 0) -> None:
        self.root = root
        self.lane = lane
        self.recheck_s = recheck_s
        self.budget = budget  # bytes the staging folder may hold; 0: as many as the disk
        self._running: dict[int, tuple[int, Path]] = {}  # reservation: (size, staging path)
        self._ids = itertools.count()
        self._turn = trio.Lock()  # first come, first served: a large file is not starved
        self._released = trio.Event()
        # The last look at the disk (free space less what running copies had still to write)
        # and what was reserved since: good for recheck_s, so that small files beside others
        # do not cost a trip to a thread each. Space freed since is only seen at the next look.
        self._room_seen = 0
        self._seen_at = -float("inf")
        self._reserved_since = 0
        self.waiting = 0  # copies waiting for their turn or for room

    @contextlib.asynccontextmanager
    async def reserve(self, size: int, path: Path) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the disk for the copy to ``path`` while in the block."""
        reservation = await self.take(size, path)
        try:
            yield
        finally:
            self.release(reservation)

    async def take(self, size: int, path: Path) -> int | None:
        """Hold ``size`` bytes of the disk for the copy to ``path``, waiting for them if need
        be, until ``release``: from before the copy until the copy is removed, so that what
        staging holds is what is held. Returns the reservation (None for nothing to hold).

        Whoever waits holds the turn; the copies that stand in its way are further down the
        pipeline, which never waits for room, so they leave.
        """
        if size <= 0:
            return None
        if self.budget and size > self.budget:
            raise OSError(errno.ENOSPC, f"{size} bytes do not fit in APP_LOCAL_STAGING_MAX_BYTES "
                          f"({self.budget})", str(path))
        self.waiting += 1
        try:
            async with self._turn:
                while self._running and size > self._room():
                    if size <= await self._look():
                        break
                    # Copies end and uploads free their copies: look again then.
                    with trio.move_on_after(self.recheck_s):
                        await self._released.wait()
                reservation = next(self._ids)
                self._running[reservation] = (size, path)
                self._reserved_since += size
        finally:
            self.waiting -= 1
        return reservation

    def snapshot(self) -> dict[str, int]:
        """What status shows: copies holding room (and how much), and copies waiting for it."""
        return {
            "copies": len(self._running),
            "held_bytes": sum(size for size, _ in self._running.values()),
            "waiting_for_room": self.waiting,
        }

    def release(self, reservation: int | None) -> None:
        if reservation is None or self._running.pop(reservation, None) is None:
            return
        self._released.set()
        self._released = trio.Event()

    async def larger_than_disk(self, size: int) -> bool:
        """Whether a file of ``size`` bytes could never fit, even on an empty disk."""
        if self.budget and size > self.budget:
            return True
        try:
            disk = await self.lane.run(os.statvfs, self.root)
        except OSError:
            return False
        # Less the blocks the file system keeps for root (5 % on ext4 by default), which a
        # service running as another user can never write: only f_bavail counts them out.
        return size > (disk.f_blocks - (disk.f_bfree - disk.f_bavail)) * disk.f_frsize

    def _room(self) -> float:
        if trio.current_time() - self._seen_at > self.recheck_s:
            return -float("inf")
        return self._room_seen - self._reserved_since

    async def _look(self) -> int:
        running = list(self._running.values())
        room = await self.lane.run(_room_on_disk, self.root, running)
        if self.budget:
            room = min(room, self.budget - sum(size for size, _ in running))
        self._room_seen, self._seen_at, self._reserved_since = room, trio.current_time(), 0
        return room


def _room_on_disk(root: Path, running: list[tuple[int, Path]]) -> int:
    """Blocking: free bytes, less what the running copies have still to write."""
    try:
        disk = os.statvfs(root)
    except OSError:
        return sys.maxsize  # cannot tell: hold no copy back
    to_write = 0
    for size, path in running:
        try:
            written = os.lstat(path).st_size
        except OSError:
            written = 0
        to_write += max(0, size - written)
    return disk.f_bavail * disk.f_frsize - to_write
