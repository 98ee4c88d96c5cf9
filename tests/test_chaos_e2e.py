"""Chaos: hundreds of files, random faults on NFS and in storage, and SIGKILL restarts.

At the end every file must be in blob storage byte-identical, nothing left on NFS or in
staging, and nothing quarantined.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.faultfs import FaultFS, FaultFSError
from tests.faults.proxy import PUT_BLOCK, PUT_BLOCK_LIST, FaultProxy
from tests.support.azurite import Azurite
from tests.support.service import Folders, ServiceProcess, wait_for, write_file
from tests.test_upload_e2e import today

pytestmark = [pytest.mark.fuse, pytest.mark.slow]
KiB = 1024
MiB = 1024 * KiB
SESSION = "chaos"
NFS_OPS = ["open", "read", "readdir", "link", "unlink", "rename", "getattr", "mkdir", "create", "write"]
NFS_ERRORS = ["EIO", "ESTALE", "EACCES", "ENOENT"]


def sizes(rng: random.Random, count: int) -> list[int]:
    """Mostly small files, some medium, a few large ones that go up in blocks."""
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.70:
            out.append(rng.randrange(0, 64 * KiB))
        elif kind < 0.95:
            out.append(rng.randrange(64 * KiB, 3 * MiB))
        else:
            out.append(rng.randrange(2 * MiB, 6 * MiB))
    return out


class Chaos:
    """Injects a random fault every few hundred milliseconds until stopped."""

    def __init__(self, rng: random.Random, faultfs: FaultFS, proxy: FaultProxy) -> None:
        self.rng = rng
        self.faultfs = faultfs
        self.proxy = proxy
        self.injected: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.faultfs.clear()
        self.proxy.clear()

    def _run(self) -> None:
        rng = self.rng
        actions: list[Callable[[], str]] = [
            self._nfs_error, self._nfs_error, self._nfs_hang,
            self._storage_error, self._storage_reset, self._storage_stall,
        ]
        while not self._stop.wait(rng.uniform(0.2, 0.6)):
            try:
                self.injected[rng.choice(actions)()] += 1
            except Exception as exc:  # the harness must outlive a restart of the service
                self.injected[f"harness error {type(exc).__name__}"] += 1

    def _nfs_error(self) -> str:
        op, error = self.rng.choice(NFS_OPS), self.rng.choice(NFS_ERRORS)
        where = self.rng.choice(["incoming/chaos/*", ".processing/*", "*"])
        self.faultfs.fail(op, where, error, times=self.rng.randint(1, 2))
        return f"nfs {op} {error}"

    def _nfs_hang(self) -> str:
        op = self.rng.choice(["read", "readdir", "open", "getattr"])
        rule = self.faultfs.hang(op, self.rng.choice(["incoming/chaos*", ".processing/*"]))
        threading.Timer(self.rng.uniform(0.2, 1.5), self._release, (rule,)).start()
        return f"nfs hang {op}"

    def _release(self, rule: int) -> None:
        # The rule may be gone already: cleared with all the others, at a restart or the end.
        with contextlib.suppress(FaultFSError):
            self.faultfs.release(rule)

    def _storage_error(self) -> str:
        status = self.rng.choice([500, 503])
        target = self.rng.choice([None, PUT_BLOCK, PUT_BLOCK_LIST])
        self.proxy.error(status, method="PUT", target=target, times=self.rng.randint(1, 3))
        return f"storage {status}"

    def _storage_reset(self) -> str:
        self.proxy.reset_mid_body(self.rng.randrange(0, 256 * KiB), method="PUT", times=1)
        return "storage reset"

    def _storage_stall(self) -> str:
        self.proxy.stall(method="PUT", times=1, seconds=self.rng.uniform(0.5, 3))
        return "storage stall"


def test_chaos_with_restarts_loses_nothing(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy, faultfs: FaultFS,
    fuse_folders: Folders, container: ContainerClient,
) -> None:
    folders = fuse_folders
    rng = random.Random(20261129)
    service: ServiceProcess = service_factory(
        folders=folders,
        connection_string=azurite.connection_string(port=proxy.port),
        APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
        APP_AZURE_MAX_SINGLE_PUT_SIZE=str(MiB),
        APP_AZURE_READ_TIMEOUT_S="2",
        APP_AZURE_CONNECT_TIMEOUT_S="2",
        APP_MAX_ATTEMPTS="8",
        APP_NFS_OP_TIMEOUT_S="3",
    )
    service.start_session(SESSION)
    expected: dict[str, str] = {}
    total_bytes = 0

    def drop_wave(count: int, wave: int) -> None:
        nonlocal total_bytes
        for i, size in enumerate(sizes(rng, count)):
            rel = f"w{wave}/f{i:03d}.bin" if i % 7 == 0 else f"w{wave}-f{i:03d}.bin"
            data = write_file(folders.session(SESSION) / rel, size, seed=wave * 1000 + i)
            expected[f"{today()}/{SESSION}/{rel}"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
            total_bytes += size

    chaos = Chaos(rng, faultfs, proxy)
    chaos.start()
    kills = 0
    try:
        for wave in range(4):
            drop_wave(60, wave)
            # Let part of the wave go up under fire, then kill the process mid-flight.
            target = len(expected) - 40
            wait_for(lambda target=target: uploaded(container) >= target, timeout=180, interval=0.5,
                     what=f"wave {wave} to be under way")
            if wave < 3:
                service.kill()
                kills += 1
                service.restart(timeout=120)  # recovery retries while the share misbehaves
    finally:
        chaos.stop()

    wait_for(lambda: uploaded(container) >= len(expected), timeout=300, interval=0.5,
             what="every file in storage")
    wait_for(lambda: not folders.files_on_nfs() and not folders.files_in_staging(), timeout=60,
             what="NFS and staging to be clean")
    actual = {
        b.name: bytes(b.content_settings.content_md5 or b"").hex()
        for b in container.list_blobs()
        if not b.name.startswith(".")
    }
    assert actual == expected
    for name in rng.sample(sorted(expected), 20):  # the stored MD5 is ours: check real bytes too
        data = container.download_blob(name).readall()
        assert hashlib.md5(data, usedforsecurity=False).hexdigest() == expected[name]
    status = service.status()
    assert status["files_quarantined"] == 0
    print(
        f"\nchaos: {len(expected)} files, {total_bytes / MiB:.1f} MiB, {kills} SIGKILL restarts, "
        f"{sum(chaos.injected.values())} faults injected: {dict(sorted(chaos.injected.items()))}; "
        f"proxy faults {dict(proxy.stats().faults)}; faultfs faults {faultfs.stats()['faults']}; "
        f"last run: failed attempts {status['files_failed']}, retried {status['files_retried']}, "
        f"processed {status['files_processed']}, resumed {status['bytes_resumed'] / MiB:.1f} MiB"
    )


def uploaded(container: ContainerClient) -> int:
    if not container.exists():
        return 0
    return sum(1 for b in container.list_blobs() if not b.name.startswith("."))
