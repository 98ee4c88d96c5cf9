"""Worker threads for blocking calls, in separate lanes so one stuck kind cannot starve another.

``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` returns at once when cancelled, but
the thread keeps its limiter token until the call really returns. A hung NFS server can
therefore use up every token of the lane its calls run in: NFS calls, staging I/O and
Azure calls each get their own lane, and each lane counts the calls that are stuck.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from opentelemetry import trace

T = TypeVar("T")
_tracer = trace.get_tracer(__name__)


class StillRunning(Exception):
    """Raised in a thread of run_alone whose caller gave its turn up before the call began."""


class ThreadLane:
    def __init__(self, name: str, threads: int, *, stuck_after_s: float = 10.0) -> None:
        self.name = name
        self.limiter = trio.CapacityLimiter(threads)
        self.stuck_after_s = stuck_after_s
        self._started: dict[int, float] = {}
        self._ids = itertools.count()
        # Guards _started: calls end in their own threads, maybe after trio abandoned them.
        self._lock = threading.Lock()
        # (began, ended), time.monotonic, of the last calls that returned, in the order they
        # ended: whether the other side answered anyone in a given while (see answered_within).
        self._returned: deque[tuple[float, float]] = deque(maxlen=1024)
        # The calls run through run_alone that have not returned, by kind (guarded by _lock).
        self._alone: dict[str, tuple[object, trio.Event]] = {}

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call_id = next(self._ids)

        def tracked() -> T:
            began = time.monotonic()  # once it has its thread: no wait for one counts
            with self._lock:
                self._started[call_id] = began
            try:
                # Trio runs this in a copy of the caller's context: inside a file's span, the
                # call gets a child span of its own, in the thread; a bare call gets none.
                if trace.get_current_span().get_span_context().is_valid:
                    called = getattr(fn, "func", fn)  # a functools.partial: what it calls
                    name = f"{self.name} {getattr(called, '__name__', 'call')}"
                    with _tracer.start_as_current_span(name):
                        result = fn(*args, **kwargs)
                else:
                    result = fn(*args, **kwargs)
            finally:
                with self._lock:
                    del self._started[call_id]
            self._returned.append((began, time.monotonic()))  # (an abandoned call's too)
            return result

        return await trio.to_thread.run_sync(tracked, limiter=self.limiter, abandon_on_cancel=True)

    async def run_alone(self, kind: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` once the last call of ``kind`` run here has returned, waiting (in no
        thread) for as long as the caller's cancel scope allows. For calls repeated at every
        failure or retry (is the share answering? record the state): each one abandoned on a
        hung share keeps its thread, and one per failure would take every thread of the lane,
        stalling the calls of every file."""
        while True:
            with self._lock:
                held = self._alone.get(kind)
                if held is None:
                    token, done = object(), trio.Event()
                    self._alone[kind] = (token, done)
                    break
            await held[1].wait()
        trio_token = trio.lowlevel.current_trio_token()
        began = False

        def alone() -> T:
            nonlocal began
            # Decided under the lock on both sides: a caller cancelled as its thread started
            # has given the turn back, and then the call must not run beside the next one.
            with self._lock:
                if self._alone.get(kind, (None,))[0] is not token:
                    raise StillRunning(f"the {kind} was given up on before it began")
                began = True
            try:
                return fn(*args)
            finally:
                if self._forget_alone(kind, token):
                    with contextlib.suppress(trio.RunFinishedError):
                        trio_token.run_sync_soon(done.set)

        functools.update_wrapper(alone, getattr(fn, "func", fn))  # its span is named for fn
        try:
            return await self.run(alone)
        finally:
            with self._lock:
                gave_back = not began and self._alone.get(kind, (None,))[0] is token
                if gave_back:
                    del self._alone[kind]
            if gave_back:
                done.set()

    def _forget_alone(self, kind: str, token: object) -> bool:
        with self._lock:
            if self._alone.get(kind, (None,))[0] is token:
                del self._alone[kind]
                return True
        return False

    def alone_running(self, kind: str) -> trio.Event | None:
        """The event set once the call of ``kind`` running now returns; None if none runs."""
        with self._lock:
            held = self._alone.get(kind)
        return None if held is None else held[1]

    def answered_within(self, after: float, before: float) -> bool:
        """Whether a call begun at ``after`` or later returned by ``before`` (time.monotonic)."""
        for began, ended in reversed(self._returned):
            if ended < after:
                return False  # (and so did every call before it: none began after ``after``)
            if began >= after and ended <= before:
                return True
        return False

    def running(self) -> int:
        with self._lock:
            return len(self._started)

    def stuck(self) -> int:
        """Calls running for longer than ``stuck_after_s``, abandoned ones included."""
        limit = time.monotonic() - self.stuck_after_s
        with self._lock:
            return sum(1 for started in self._started.values() if started < limit)

    def longest_running_s(self) -> float:
        """How long the oldest call still running has run: a hang shows here long before it
        counts as stuck (for Azure, only after the read timeout)."""
        with self._lock:
            oldest = min(self._started.values(), default=None)
        return 0.0 if oldest is None else round(time.monotonic() - oldest, 1)

    def snapshot(self) -> dict[str, float]:
        return {
            "threads": int(self.limiter.total_tokens),
            "running": self.running(),
            "stuck": self.stuck(),
            "longest_running_s": self.longest_running_s(),
        }


@dataclass(frozen=True)
class Lanes:
    nfs: ThreadLane
    staging: ThreadLane
    azure: ThreadLane
