"""Whether the upload buffers the settings allow fit in the container's memory limit.

Each worker holds a file sent in one request whole in memory (up to
APP_AZURE_MAX_SINGLE_PUT_SIZE), or, for a larger file, APP_AZURE_MAX_CONCURRENCY blocks in
flight plus the one being copied to staging. Settings whose worst case is over the
container's memory limit would run until the first burst of large files, then be killed
for memory over and over (Kubernetes restarts it, the burst is still there): refused at
start-up instead, naming the settings.
"""

from __future__ import annotations

from pathlib import Path

from uploader.config import Settings

MiB = 1024 * 1024
# What the service needs besides upload buffers (interpreter, SDKs, telemetry, many
# sessions' state, malloc's slack): peak RSS less buffers was 85-155 MiB in the benchmarks
# (benchmarks/RESULTS.md).
BASELINE_BYTES = 160 * MiB
# cgroup v1 says "no limit" with a number near 2**63 rounded to pages.
NO_LIMIT_ABOVE = 1 << 60


def upload_buffers(settings: Settings) -> int:
    """The most memory the workers' upload buffers can hold at once."""
    per_worker = max(
        settings.azure_max_single_put_size,
        settings.azure_max_block_size * (settings.azure_max_concurrency + 1),
    )
    return settings.worker_concurrency * per_worker


def memory_limit(
    cgroup_of_process: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The lowest memory limit of this process's cgroup and its parents (cgroup v2, or v1's
    memory controller), in bytes; None without one."""
    try:
        lines = cgroup_of_process.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            mount, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = mount / path.lstrip("/")
        for each in (folder, *folder.parents):
            limits.extend(_limit_in(each / name))
            if each == mount:
                break
    return min(limits, default=None)


def _limit_in(path: Path) -> list[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return []
    if not text.isdigit() or int(text) >= NO_LIMIT_ABOVE:  # ("max": none)
        return []
    return [int(text)]


def over_limit(settings: Settings, limit: int | None) -> str | None:
    """Why the settings cannot fit in ``limit`` bytes, as one sentence; None if they fit."""
    if limit is None:
        return None
    needed = upload_buffers(settings)
    if needed + BASELINE_BYTES <= limit:
        return None
    return (
        "APP_WORKER_CONCURRENCY x max(APP_AZURE_MAX_SINGLE_PUT_SIZE, APP_AZURE_MAX_BLOCK_SIZE x "
        f"(APP_AZURE_MAX_CONCURRENCY + 1)) allows {needed // MiB} MiB of upload buffers, which with "
        f"{BASELINE_BYTES // MiB} MiB for the rest is more than this container's memory limit of "
        f"{limit // MiB} MiB: lower them, or raise the limit"
    )
