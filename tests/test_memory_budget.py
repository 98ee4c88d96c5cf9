"""Upload buffers against the container's memory limit (memory_budget.py): settings that
cannot fit are refused at start-up, not found out by the kernel's OOM killer."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_startup_folders import run_service
from uploader.config import Settings
from uploader.memory_budget import BASELINE_BYTES, MiB, memory_limit, over_limit, upload_buffers


def settings(**values: object) -> Settings:
    return Settings(azure_auth="key", azure_connection_string="UseDevelopmentStorage=true",
                    azure_container="ok-container", **values)  # type: ignore[arg-type]


def test_the_defaults_allow_four_workers_of_five_blocks() -> None:
    assert upload_buffers(settings()) == 4 * 8 * MiB * 5


def test_a_file_sent_in_one_request_is_held_whole() -> None:
    assert upload_buffers(settings(azure_max_single_put_size=256 * MiB, worker_concurrency=2)) == 512 * MiB


def test_settings_that_fit_or_no_limit_say_nothing() -> None:
    assert over_limit(settings(), None) is None
    assert over_limit(settings(), 1024 * MiB) is None


def test_settings_over_the_limit_name_the_variables_and_the_sizes() -> None:
    problem = over_limit(settings(azure_max_single_put_size=256 * MiB), 1024 * MiB)
    assert problem is not None
    for variable in ("APP_WORKER_CONCURRENCY", "APP_AZURE_MAX_SINGLE_PUT_SIZE", "APP_AZURE_MAX_BLOCK_SIZE",
                     "APP_AZURE_MAX_CONCURRENCY"):
        assert variable in problem
    assert "1024 MiB of upload buffers" in problem and "memory limit of 1024 MiB" in problem


def test_the_baseline_counts_towards_the_limit() -> None:
    needed = upload_buffers(settings())
    assert over_limit(settings(), needed + BASELINE_BYTES) is None
    assert over_limit(settings(), needed + BASELINE_BYTES - 1) is not None


def test_the_lowest_limit_of_the_cgroup_and_its_parents_counts_v2(tmp_path: Path) -> None:
    (tmp_path / "kubepods" / "pod1" / "c").mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "kubepods" / "memory.max").write_text("max\n")
    (tmp_path / "kubepods" / "pod1" / "memory.max").write_text(f"{512 * MiB}\n")
    (tmp_path / "kubepods" / "pod1" / "c" / "memory.max").write_text(f"{1024 * MiB}\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/kubepods/pod1/c\n")
    assert memory_limit(cgroup, tmp_path) == 512 * MiB


def test_v1s_memory_controller_is_read_and_its_no_limit_is_none(tmp_path: Path) -> None:
    (tmp_path / "memory" / "docker" / "x").mkdir(parents=True)
    (tmp_path / "memory" / "docker" / "x" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("5:cpu,cpuacct:/docker/x\n4:memory:/docker/x\n0::/\n")
    assert memory_limit(cgroup, tmp_path) is None
    (tmp_path / "memory" / "docker" / "x" / "memory.limit_in_bytes").write_text(f"{300 * MiB}\n")
    assert memory_limit(cgroup, tmp_path) == 300 * MiB


def test_no_cgroup_file_is_no_limit(tmp_path: Path) -> None:
    assert memory_limit(tmp_path / "missing", tmp_path) is None


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A real memory cgroup of 256 MiB this test may put a process in (as root)."""
    for parent, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                               (Path("/sys/fs/cgroup"), "memory.max")):
        folder = parent / f"uploader-test-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            (folder / limit_file).write_text(str(256 * MiB))
        except OSError:
            folder.rmdir()
            continue
        try:
            yield folder
        finally:
            folder.rmdir()
        return
    pytest.skip("no memory cgroup can be made here (needs root and a writable cgroup file system)")


def test_the_service_in_a_container_too_small_for_its_settings_stops_with_one_line(
    memory_cgroup: Path, tmp_path: Path
) -> None:
    procs = memory_cgroup / "cgroup.procs"
    result = run_service(
        {
            "APP_NFS_INCOMING_DIR": str(tmp_path / "in"),
            "APP_NFS_PROCESSING_ROOT": str(tmp_path / "proc"),
            "APP_LOCAL_STAGING_ROOT": str(tmp_path / "staging"),
            "APP_AZURE_MAX_SINGLE_PUT_SIZE": str(64 * MiB),
        },
        prefix=["sh", "-c", f'echo $$ > "{procs}" && exec "$0" "$@"'],
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("uploader: bad setting: APP_WORKER_CONCURRENCY x max(APP_AZURE_MAX_SINGLE_PUT_SIZE")
    assert "memory limit of 256 MiB" in line
    assert not any(os.path.exists(tmp_path / name) for name in ("in", "proc", "staging"))
