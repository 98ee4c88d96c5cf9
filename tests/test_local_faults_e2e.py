"""Faults of the pod's own disk (the staging folder), against the real process."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.faultfs import FaultFS
from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite, blob_contents
from tests.support.service import Folders, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean

MiB = 1024 * 1024


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``: a staging disk that can really fill up."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def test_a_full_staging_disk_quarantines_nothing_and_everything_goes_up_once_space_returns(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    with small_disk(folders.staging, "1m") as staging:
        service = service_factory(
            APP_MAX_ATTEMPTS="2", APP_RETRY_BACKOFF_S="0.2", APP_RETRY_BACKOFF_MAX_S="0.5"
        )
        filler = staging / "filler"  # another's file: the service empties staging at its start
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:  # until ENOSPC
                f.write(b"\0" * 65536)
                f.flush()
        service.start_session("full")
        expected = {
            f"{today()}/full/{name}": write_file(folders.session("full") / name, 200_000, seed=i)
            for i, name in enumerate(["a.bin", "b.bin", "c.bin"])
        }
        # Every file fails well past APP_MAX_ATTEMPTS while the disk is full...
        wait_for(lambda: service.status()["files_failed"] >= 12, timeout=60, what="failed attempts")
        status = service.status()
        assert status["files_quarantined"] == 0
        assert "ENOSPC" in status["last_error"]
        # ...and goes up once there is room again.
        filler.unlink()
        assert wait_for_blobs(container, set(expected)) == expected
        wait_until_clean(folders)
        assert service.status()["files_quarantined"] == 0


def test_a_file_larger_than_the_staging_disk_is_quarantined_and_the_others_go_up(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    with small_disk(folders.staging, "2m"):
        service = service_factory(
            APP_MAX_ATTEMPTS="2", APP_RETRY_BACKOFF_S="0.2", APP_RETRY_BACKOFF_MAX_S="0.5"
        )
        service.start_session("big")
        huge = write_file(folders.session("big") / "huge.bin", 3 * 1024 * 1024, seed=9)
        expected = {
            f"{today()}/big/{name}": write_file(folders.session("big") / name, 100_000, seed=i)
            for i, name in enumerate(["a.bin", "b.bin"])
        }
        wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=60,
                 what="the quarantine of the file that can never fit")
        assert wait_for_blobs(container, set(expected)) == expected
        quarantined = service.status()["quarantined"][0]
        assert quarantined["file"] == "huge.bin" and "ENOSPC" in quarantined["reason"]
        assert "larger than the whole staging disk" in quarantined["reason"]
        assert quarantined["attempts"] == 1  # no number of attempts could make room for it
        failed = folders.processing / ".failed" / "files" / today() / "big" / "huge.bin"
        assert failed.read_bytes() == huge


def test_a_staging_budget_makes_copies_wait_and_quarantines_a_file_larger_than_it(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient,
    azurite: Azurite, proxy: FaultProxy,
) -> None:
    """APP_LOCAL_STAGING_MAX_BYTES, where the disk cannot tell (an emptyDir's sizeLimit): the
    staging folder, on a roomy disk here, never holds more, though storage is slower than the
    copies (staged files wait for their uploads), and a file that could never fit is
    quarantined before a byte of it is copied."""
    budget = 4 * MiB  # the least it may be with 1 MiB blocks
    service = service_factory(
        connection_string=azurite.connection_string(port=proxy.port),
        APP_LOCAL_STAGING_MAX_BYTES=str(budget), APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
        APP_AZURE_MAX_SINGLE_PUT_SIZE=str(MiB),
    )
    proxy.latency(0.5)
    service.start_session("budget")
    huge = write_file(folders.session("budget") / "huge.bin", 5 * MiB, seed=9)
    sizes = {**{f"{name}.bin": 3 * MiB for name in "ab"}, **{f"small-{n}.bin": 900_000 for n in range(12)}}
    expected = {
        f"{today()}/budget/{name}": write_file(folders.session("budget") / name, size, seed=i)
        for i, (name, size) in enumerate(sizes.items())
    }
    peak = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(blob_contents(container)) < len(expected):
        peak = max(peak, sum(f.stat().st_size for f in folders.staging.rglob("*") if f.is_file()))
        time.sleep(0.01)
    assert peak <= budget
    assert wait_for_blobs(container, set(expected)) == expected
    wait_for(lambda: service.status()["files_quarantined"] == 1, what="the quarantine of the file that can never fit")
    [quarantined] = service.status()["quarantined"]
    assert quarantined["file"] == "huge.bin" and "APP_LOCAL_STAGING_MAX_BYTES" in quarantined["reason"]
    assert quarantined["attempts"] == 1
    assert (folders.processing / ".failed" / "files" / today() / "budget" / "huge.bin").read_bytes() == huge


def test_a_staging_budget_holds_while_failed_uploads_wait_to_be_retried(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient,
    azurite: Azurite, proxy: FaultProxy,
) -> None:
    """A failed file's copy keeps its room until it is removed: deciding what to do with it
    (is storage down for everyone?) takes a while, and copies waiting for room must wait."""
    budget = 4 * MiB
    service = service_factory(
        connection_string=azurite.connection_string(port=proxy.port),
        APP_LOCAL_STAGING_MAX_BYTES=str(budget), APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
        APP_AZURE_MAX_SINGLE_PUT_SIZE=str(MiB), APP_WORKER_CONCURRENCY="2", APP_MAX_ATTEMPTS="1",
        APP_AZURE_READ_TIMEOUT_S="1", APP_AZURE_RETRY_TOTAL="0", APP_NFS_OP_TIMEOUT_S="3",
        APP_RETRY_BACKOFF_S="0.5", APP_RETRY_BACKOFF_MAX_S="1",
    )
    service.start_session("held")
    stalled = proxy.stall(method="PUT", times=None)  # uploads time out; so does the probe
    expected = {
        f"{today()}/held/f{n}.bin": write_file(folders.session("held") / f"f{n}.bin", 1_000_000, seed=n)
        for n in range(8)
    }
    peak = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        peak = max(peak, sum(f.stat().st_size for f in folders.staging.rglob("*") if f.is_file()))
        time.sleep(0.01)
    assert service.status()["files_failed"] >= 2
    proxy.release(stalled)
    assert peak <= budget
    assert wait_for_blobs(container, set(expected)) == expected


def test_what_an_earlier_run_left_in_staging_is_removed_at_start(
    service_factory: ServiceFactory, folders: Folders
) -> None:
    """Every claimed file is copied again after a restart: a leftover only takes room."""
    leftover = folders.staging / today() / "old" / "half.bin"
    write_file(leftover, 1000)
    theirs = write_file(folders.staging / "notes.txt", 10)  # staging set to a folder in use
    service = service_factory()
    assert not leftover.exists() and not (folders.staging / today()).exists()
    assert "removed 1 copies an earlier run left in staging" in service.log()
    assert (folders.staging / "notes.txt").read_bytes() == theirs
    assert "holds 1 entries that are not the service's ('notes.txt')" in service.log()


def test_a_read_only_staging_disk_quarantines_nothing_and_everything_goes_up_once_writable(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    with small_disk(folders.staging, "16m") as staging:
        service = service_factory(
            APP_MAX_ATTEMPTS="2", APP_RETRY_BACKOFF_S="0.2", APP_RETRY_BACKOFF_MAX_S="0.5"
        )
        subprocess.run(["mount", "-o", "remount,ro", str(staging)], check=True)
        service.start_session("ro")
        expected = {
            f"{today()}/ro/{name}": write_file(folders.session("ro") / name, 100_000, seed=i)
            for i, name in enumerate(["a.bin", "b.bin"])
        }
        # Every file fails well past APP_MAX_ATTEMPTS while the disk refuses writes...
        wait_for(lambda: service.status()["files_failed"] >= 8, timeout=60, what="failed attempts")
        status = service.status()
        assert status["files_quarantined"] == 0
        assert "EROFS" in status["last_error"]
        # ...and goes up once it takes them again.
        subprocess.run(["mount", "-o", "remount,rw", str(staging)], check=True)
        assert wait_for_blobs(container, set(expected)) == expected
        wait_until_clean(folders)
        assert service.status()["files_quarantined"] == 0


@pytest.mark.parametrize("operation", ["write", "fsync"])
def test_a_staging_disk_failing_every_write_quarantines_nothing(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient,
    faultfs: FaultFS, operation: str,
) -> None:
    """An EIO on a write names no file: the failure is still the staging disk's, probed there."""
    service = service_factory(
        APP_LOCAL_STAGING_ROOT=str(faultfs.mountpoint),
        APP_MAX_ATTEMPTS="2", APP_RETRY_BACKOFF_S="0.2", APP_RETRY_BACKOFF_MAX_S="0.5",
    )
    faultfs.fail(operation, "*", errno="EIO", times=None)
    service.start_session("eio")
    expected = {
        f"{today()}/eio/{name}": write_file(folders.session("eio") / name, 100_000, seed=i)
        for i, name in enumerate(["a.bin", "b.bin"])
    }
    wait_for(lambda: service.status()["files_failed"] >= 6, timeout=60, what="failed attempts")
    status = service.status()
    assert status["files_quarantined"] == 0
    assert "EIO" in status["last_error"]
    faultfs.clear()
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert service.status()["files_quarantined"] == 0
    assert not [p for p in faultfs.source.rglob("*") if p.is_file()]
