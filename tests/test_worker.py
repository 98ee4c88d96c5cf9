"""The pipeline in-process, against a real Azurite: races with GC inside one file's journey."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from azure.storage.blob import ContainerClient

from tests.support.azurite import Azurite
from tests.support.service import random_bytes
from uploader import fileops, gc
from uploader.blobstore import BlobStore, open_blob_store
from uploader.config import Settings
from uploader.layout import FileKey, Layout, blob_name
from uploader.progress import Progress
from uploader.service import make_lanes
from uploader.telemetry import Metrics
from uploader.worker import Pipeline, WorkItem


@pytest.fixture
def settings(azurite: Azurite, container_name: str, tmp_path: Path) -> Settings:
    return Settings(
        azure_auth="key",
        azure_connection_string=azurite.connection_string(),
        azure_container=container_name,
        azure_retry_total=0,
        nfs_incoming_dir=tmp_path / "in",
        nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "stage",
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[BlobStore]:
    store = await open_blob_store(settings, make_lanes(settings))
    yield store
    store.close()


async def test_a_gc_sweep_during_a_claim_keeps_the_copy_being_staged(
    settings: Settings, store: BlobStore, container: ContainerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = Layout(settings.nfs_incoming_dir, settings.nfs_processing_root, settings.local_staging_root)
    progress = Progress()
    key = FileKey("20240102", "s", "a.bin")
    data = random_bytes(1000, seed=1)
    source = layout.incoming_path(key)
    source.parent.mkdir(parents=True)
    source.write_bytes(data)
    real_claim_and_stage = fileops.claim_and_stage
    sweeps: list[gc.Sweep] = []

    def claim_and_stage_then_sweep(*args: Any) -> fileops.Claimed:
        # The claim has made the staging copy and is not back on the Trio thread yet: the
        # moment a GC sweep, in a thread of its own, can come by.
        claimed = real_claim_and_stage(*args)
        sweeps.append(gc.sweep(layout, progress))
        return claimed

    monkeypatch.setattr(fileops, "claim_and_stage", claim_and_stage_then_sweep)
    real_finish = fileops.finish
    finished = trio.Event()

    def finish_and_tell(*args: Any) -> list[str]:
        problems = real_finish(*args)
        trio.from_thread.run_sync(finished.set)
        return problems

    monkeypatch.setattr(fileops, "finish", finish_and_tell)
    send, receive = trio.open_memory_channel[WorkItem](10)
    pipeline = Pipeline(
        settings=settings, layout=layout, lanes=store.lanes, store=store, progress=progress,
        metrics=Metrics.create(), retry_send=send.clone(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        stat = source.stat()
        await send.send(WorkItem(key, claimed=False, expected=(stat.st_size, stat.st_mtime_ns)))
        with trio.fail_after(20):
            await finished.wait()
        nursery.cancel_scope.cancel()

    assert sweeps and sweeps[0].counts["staging"] == 0
    assert progress.files_failed == 0  # counted before any retry, so before `finished`
    assert container.download_blob(blob_name(key)).readall() == data


async def test_a_claim_that_must_wait_is_logged_once_not_at_every_offer(
    settings: Settings, store: BlobStore, container: ContainerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="uploader.worker")
    layout = Layout(settings.nfs_incoming_dir, settings.nfs_processing_root, settings.local_staging_root)
    key = FileKey("20240102", "s", "a/b.bin")
    source = layout.incoming_path(key)
    source.parent.mkdir(parents=True)
    source.write_bytes(b"below a name in flight")
    in_flight = layout.processing_path(FileKey("20240102", "s", "a"))
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"older file a, still going up")
    settled = trio.Semaphore(0)
    send, receive = trio.open_memory_channel[WorkItem](10)
    pipeline = Pipeline(
        settings=settings, layout=layout, lanes=store.lanes, store=store, progress=Progress(),
        metrics=Metrics.create(), retry_send=send.clone(),
    )

    def offer() -> WorkItem:
        stat = source.stat()
        return WorkItem(key, claimed=False, expected=(stat.st_size, stat.st_mtime_ns),
                        on_claim_settled=lambda failed: settled.release())

    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for _ in range(3):  # three polls while "a" is in flight
            await send.send(offer())
            with trio.fail_after(10):
                await settled.acquire()
        in_flight.unlink()  # "a" is done
        await send.send(offer())
        with trio.fail_after(20):
            while not container.get_blob_client(blob_name(key)).exists():  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()

    waits = [r for r in caplog.records if r.getMessage().startswith("not claiming")]
    assert len(waits) == 1


async def test_a_file_whose_failure_handling_hit_a_bug_is_left_for_gc_to_queue_again(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = Layout(settings.nfs_incoming_dir, settings.nfs_processing_root, settings.local_staging_root)
    progress = Progress()
    key = FileKey("20240102", "s", "a.bin")
    source = layout.incoming_path(key)
    source.parent.mkdir(parents=True)
    source.write_bytes(b"x" * 100)
    handled = trio.Event()

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("storage went away")

    async def buggy_failure_handling(item: WorkItem, exc: Exception) -> None:
        handled.set()
        raise RuntimeError("a bug")

    send, receive = trio.open_memory_channel[WorkItem](10)
    pipeline = Pipeline(
        settings=settings, layout=layout, lanes=store.lanes, store=store, progress=progress,
        metrics=Metrics.create(), retry_send=send.clone(),
    )
    monkeypatch.setattr(store, "upload", refused)
    monkeypatch.setattr(pipeline, "_failed", buggy_failure_handling)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        stat = source.stat()
        await send.send(WorkItem(key, claimed=False, expected=(stat.st_size, stat.st_mtime_ns)))
        with trio.fail_after(10):
            await handled.wait()
        await trio.testing.wait_all_tasks_blocked()
        unowned = await trio.to_thread.run_sync(gc.sweep, layout, progress)
        nursery.cancel_scope.cancel()

    assert layout.processing_path(key).exists()
    assert unowned.unowned == {key}  # GC queues it again (after a second sweep agrees)
