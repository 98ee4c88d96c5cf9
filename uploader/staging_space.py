"""Room on the local staging disk, reserved before a copy to it starts.

Copies that cannot all fit must not all start: on a small disk they would run out of space
together half-way (ENOSPC), and the parts they wrote would keep each other from ever
finishing. A copy waits until the disk's free space, less what the copies already running
may still write, holds its file; or until no other copy runs (a file larger than the whole
disk then fails on its own, and is quarantined).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from uploader.lanes import ThreadLane


class StagingSpace:
    def __init__(self, root: Path, lane: ThreadLane, *, recheck_s: float = 1.0) -> None:
        self.root = root
        self.lane = lane
        self.recheck_s = recheck_s
        self._reserved = 0
        self._released = trio.Event()
        # The last look at the disk, and what copies that ended since then wrote: a look is
        # good for recheck_s, so that small files do not cost a trip to a thread each.
        self._free_seen = 0
        self._seen_at = -math.inf
        self._written_since = 0

    @contextlib.asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the disk for a copy, waiting for them if need be."""
        while size > 0 and self._reserved and size > self._room(fresh_only=True):
            if size <= await self._look() - self._reserved:
                break
            # Copies end, and files elsewhere on the disk may go: look again then.
            with trio.move_on_after(self.recheck_s):
                await self._released.wait()
        self._reserved += size
        try:
            yield
        finally:
            self._reserved -= size
            self._written_since += size  # at most: the copy may have failed and gone
            self._released.set()
            self._released = trio.Event()

    def _room(self, *, fresh_only: bool) -> float:
        if fresh_only and trio.current_time() - self._seen_at > self.recheck_s:
            return -math.inf
        return self._free_seen - self._written_since - self._reserved

    async def _look(self) -> int:
        try:
            disk = await self.lane.run(os.statvfs, self.root)
        except OSError:
            free = sys.maxsize  # cannot tell: hold no copy back
        else:
            free = disk.f_bavail * disk.f_frsize
        self._free_seen, self._seen_at, self._written_since = free, trio.current_time(), 0
        return free
