"""What the harness watches while the service runs: /healthz, the incoming folder (inotify),
the service's log, and its memory."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks.common import REPO_ROOT, descendants, status_kib


def raise_priority(niceness: int = -5) -> None:
    """Give the calling thread a head start on the CPU (as root), so that what the probes
    measure is the service's delay rather than the harness waiting for a core."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class HealthProbe:
    """GET /healthz every ``interval_s`` on a fresh connection (as kubelet probes do), from a
    process of its own at nice -5: in the harness's process, its wait for the harness's GIL
    (inotify, log tailing, the drop) would count as the service's latency."""

    def __init__(self, port: int, interval_s: float = 0.02) -> None:
        self.port = port
        self.interval_s = interval_s
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self._child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.probes", str(self.port), str(self.interval_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
        )

    def stop(self) -> None:
        """End the probing (closing its stdin) and collect what it measured; idempotent."""
        child, self._child = self._child, None
        if child is None:
            return
        out, _ = child.communicate(timeout=30)
        measured = json.loads(out)
        self.latencies_s, self.failures = measured["latencies_s"], measured["failures"]


def probe_healthz(port: int, interval_s: float, halt: threading.Event) -> dict[str, list]:
    raise_priority()
    latencies: list[float] = []
    failures: list[str] = []
    next_at = time.monotonic()
    while not halt.is_set():
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/healthz")
                answer = conn.getresponse()
                answer.read()
            finally:
                conn.close()
            elapsed = time.perf_counter() - started
            if answer.status == 200:
                latencies.append(elapsed)
            else:
                failures.append(f"HTTP {answer.status}")
        except OSError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        next_at += interval_s
        delay = next_at - time.monotonic()
        if delay < 0:  # fell behind (a slow answer): keep the pace, do not burst
            next_at = time.monotonic()
            delay = 0
        halt.wait(delay)
    return {"latencies_s": latencies, "failures": failures}


def _probe_main(port: int, interval_s: float) -> None:
    """The probing process: probes until its stdin closes, then prints what it measured."""
    halt = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.buffer.read()
        halt.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print(json.dumps(probe_healthz(port, interval_s, halt)), flush=True)


# ----- inotify ---------------------------------------------------------------------------

IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_MOVED_TO = 0x80
IN_DELETE = 0x200
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


@dataclass
class FolderEvents:
    """Timestamps (time.time()) of what happened in one folder."""

    appeared: dict[str, float] = field(default_factory=dict)  # renamed in (the drop)
    deleted: dict[str, float] = field(default_factory=dict)  # unlinked (the service's claim)
    opened: list[float] = field(default_factory=list)  # the folder itself opened (a scan starts)
    closed: list[float] = field(default_factory=list)  # ... and closed (the scan's listing ends)
    lost_watch: bool = False


class FolderWatch(threading.Thread):
    """inotify on one folder: renames in, unlinks, and opens/closes of the folder itself.

    The service's watcher is the only one that lists the incoming folder during a run, so
    each open/close pair of the folder is one of its scans. Events are stamped when this
    thread reads them, which it does as soon as poll() wakes it (about a millisecond).
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(name="inotify", daemon=True)
        self.events = FolderEvents()
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_OPEN | IN_CLOSE_NOWRITE | IN_MOVED_TO | IN_DELETE
        if self._libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self._halt = threading.Event()

    def run(self) -> None:
        raise_priority()
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while not self._halt.is_set():
                if poller.poll(50):
                    self._drain()
            self._drain()
        finally:
            os.close(self._fd)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return
            now = time.time()
            events = self.events
            offset = 0
            while offset < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                name = os.fsdecode(data[offset + 16 : offset + 16 + length].rstrip(b"\0"))
                offset += 16 + length
                if mask & IN_IGNORED:
                    events.lost_watch = True
                elif not name and mask & IN_ISDIR:
                    if mask & IN_OPEN:
                        events.opened.append(now)
                    elif mask & IN_CLOSE_NOWRITE:
                        events.closed.append(now)
                elif mask & IN_MOVED_TO:
                    events.appeared[name] = now
                elif mask & IN_DELETE:
                    events.deleted[name] = now

    def stop(self) -> FolderEvents:
        self._halt.set()
        self.join()
        return self.events


# ----- the service's log -------------------------------------------------------------------


class LogTail:
    """Reads the service's JSON log as it grows: the 'uploaded <key>' lines and problems."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.uploaded: dict[str, float] = {}  # blob name -> time of the log line
        self.problems: list[str] = []  # warning and error lines

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return len(self.uploaded)
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            try:
                entry = json.loads(raw)
            except ValueError:
                if raw.strip():
                    self.problems.append(raw.decode(errors="replace")[:300])
                continue
            if not isinstance(entry, dict):
                continue
            message = str(entry.get("message", ""))
            if message.startswith("uploaded "):
                stamp = datetime.fromisoformat(str(entry["time"])).timestamp()
                self.uploaded[message.split()[1]] = stamp
            elif entry.get("level") in ("warning", "error", "critical"):
                self.problems.append(message[:300])
        return len(self.uploaded)


# ----- memory -----------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every 50 ms (VmHWM covers the rest)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = status_kib(self.pid, "VmRSS") + sum(
                status_kib(child, "VmRSS") for child in descendants(self.pid)
            )
            self.peak_kib = max(self.peak_kib, total)
            self._halt.wait(self.interval_s)

    def stop(self) -> int:
        """Peak KiB: the largest sampled total, or the process's own high-water mark."""
        self._halt.set()
        self.join()
        return max(self.peak_kib, status_kib(self.pid, "VmHWM"))


if __name__ == "__main__":
    _probe_main(int(sys.argv[1]), float(sys.argv[2]))
