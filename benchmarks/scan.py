"""The watcher's scan of an incoming folder holding many files, in-process.

``uploader.watcher.scan_session_folder`` (the listing the watcher runs in a thread on each
poll) against the bare floor of the same listing: ``os.scandir`` alone (names only), and
``os.scandir`` with the ``lstat`` of each entry (the least a watcher needs: size and
mtime). Also timed: ``StabilityTracker.observe`` on the result, which runs on the event loop.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import WORK_DIR


def ensure_folder(count: int) -> Path:
    folder = WORK_DIR / "scan" / f"incoming-{count}"
    marker = WORK_DIR / "scan" / f"incoming-{count}.done"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        fd = os.open(folder / f"file-{i:06d}.dat", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x" * (i % 100))
        os.close(fd)
    marker.touch()
    return folder


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    fn()  # warm the dentry and inode caches
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times, result


def run_scan_benchmark(count: int, repeats: int) -> dict[str, Any]:
    from uploader.watcher import StabilityTracker, scan_session_folder

    folder = ensure_folder(count)

    def names_only() -> int:
        n = 0
        with os.scandir(folder) as entries:
            for _ in entries:
                n += 1
        return n

    def with_lstat() -> int:
        n = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                n += 1
        return n

    plain_s, plain_all, plain_n = _timed(names_only, repeats)
    stat_s, stat_all, stat_n = _timed(with_lstat, repeats)
    scan_s, scan_all, scan = _timed(lambda: scan_session_folder(folder), repeats)
    if not (plain_n == stat_n == len(scan.entries) == count):
        raise RuntimeError(f"listings disagree: {plain_n}, {stat_n}, {len(scan.entries)}, expected {count}")

    def observe_twice() -> None:
        tracker = StabilityTracker(0.5)
        tracker.observe(scan.entries, time.time(), time.monotonic())  # first sight
        tracker.observe(scan.entries, time.time(), time.monotonic())  # unchanged: compared

    observe_s, observe_all, _ = _timed(observe_twice, repeats)
    return {
        "files": count,
        "repeats": repeats,
        "scandir_names_s": plain_s,
        "scandir_lstat_s": stat_s,
        "scan_session_folder_s": scan_s,
        "observe_two_scans_s": observe_s,
        "ratio_vs_scandir": scan_s / plain_s,
        "ratio_vs_scandir_lstat": scan_s / stat_s,
        "all_s": {
            "scandir_names": plain_all,
            "scandir_lstat": stat_all,
            "scan_session_folder": scan_all,
            "observe_two_scans": observe_all,
        },
    }
