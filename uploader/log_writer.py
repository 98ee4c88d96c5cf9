"""Log lines written to stderr by a thread of their own.

A write to stderr blocks when nobody reads it fast enough (a full pipe: a stalled container
log driver, a paused ``kubectl logs | less``). Written from the Trio thread, that would stop
the event loop, and with it ``/healthz``, the API, every upload and even SIGTERM. Records are
formatted where they are logged (the span context for ``trace_id`` is there) and queued; one
thread writes them. When the queue is full, new lines are dropped and counted, and a line
says how many, where they were missing, once the stream takes lines again: losing log lines
beats stopping uploads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from typing import TextIO

DEFAULT_CAPACITY = 10_000  # lines; ~3 MB at the usual ~300 bytes a line
FLUSH_BUDGET_S = 2.0  # how long flush() and close() wait for a stream that takes nothing


class BackgroundLineWriter(logging.Handler):
    def __init__(self, stream: TextIO, *, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__()
        self._stream = stream
        # (lines dropped just before this one, the line); None stops the writer.
        self._lines: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=capacity)
        self._dropped = 0  # only emit() changes it, and logging calls emit() under self.lock
        # Lines unwritten when a flush gave up on the stream: flush() waits again only once
        # the writer has moved on (logging.shutdown flushes, then closes).
        self._stuck_at: int | None = None
        self._thread = threading.Thread(target=self._write_lines, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait((self._dropped, line))
        except queue.Full:
            self._dropped += 1
        else:
            self._dropped = 0

    def dropped(self) -> int:
        """Lines dropped since the last line that was queued."""
        return self._dropped

    def _write_lines(self) -> None:
        while (item := self._lines.get()) is not None:
            dropped, line = item
            try:
                if dropped:
                    self._write(self._dropped_note(dropped))
                self._write(line)
            finally:
                self._lines.task_done()
        self._lines.task_done()

    def _write(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr: there is nowhere left to say so

    def _dropped_note(self, dropped: int) -> str:
        record = logging.LogRecord(
            "uploader.log_writer", logging.WARNING, __file__, 0,
            "%d log lines were dropped: stderr was not taking them", (dropped,), None,
        )
        return self.format(record)

    def flush(self) -> None:
        """Wait until the lines logged so far are written, for at most FLUSH_BUDGET_S; not
        at all once a flush has found the stream stuck and nothing was written since."""
        deadline = time.monotonic() + FLUSH_BUDGET_S
        with self._lines.all_tasks_done:
            if self._stuck_at == self._lines.unfinished_tasks:
                return
            while self._lines.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._stuck_at = self._lines.unfinished_tasks
                    return
                self._lines.all_tasks_done.wait(remaining)
            self._stuck_at = None

    def close(self) -> None:
        self.flush()
        # A writer stuck on the stream is a daemon thread: the exit goes on without it.
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(None)
        super().close()


def own_stderr() -> TextIO:
    """A stream of its own on stderr's file: a writer blocked on a full pipe then holds no
    lock that other writers of ``sys.stderr`` (warnings, the exit's last line) need."""
    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return sys.stderr  # no file behind it (a test's capture): share it
    return open(
        fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=True
    )
