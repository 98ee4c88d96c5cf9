"""Run the service with candidate changes applied in memory, to measure them before anyone
edits uploader/:

    BENCH_PATCHES=nice,timing make bench BENCH_ARGS="--service-script benchmarks/patched_service.py --tools A,Ah"

``BENCH_PATCHES`` names the changes (comma-separated):

- ``nosync``: no ``fsync`` of the staging copy.
- ``nice``: lane threads run at nice +5, so the event loop thread gets a core first.
- ``switch``: ``sys.setswitchinterval(0.001)``: a thread waiting for the GIL gets it sooner.
- ``nootel``: ``OTEL_SDK_DISABLED=true``: no spans and no metrics, to see what telemetry costs.
- ``loop``: a Trio instrument that times every task step and every event-loop batch (from
  the end of one wait for I/O to the start of the next), and at exit writes to
  ``BENCH_LOOP_LOG`` their distributions and the slowest steps by task name: what keeps the
  event loop (and so ``/healthz``) waiting.
- ``timing``: append ``<step> <start> <wall s> <thread CPU s>`` for every blocking step (staging
  copy, block read, completion, each storage request) to ``BENCH_TIMING_LOG``, to attribute time.

Two earlier patches were adopted by uploader/ and removed from here: sending the staged MD5s
as Content-MD5 instead of hashing again (commit b338d84) and fewer thread trips per small
file (f991fd4). None of this is the service's code: it is a measuring tool; benchmarks/RESULTS.md
says what each patch gained.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from pathlib import Path

PATCHES = {p.strip() for p in os.environ.get("BENCH_PATCHES", "").split(",") if p.strip()}


class _NoSyncOsType:
    """``os`` as fileops sees it, minus fsync (the session record loses it too: harmless here)."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        return None


def _patch_nosync() -> None:
    from uploader import fileops

    fileops.os = _NoSyncOsType()  # type: ignore[attr-defined]


def _patch_nice() -> None:
    from uploader import lanes

    marked = threading.local()
    original = lanes.ThreadLane.run

    async def run(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        def lowered(*a, **k):  # type: ignore[no-untyped-def]
            if not getattr(marked, "done", False):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
                marked.done = True
            return fn(*a, **k)

        return await original(self, lowered, *args, **kwargs)

    lanes.ThreadLane.run = run  # type: ignore[method-assign]


def _patch_timing() -> None:
    from azure.storage.blob import BlobClient

    from uploader import blobstore, fileops

    log = open(os.environ.get("BENCH_TIMING_LOG", "/tmp/bench-timing.log"), "a", buffering=1)  # noqa: SIM115
    lock = threading.Lock()

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.time()
            cpu = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                line = f"{name} {started:.6f} {time.time() - started:.6f} {time.thread_time() - cpu:.6f}\n"
                with lock:
                    log.write(line)

        return wrapper

    for name in ("claim", "claim_and_stage", "stage_copy", "mark_completed", "finish", "remove_quietly"):
        if hasattr(fileops, name):
            setattr(fileops, name, timed(name, getattr(fileops, name)))
    if hasattr(blobstore, "read_block"):
        blobstore.read_block = timed("read_block", blobstore.read_block)
    for name in ("upload_blob", "stage_block", "commit_block_list", "get_blob_properties", "get_block_list"):
        setattr(BlobClient, name, timed(name, getattr(BlobClient, name)))


def _patch_loop() -> None:
    import collections

    import trio

    class LoopTimer(trio.abc.Instrument):
        def __init__(self) -> None:
            self.steps: dict[str, list[float]] = collections.defaultdict(list)
            self.batches: list[float] = []
            self.waits: list[float] = []
            self._step_started = 0.0
            self._batch_started: float | None = None
            self._wait_started = 0.0

        def before_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
            self._step_started = time.perf_counter()

        def after_task_step(self, task) -> None:  # type: ignore[no-untyped-def]
            self.steps[task.name].append(time.perf_counter() - self._step_started)

        def before_io_wait(self, timeout: float) -> None:
            now = time.perf_counter()
            if self._batch_started is not None:
                self.batches.append(now - self._batch_started)
            self._wait_started = now

        def after_io_wait(self, timeout: float) -> None:
            now = time.perf_counter()
            self.waits.append(now - self._wait_started)
            self._batch_started = now

    timer = LoopTimer()

    def quantiles(values: list[float]) -> str:
        if not values:
            return "-"
        ordered = sorted(values)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
        return (f"n={len(ordered)} p50={pick(0.5):.2f}ms p90={pick(0.9):.2f}ms "
                f"p99={pick(0.99):.2f}ms max={ordered[-1] * 1000:.2f}ms sum={sum(ordered):.2f}s")

    def report() -> None:
        with open(os.environ.get("BENCH_LOOP_LOG", "/tmp/bench-loop.log"), "a") as out:
            out.write(f"batches {quantiles(timer.batches)}\nio waits {quantiles(timer.waits)}\n")
            by_total = sorted(timer.steps.items(), key=lambda kv: -sum(kv[1]))
            for name, values in by_total[:25]:
                out.write(f"  {quantiles(values)}  {name}\n")

    original_run = trio.run

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("instruments", [timer])
        try:
            return original_run(*args, **kwargs)
        finally:
            report()

    trio.run = run  # type: ignore[assignment]


def main() -> None:
    if "switch" in PATCHES:
        sys.setswitchinterval(0.001)
    if "nootel" in PATCHES:
        os.environ["OTEL_SDK_DISABLED"] = "true"
    if "timing" in PATCHES:
        _patch_timing()
    if "loop" in PATCHES:
        _patch_loop()
    if "nosync" in PATCHES:
        _patch_nosync()
    if "nice" in PATCHES:
        _patch_nice()
    from uploader.__main__ import main as service_main

    service_main()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
