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
import queue
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
        """Wait until the lines logged so far are written, for at most FLUSH_BUDGET_S."""
        deadline = time.monotonic() + FLUSH_BUDGET_S
        with self._lines.all_tasks_done:
            while self._lines.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._lines.all_tasks_done.wait(remaining)

    def close(self) -> None:
        self.flush()
        # A writer stuck on the stream is a daemon thread: the exit goes on without it.
        with contextlib.suppress(queue.Full):
            self._lines.put(None, timeout=FLUSH_BUDGET_S)
        super().close()
