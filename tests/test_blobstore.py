"""The blob store against a real Azurite, in-process: verified, resumable uploads."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient, ContainerClient

from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite
from tests.support.service import random_bytes
from uploader import blobstore
from uploader.blobstore import BlobStore, block_id, open_blob_store
from uploader.config import Settings
from uploader.errors import (
    BlocksMissing,
    Disposition,
    IntegrityError,
    SourceChanged,
    StartupError,
    classify,
)
from uploader.fileops import StagedFile, stage_copy
from uploader.service import make_lanes

KiB = 1024


@pytest.fixture
async def store(azurite: Azurite, container_name: str, tmp_path: Path) -> AsyncIterator[BlobStore]:
    settings = Settings(
        azure_auth="key",
        azure_connection_string=azurite.connection_string(),
        azure_container=container_name,
        azure_max_block_size=64 * KiB,
        azure_max_single_put_size=100 * KiB,
        azure_retry_total=0,
        nfs_incoming_dir=tmp_path / "in",
        nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "stage",
    )
    store = await open_blob_store(settings, make_lanes(settings))
    yield store
    store.close()


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def staged_file(tmp_path: Path, data: bytes, name: str = "f.bin") -> StagedFile:
    source = tmp_path / "proc" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    return stage_copy(source, tmp_path / "stage" / name, 64 * KiB)


@pytest.mark.parametrize("size", [0, 1, 100 * KiB, 100 * KiB + 1, 64 * KiB * 5 + 3])
async def test_uploads_are_byte_identical_with_their_md5_stored(
    store: BlobStore, container: ContainerClient, tmp_path: Path, size: int
) -> None:
    data = random_bytes(size, seed=size)
    staged = staged_file(tmp_path, data)
    report = await store.upload(staged, "d/s/f.bin")
    blob = container.get_blob_client("d/s/f.bin")
    assert blob.download_blob().readall() == data
    stored = blob.get_blob_properties().content_settings.content_md5
    assert bytes(stored) == hashlib.md5(data).digest()
    assert report.bytes_sent == size and report.bytes_resumed == 0


async def test_a_staging_copy_changed_after_hashing_is_refused_by_storage(
    store: BlobStore, container: ContainerClient, tmp_path: Path
) -> None:
    for size in (50 * KiB, 300 * KiB):  # one Put Blob; blocks
        staged = staged_file(tmp_path, random_bytes(size, seed=1), name=f"{size}.bin")
        overwrite(staged.path, size // 2, b"\x00corrupt\x00")
        with pytest.raises(IntegrityError):
            await store.upload(staged, f"d/s/{size}.bin")
        assert not container.get_blob_client(f"d/s/{size}.bin").exists()


async def test_blocks_already_staged_are_not_sent_again(
    store: BlobStore, container: ContainerClient, tmp_path: Path
) -> None:
    data = random_bytes(64 * KiB * 6, seed=2)
    staged = staged_file(tmp_path, data)
    blob = container.get_blob_client("d/s/f.bin")
    for index in (0, 1, 2, 4):  # as a run that was killed half way left them
        chunk = data[index * 64 * KiB : (index + 1) * 64 * KiB]
        blob.stage_block(block_id(index, staged.block_md5s[index]), chunk)
    report = await store.upload(staged, "d/s/f.bin")
    assert report.bytes_resumed == 4 * 64 * KiB
    assert report.bytes_sent == 2 * 64 * KiB
    assert blob.download_blob().readall() == data


async def test_a_staged_block_of_the_wrong_size_is_sent_again(
    store: BlobStore, container: ContainerClient, tmp_path: Path
) -> None:
    data = random_bytes(64 * KiB * 3, seed=3)
    staged = staged_file(tmp_path, data)
    blob = container.get_blob_client("d/s/f.bin")
    blob.stage_block(block_id(0, staged.block_md5s[0]), data[: 64 * KiB - 1])
    report = await store.upload(staged, "d/s/f.bin")
    assert report.bytes_resumed == 0
    assert blob.download_blob().readall() == data


async def test_blocks_lost_before_the_commit_fail_the_attempt_retryably_and_go_again(
    store: BlobStore, container: ContainerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(64 * KiB * 3, seed=4)
    staged = staged_file(tmp_path, data)
    blob = container.get_blob_client("d/s/f.bin")
    commit = BlobStore._commit

    async def lose_blocks_then_commit(self: BlobStore, client: BlobClient, staged: StagedFile) -> None:
        # Storage loses the blocks just sent, as an emulator that restarts in the middle of
        # the upload does (another file's upload then finds the container gone and makes it
        # again).
        container.delete_container()
        container.create_container()
        await commit(self, client, staged)

    monkeypatch.setattr(BlobStore, "_commit", lose_blocks_then_commit)
    with pytest.raises(BlocksMissing) as failed:
        await store.upload(staged, "d/s/f.bin")
    assert classify(failed.value) is Disposition.RETRYABLE
    monkeypatch.undo()
    report = await store.upload(staged, "d/s/f.bin")
    assert report.bytes_sent == len(data)
    assert blob.download_blob().readall() == data


async def test_a_failed_copy_is_the_cause_not_the_blocks_its_cleanup_removed(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "proc" / "big.bin"
    source.parent.mkdir(parents=True)
    source.write_bytes(random_bytes(64 * KiB * 4 + 1, seed=5))
    real_copy, real_read = blobstore.stage_copy, blobstore.read_block

    def copy_then_find_it_changed(source: Path, target: Path, *args: Any, **kwargs: Any) -> StagedFile:
        real_copy(source, target, *args, **kwargs)
        target.unlink()  # what stage_copy does when the file changed under it
        time.sleep(0.5)  # the senders find the copy gone first
        raise SourceChanged(f"{source} changed while it was copied to staging")

    def read_late(*args: Any) -> bytes:
        time.sleep(0.1)
        return real_read(*args)

    monkeypatch.setattr(blobstore, "stage_copy", copy_then_find_it_changed)
    monkeypatch.setattr(blobstore, "read_block", read_late)
    with pytest.raises(SourceChanged):
        await store.upload_while_staging(source, tmp_path / "stage" / "big.bin", "d/s/big.bin")


async def test_a_probe_storage_answers_only_late_says_it_does_not_work(
    azurite: Azurite, container_name: str, tmp_path: Path, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answered as a hang ends, a probe would call storage working at the moment a file's
    request timed out in that hang."""
    monkeypatch.setattr(blobstore, "PROBE_TIMEOUT_S", 0.3)
    settings = Settings(
        azure_auth="key", azure_connection_string=azurite.connection_string(port=proxy.port),
        azure_container=container_name, azure_retry_total=0,
        nfs_incoming_dir=tmp_path / "in", nfs_processing_root=tmp_path / "proc", local_staging_root=tmp_path / "stage",
    )
    store = await open_blob_store(settings, make_lanes(settings))
    try:
        proxy.stall(target=blobstore.PROBE_BLOB, times=1, seconds=1.0)
        assert await store.probe() is False
        assert await store.probe() is True  # the hang over
    finally:
        store.close()


async def test_the_probe_writes_nothing_visible(store: BlobStore, container: ContainerClient) -> None:
    assert await store.probe() is True
    assert list(container.list_blobs()) == []


async def test_an_endpoint_without_its_scheme_that_speaks_plain_http_is_named_as_such(
    azurite: Azurite, container_name: str, tmp_path: Path,
) -> None:
    """The SDK takes a BlobEndpoint without a scheme for https."""
    settings = Settings(
        azure_auth="key",
        azure_connection_string=azurite.connection_string().replace(f"{azurite.scheme}://", ""),
        azure_container=container_name,
        azure_retry_total=0,
        nfs_incoming_dir=tmp_path / "in",
        nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "stage",
    )
    with pytest.raises(StartupError) as info:
        await open_blob_store(settings, make_lanes(settings))
    assert str(info.value).startswith(f"cannot reach Azure Blob Storage at https://{azurite.host}:{azurite.port}/")
    assert str(info.value).endswith("(it does not answer in TLS: if it speaks plain HTTP, write http:// in its URL)")
