"""GC: deletes completed files, orphaned staging copies and empty folders.

Workers delete each file they complete at once, so NFS empties as fast as uploads finish;
a sweep every ``gc_interval_s`` (and one at start-up) deletes whatever a crash or a failing
share left behind. The sweep also re-queues a claimed file that no worker owns
(say, recovery could not see it through a failing share): found unowned by two sweeps in
a row, it is queued again, so no claimed file waits for the next restart.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import trio

from uploader.errors import describe
from uploader.fileops import PROBE_FILE_NAME, list_files, remove_quietly
from uploader.lanes import Lanes
from uploader.layout import FileKey, Layout, is_date_prefix, is_session_name
from uploader.progress import Progress
from uploader.worker import WorkItem

log = logging.getLogger(__name__)


def remove_empty_folders(top: Path, *, keep_top: bool = True) -> int:
    """Remove the empty folders below ``top`` (bottom up); returns how many went."""
    removed = 0
    for folder, _, _ in os.walk(top, topdown=False, followlinks=False):
        if keep_top and folder == os.fspath(top):
            continue
        try:
            os.rmdir(folder)
            removed += 1
        except OSError:
            pass  # not empty, or already gone: both fine
    return removed


def empty_staging(root: Path) -> int:
    """Blocking: remove the copies an earlier run left in staging; returns how many went.

    At start-up, before any worker: every file claimed before is copied again (a copy a
    crash left may be partial), so what staging holds then is of no use, and would only
    take the room that the copies to come are counted against (staging_space.py). Only the
    service's own are removed, the files of <date>/<session>/ trees and its probe file: a
    staging root set to a folder that holds other files (a mistyped setting, a disk's
    lost+found) loses none of them (``foreign_in_staging`` names them)."""
    removed = sum(remove_quietly(path) for _, path in _keys_below(root))
    for name in _probe_files(root):  # (a crash in the middle of a probe)
        remove_quietly(root / name)
    for date in _dated_folders(root):
        remove_empty_folders(date, keep_top=False)
    return removed


# What a file system puts at the top of a disk of its own, which staging may be.
_FILE_SYSTEM_OWN = {"lost+found"}


def _top_names(root: Path) -> list[str]:
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []


def _probe_files(root: Path) -> list[str]:
    return [name for name in _top_names(root) if name.startswith(PROBE_FILE_NAME)]


def foreign_in_staging(root: Path) -> list[str]:
    """Blocking: the names at the top of the staging root that are not the service's."""
    return [
        name for name in _top_names(root)
        if not is_date_prefix(name) and not name.startswith(PROBE_FILE_NAME) and name not in _FILE_SYSTEM_OWN
    ]


def _keys_below(root: Path) -> list[tuple[FileKey, Path]]:
    """(key, path) of every file in a <date>/<session>/<rel> tree."""
    found: list[tuple[FileKey, Path]] = []
    try:
        dates = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    for date in dates:
        if not is_date_prefix(date):
            continue
        try:
            sessions = sorted(os.listdir(root / date))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for session in sessions:
            if not is_session_name(session):
                continue  # not the service's (recovery says so at start-up): never uploaded
            try:
                scan = list_files(root / date / session)
            except (FileNotFoundError, NotADirectoryError):
                continue
            found.extend((FileKey(date, session, e.rel), root / date / session / e.rel) for e in scan.entries)
    return found


@dataclass
class Sweep:
    counts: dict[str, int]
    unowned: set[FileKey]  # claimed files (in processing) that no worker or queue holds


def sweep(layout: Layout, progress: Progress) -> Sweep:
    """Blocking: one full pass (run it in a thread started by Trio)."""

    def claimed(key: FileKey) -> bool:
        # Asked of the Trio thread, which owns ``progress``, at the moment of deciding.
        return bool(trio.from_thread.run_sync(progress.is_claimed, key))

    counts = {"completed": 0, "staging": 0, "folders": 0}
    for key, path in _keys_below(layout.completed_root):
        if claimed(key):
            # A completion being retried (its move's answer lost) finds here that the move
            # was done; a later sweep removes it.
            continue
        counts["completed"] += remove_quietly(path)
        remove_quietly(layout.staging_path(key))
    for key, path in _keys_below(layout.staging_root):
        # Asked, then removed: a claim of that very name starting in between loses its fresh
        # copy; its upload then fails once (ENOENT) and is retried. Rare enough to keep GC
        # free of locks shared with the workers.
        if not claimed(key):
            # (Listed before a file that just completed removed its own copy: not counted.)
            counts["staging"] += remove_quietly(path)
    unowned = {key for key, _ in _keys_below(layout.processing_root) if not claimed(key)}
    for top in (layout.completed_root, layout.failed_files_root, layout.failed_reasons_root,
                layout.drains_root):
        counts["folders"] += remove_empty_folders(top)
    # The two roots the operator chose hold other folders too: only the dated ones are ours.
    for date in _dated_folders(layout.processing_root) + _dated_folders(layout.staging_root):
        counts["folders"] += remove_empty_folders(date, keep_top=False)
    return Sweep(counts, unowned)


def _dated_folders(root: Path) -> list[Path]:
    return [root / name for name in _top_names(root) if is_date_prefix(name)]


async def run(
    requeue: trio.MemorySendChannel[WorkItem],
    *,
    layout: Layout,
    lanes: Lanes,
    progress: Progress,
    interval_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    suspects: set[FileKey] = set()
    async with requeue:
        while True:
            try:
                result = await lanes.nfs.run(sweep, layout, progress)
            except OSError as exc:
                log.warning("GC sweep failed: %s", describe(exc))
            else:
                if any(result.counts.values()):
                    log.info("GC removed %(completed)d completed files, %(staging)d staging "
                             "copies and %(folders)d empty folders", result.counts)
                for key in sorted(suspects & result.unowned):
                    if not progress.is_claimed(key):
                        log.warning("queueing %s again: claimed, but no worker had it", key)
                        progress.claimed.add(key)
                        await requeue.send(WorkItem(key, claimed=True))
                suspects = result.unowned - suspects
            await trio.sleep(interval_s)
