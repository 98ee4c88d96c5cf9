"""The watcher: polls a session's incoming folder and hands stable files to the workers.

A file is stable when two scans in a row see the same (size, mtime) and it is older than
``min_file_age_s``, either by its mtime or by how long we have watched it stay unchanged
(the second covers an NFS server whose clock runs ahead of ours). A pending set keeps a
file from being queued twice while it waits for a worker; the bounded channel gives
backpressure.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import trio

from uploader.drain import Offers, below_a_file_in_flight, offer
from uploader.errors import describe
from uploader.fileops import Scan, ScanEntry, list_files, make_session_folder
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout
from uploader.progress import Progress
from uploader.worker import WorkItem

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


def scan_session_folder(root: Path, extensions: tuple[str, ...] = ()) -> Scan:
    """List a session's incoming folder; a missing folder is made again, since users drop into
    it, and said (files dropped where it went are not seen); one replaced by a symbolic link
    or a file is not listed (NotADirectoryError)."""
    if make_session_folder(root):
        _say_made_again(root)
        return Scan([], [])
    try:
        return list_files(root, extensions)
    except FileNotFoundError:
        if make_session_folder(root):
            _say_made_again(root)
        return Scan([], [])


def _say_made_again(root: Path) -> None:
    log.warning("%s was missing and is made again: files dropped where it went are not seen", root)


def doubling_delay(failures: int, base_s: float, cap_s: float) -> float:
    """base, 2x base, 4x base ... after 1, 2, 3 ... failures in a row, capped at ``cap_s``."""
    return float(min(cap_s, base_s * 2 ** min(failures - 1, 64)))


class _Observation(NamedTuple):
    size: int
    mtime_ns: int
    unchanged_since: float  # monotonic time of the first scan that saw this (size, mtime)


class StabilityTracker:
    """Pure bookkeeping of what the scans saw; no I/O, no clock of its own."""

    def __init__(self, min_age_s: float, retry_base_s: float = 1.0) -> None:
        self.min_age_s = min_age_s
        self.retry_base_s = retry_base_s
        self._seen: dict[str, _Observation] = {}
        self._pending: set[str] = set()
        # Files whose claims failed: (failures in a row, monotonic time before which the
        # file is not offered again).
        self._held: dict[str, tuple[int, float]] = {}
        # Files released since the listing being observed began (None: no listing begun).
        self._released_while_listing: set[str] | None = None

    def begin_scan(self) -> None:
        """Call just before listing the folder. A file released from now until the listing
        is observed may be listed from before its claim moved it away: that listing does not
        offer it again (it would only be found gone); the next one tells."""
        self._released_while_listing = set()

    def observe(
        self, entries: Iterable[ScanEntry], wall_now: float, monotonic_now: float
    ) -> list[ScanEntry]:
        """Record one scan; return the entries that are stable and not already pending."""
        return [
            entry
            for found in self.observe_in_steps(entries, wall_now, monotonic_now)
            for entry in found
        ]

    def observe_in_steps(
        self, entries: Iterable[ScanEntry], wall_now: float, monotonic_now: float, step: int = 5000
    ) -> Iterator[list[ScanEntry]]:
        """``observe``, yielding what is stable every ``step`` entries so a caller on the
        event loop can let others run in between: a folder of 100,000 files must not hold up
        /healthz for a tenth of a second. The scan counts once the iterator is exhausted."""
        stable: list[ScanEntry] = []
        current: dict[str, _Observation] = {}
        seen, pending, held = self._seen, self._pending, self._held
        # The set itself, not a copy: releases between steps count too.
        released = self._released_while_listing if self._released_while_listing is not None else set()
        min_age_ns = self.min_age_s * 1e9
        wall_now_ns = wall_now * 1e9
        for count, entry in enumerate(entries, 1):
            rel, size, mtime_ns = entry
            before = seen.get(rel)
            if before is not None and before.size == size and before.mtime_ns == mtime_ns:
                current[rel] = before
                if rel not in pending and rel not in released and (
                    wall_now_ns - mtime_ns >= min_age_ns
                    or monotonic_now - before.unchanged_since >= self.min_age_s
                ) and (not held or rel not in held or held[rel][1] <= monotonic_now):
                    stable.append(entry)
            else:
                current[rel] = _Observation(size, mtime_ns, monotonic_now)
            if count % step == 0:
                yield stable
                stable = []
        self._seen = current
        # A file that left the folder was claimed (or deleted); forget that it was pending.
        self._pending.intersection_update(current)
        if held:
            self._held = {rel: hold for rel, hold in held.items() if rel in current}
        self._released_while_listing = None
        yield stable

    def mark_pending(self, rel: str) -> None:
        self._pending.add(rel)

    def release(self, rel: str) -> None:
        self._pending.discard(rel)
        self._held.pop(rel, None)
        if self._released_while_listing is not None:
            self._released_while_listing.add(rel)

    def claim_failed(self, rel: str, monotonic_now: float) -> float:
        """Release a file whose claim failed, to be offered again only after a delay that
        doubles with every failure in a row (from ``retry_base_s`` up to MAX_BACKOFF_S): a
        file that cannot be claimed (a folder we may not write to, a name too long for the
        processing folder) must not fail, and be logged, on every scan. Returns the delay."""
        self._pending.discard(rel)
        failures = self._held.get(rel, (0, 0.0))[0] + 1
        delay = doubling_delay(failures, self.retry_base_s, MAX_BACKOFF_S)
        self._held[rel] = (failures, monotonic_now + delay)
        return delay

    def in_folder(self, rel: str) -> bool:
        """Whether the last scan listed ``rel``."""
        return rel in self._seen

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    @property
    def claims_failing(self) -> int:
        """Files still in the folder whose last claim failed."""
        return len(self._held)


class Backoff:
    """Exponential backoff for a failing scan: base, 2x base, 4x base ... capped at ``cap_s``."""

    def __init__(self, base_s: float = 1.0, cap_s: float = MAX_BACKOFF_S) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return doubling_delay(self.failures, self.base_s, self.cap_s)

    def reset(self) -> None:
        self.failures = 0


async def run(
    send: trio.MemorySendChannel[WorkItem],
    *,
    date_prefix: str,
    session: str,
    layout: Layout,
    nfs: ThreadLane,
    progress: Progress,
    poll_interval_s: float,
    min_file_age_s: float,
    extensions: tuple[str, ...] = (),
    wall_clock: Callable[[], float] = time.time,
    offers: Offers | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll ``incoming/<session>/`` until cancelled; the channel end is closed on exit.
    ``offers``: the session's, which outlive this watcher (see drain.py)."""
    folder = layout.incoming_dir(session)
    tracker = StabilityTracker(min_file_age_s, retry_base_s=poll_interval_s)
    backoff = Backoff(base_s=poll_interval_s)
    offers = offers if offers is not None else Offers()

    def claim_settled(rel: str, failed: bool) -> None:
        if failed:
            tracker.claim_failed(rel, trio.current_time())
        else:
            tracker.release(rel)
        progress.claims_failing = tracker.claims_failing
    reported: set[str] = set()
    task_status.started()
    # Offers settled since the listing began, by any offer of the session's name (a drain's,
    # this watcher's before a stop and start): the listing may show them from before their
    # claim moved them, and offered again they would only be found gone.
    settled_since_listing: set[str] = set()
    with offers.listened(settled_since_listing.add):
        async with send:
            while True:
                tracker.begin_scan()
                settled_since_listing.clear()
                try:
                    scan = await nfs.run(scan_session_folder, folder, extensions)
                except OSError as exc:
                    delay = backoff.next_delay()
                    level = logging.WARNING if exc.errno in (errno.ESTALE, errno.ENOENT) else logging.ERROR
                    log.log(level, "cannot list %s (%s); next try in %.1f s", folder, describe(exc), delay)
                    progress.note_error(f"watcher: {describe(exc)}")
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                for problem in sorted(set(scan.skipped) - reported):
                    log.warning("left out of the scan of %s: %s", folder, problem, extra={"session": session})
                    progress.note_error(f"watcher: {problem}")
                reported = set(scan.skipped)
                progress.entries_skipped = len(scan.skipped)
                progress.incoming_files, progress.incoming_session = len(scan.entries), session
                stable: list[ScanEntry] = []
                for found in tracker.observe_in_steps(scan.entries, wall_clock(), trio.current_time()):
                    stable += found
                    await trio.lowlevel.checkpoint()
                progress.claims_failing = tracker.claims_failing
                offers.forget_failing(tracker.in_folder)
                # Oldest first: a folder's listing order says nothing of age, and a file late in it
                # would wait behind every newer one each time a restart or a full queue interrupted
                # the offers (under a backlog that never drains, for ever).
                stable.sort(key=lambda entry: (entry.mtime_ns, entry.rel))
                for entry in stable:
                    key = FileKey(date_prefix, session, entry.rel)
                    if progress.is_claimed(key) or below_a_file_in_flight(progress, key):
                        # An older file of the same name is still in flight: it goes first. So
                        # does a file named like one of its folders ("a" still going up, now
                        # "a/b"), which holds that name in the processing folder.
                        continue
                    if offers.is_pending(entry.rel) or entry.rel in settled_since_listing:
                        continue  # queued by the session's watcher before a stop, or a drain

                    tracker.mark_pending(entry.rel)
                    await offer(send, offers, key, (entry.size, entry.mtime_ns), partial(claim_settled, entry.rel))
                await trio.sleep(poll_interval_s)
