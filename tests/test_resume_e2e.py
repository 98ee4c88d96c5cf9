"""Resumable large uploads, and no clobbering of a file that is still in flight."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite
from tests.support.service import Folders, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean

MiB = 1024 * 1024
GiB = 1024 * MiB


def write_large(path: os.PathLike[str], size: int) -> str:
    """Write ``size`` random bytes in chunks; returns their MD5 (hex)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            chunk = os.urandom(16 * MiB)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def blob_md5(container: ContainerClient, name: str) -> tuple[int, str]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    for chunk in container.download_blob(name).chunks():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@pytest.mark.slow
def test_a_1_gib_upload_killed_half_way_resumes_from_the_staged_blocks(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = service_factory(connection_string=azurite.connection_string(port=proxy.port))
    service.start_session("huge")
    folders.session("huge").mkdir(parents=True, exist_ok=True)
    md5 = write_large(folders.session("huge") / "one.gib", GiB)
    wait_for(lambda: proxy.stats().bytes_up >= GiB // 2, timeout=300, interval=0.01,
             what="half of the file to reach storage")
    service.kill()
    sent_before = proxy.stats().bytes_up
    proxy.reset_stats()

    service.restart()
    name = f"{today()}/huge/one.gib"
    wait_for(lambda: container.get_blob_client(name).exists(), timeout=300, interval=0.2,
             what="the resumed blob")
    resent = proxy.stats().bytes_up
    print(f"\nbefore the kill: {sent_before / MiB:.0f} MiB sent; after: {resent / MiB:.0f} MiB "
          f"({resent / GiB:.0%} of the file)")
    assert resent < 0.6 * GiB
    assert blob_md5(container, name) == (GiB, md5)
    status = service.status()
    assert status["bytes_resumed"] >= 0.4 * GiB
    wait_until_clean(folders, timeout=60)


def test_a_new_file_with_the_name_of_one_in_flight_goes_up_after_it(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = service_factory(connection_string=azurite.connection_string(port=proxy.port))
    service.start_session("clobber")
    held = proxy.stall(method="PUT", target="clobber/same.bin", times=1)
    first = write_file(folders.session("clobber") / "same.bin", 50_000, seed=1)
    proxy.wait_stalled(held, timeout=30)
    # The first version is claimed and on its way up: a second one arrives under its name.
    second = write_file(folders.session("clobber") / "same.bin", 60_000, seed=2)
    in_flight = folders.processing / today() / "clobber" / "same.bin"
    time.sleep(1.0)  # many scans: the newer version must stay in incoming meanwhile
    assert in_flight.read_bytes() == first
    assert (folders.session("clobber") / "same.bin").read_bytes() == second
    proxy.release(held)
    name = f"{today()}/clobber/same.bin"
    wait_for(lambda: service.status()["files_processed"] == 2, timeout=60, what="both versions")
    assert wait_for_blobs(container, {name})[name] == second
    wait_until_clean(folders)
