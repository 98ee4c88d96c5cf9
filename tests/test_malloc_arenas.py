"""The service caps glibc's malloc arenas: threads allocating at once share two."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.support.service import REPO_ROOT, clean_environment

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="arenas are glibc's (malloc_stats)"
)

# Eight threads allocate at once (objects over pymalloc's 512 bytes go to malloc), then
# glibc's malloc_stats() prints one "Arena N:" block per arena on stderr.
ALLOCATE_IN_THREADS = """
import ctypes, sys, threading
from uploader.__main__ import limit_malloc_arenas
if sys.argv[1] == "capped":
    limit_malloc_arenas()
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()
    kept = [bytes(1000) + bytes([i % 256]) for i in range(20000)]
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(mode: str) -> int:
    env = {k: v for k, v in clean_environment().items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATE_IN_THREADS, mode],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_threads_allocating_at_once_share_two_arenas() -> None:
    assert arenas("uncapped") > 2  # what the cap is for, on this machine
    assert arenas("capped") == 2
