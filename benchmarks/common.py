"""Shared pieces: paths, sizes, workloads, the service's defaults, readings from /proc."""
# ruff: noqa: RUF001
# (the multiplication signs and dashes in labels and tables are meant)

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
WORK_DIR = BENCH_DIR / "work"  # git-ignored scratch space

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# What the service is told; every other setting keeps its default.
POLL_INTERVAL_S = 0.2
MIN_FILE_AGE_S = 0.5
SESSION = "bench"
CONTAINER = "bench"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    count: int
    size: int

    @property
    def total_bytes(self) -> int:
        return self.count * self.size


FULL_WORKLOADS = (
    Workload("w1", "2,000 files × 64 KiB", 2000, 64 * KiB),
    Workload("w2", "8 files × 256 MiB", 8, 256 * MiB),
    Workload("w3", "1 file × 2 GiB", 1, 2 * GiB),
)
QUICK_WORKLOADS = (
    Workload("w1", "200 files × 64 KiB", 200, 64 * KiB),
    Workload("w2", "4 files × 32 MiB", 4, 32 * MiB),
    Workload("w3", "1 file × 256 MiB", 1, 256 * MiB),
)


@dataclass(frozen=True)
class Defaults:
    """The service's defaults that the baselines copy (read from uploader.config.Settings)."""

    worker_concurrency: int
    block_size: int
    single_put_size: int
    max_concurrency: int

    @classmethod
    def from_settings(cls) -> Defaults:
        from uploader.config import Settings

        fields = Settings.model_fields
        return cls(
            worker_concurrency=int(fields["worker_concurrency"].default),
            block_size=int(fields["azure_max_block_size"].default),
            single_put_size=int(fields["azure_max_single_put_size"].default),
            max_concurrency=int(fields["azure_max_concurrency"].default),
        )


# ----- /proc ------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    """A 'kB' line of /proc/<pid>/status (VmRSS, VmHWM), in KiB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----- numbers ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
