"""Summaries of a py-spy ``--format raw --threads`` recording of the service.

Each line of the recording is ``frame;frame;...;frame count`` (outermost first); with
``--threads`` the first frame names the thread. Samples are sorted into where they ran:
the Trio event loop, a lane thread (by the blocking call it runs), the SDK's own thread
pool, or elsewhere; and counted by leaf frame (self time) and by uploader/ function
(inclusive time).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


def _parse(frame: str) -> tuple[str, str, str]:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), "", ""
    return match["func"], match["file"], match["line"] or ""


# Leaves where a thread only waits (py-spy's idle detection misses them on this kernel):
# an idle trio worker thread, the event loop in epoll, a request waiting for its answer.
_WAITING = (
    ("WorkerThread._work", "trio/_core/_thread_cache.py"),
    ("EpollIOManager.get_events", "trio/_core/_io_epoll.py"),
    ("SocketIO.readinto", "socket.py"),
)
# Handing a call to a thread and its result back: mostly waiting for the GIL after ctypes or
# socket calls that released it.
_HANDOFF = (
    ("get_os_thread_name_func.<locals>.namefunc", "trio/_core/_thread_cache.py"),
    ("EntryQueue.run_sync_soon", "trio/_core/_entry_queue.py"),
    ("WakeupSocketpair.wakeup_thread_and_signal_safe", "trio/_core/_wakeup_socketpair.py"),
    ("WakeupSocketpair.drain", "trio/_core/_wakeup_socketpair.py"),
)


def _matches(leaf: tuple[str, str, str], table: tuple[tuple[str, str], ...]) -> bool:
    return any(leaf[0] == func and leaf[1].endswith(file) for func, file in table)


def _where(frames: list[str]) -> str:
    parsed = [_parse(f) for f in frames]
    if _matches(parsed[-1], _WAITING):
        return "waiting (idle thread, epoll, HTTP answer)"
    if _matches(parsed[-1], _HANDOFF):
        return "thread hand-off (trio thread cache, wake-ups, GIL)"
    for i, (func, file, _) in enumerate(parsed):
        if file.endswith("uploader/lanes.py") and func.endswith("tracked"):
            # The blocking call the lane runs: the next frame that is not a span or a
            # tracing decorator wrapped around it.
            for inner_func, inner_file, _ in parsed[i + 1 :]:
                if inner_file.endswith(("uploader/lanes.py", "contextlib.py", "_decorator.py", "decorator.py")) or "opentelemetry" in inner_file or inner_func.endswith(("start_as_current_span", "get_current_span")):
                    continue
                return f"lane thread: {inner_func} ({Path(inner_file).name})"
            return "lane thread: span bookkeeping (opentelemetry)"
    files = [file for _, file, _ in parsed]
    if any("trio/_core/_run.py" in f for f in files) and not any("trio/_core/_thread_cache.py" in f for f in files):
        return "event loop"
    if any("concurrent/futures/thread.py" in f for f in files):
        return "SDK thread pool (upload_blob's own workers)"
    if any("trio/_core/_thread_cache.py" in f for f in files):
        return "trio worker thread (other)"
    return "other"


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    by_place: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    by_leaf_on_loop: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        place = _where(frames)
        by_place[place] += count
        func, file, line = _parse(frames[-1])
        leaf = f"{func} ({file}:{line})" if line else f"{func} ({file})"
        by_leaf[leaf] += count
        if place == "event loop":
            by_leaf_on_loop[leaf] += count
        seen = set()
        for frame in frames:
            func, file, _ = _parse(frame)
            if "uploader/" in file and not file.startswith("<"):
                name = f"{file.split('uploader/', 1)[1]}:{func}"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, n, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "by_place": share(by_place),
        "self_by_line": share(by_leaf),
        "self_on_event_loop": share(by_leaf_on_loop),
        "inclusive_uploader": share(inclusive),
    }
