"""The pipeline in-process, against a real Azurite: races with GC inside one file's journey."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from azure.core.exceptions import (
    ServiceRequestError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.storage.blob import ContainerClient, ContentSettings

from tests.support.azurite import Azurite
from tests.support.service import random_bytes
from uploader import fileops, gc
from uploader.blobstore import BlobStore, open_blob_store
from uploader.config import Settings
from uploader.errors import IntegrityError
from uploader.layout import FileKey, Layout, blob_name
from uploader.progress import Progress
from uploader.service import make_lanes
from uploader.telemetry import Metrics
from uploader.worker import RECHECKS, Pipeline, WorkItem


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
        await send.send(offer(layout, key))
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
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
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

    monkeypatch.setattr(store, "upload", refused)
    monkeypatch.setattr(pipeline, "_failed", buggy_failure_handling)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        with trio.fail_after(10):
            await handled.wait()
        await trio.testing.wait_all_tasks_blocked()
        unowned = await trio.to_thread.run_sync(gc.sweep, layout, progress)
        nursery.cancel_scope.cancel()

    assert layout.processing_path(key).exists()
    assert unowned.unowned == {key}  # GC queues it again (after a second sweep agrees)


def pipeline_for(settings: Settings, store: BlobStore, progress: Progress) -> tuple[
    Layout, Pipeline, trio.MemorySendChannel[WorkItem], trio.MemoryReceiveChannel[WorkItem]
]:
    layout = Layout(settings.nfs_incoming_dir, settings.nfs_processing_root, settings.local_staging_root)
    send, receive = trio.open_memory_channel[WorkItem](10)
    pipeline = Pipeline(
        settings=settings, layout=layout, lanes=store.lanes, store=store, progress=progress,
        metrics=Metrics.create(), retry_send=send.clone(),
    )
    return layout, pipeline, send, receive


def offer(layout: Layout, key: FileKey) -> WorkItem:
    """The watcher's offer of the file at ``key`` in incoming, as it is now."""
    stat = layout.incoming_path(key).stat()
    return WorkItem(key, claimed=False, expected=(stat.st_size, stat.st_mtime_ns))


def with_quick_retries(settings: Settings) -> Settings:
    """Two attempts before a quarantine, and retries at once."""
    return settings.model_copy(update={"max_attempts": 2, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05})


def in_incoming(layout: Layout, *keys: FileKey) -> None:
    for key in keys:
        layout.incoming_path(key).parent.mkdir(parents=True, exist_ok=True)
        layout.incoming_path(key).write_bytes(b"x" * 100)


def probe_works_while(store: BlobStore, monkeypatch: pytest.MonkeyPatch, works: Callable[[], bool]) -> None:
    """Storage's probe goes through, for real, while ``works()``, and fails otherwise."""
    real_probe = store.probe

    async def probe() -> bool:
        return works() and await real_probe()

    monkeypatch.setattr(store, "probe", probe)


def staging_disk_refuses(root: Path, failed: Path | None = None) -> None:
    raise OSError(errno.EROFS, "Read-only file system", str(root))


async def run_until(
    pipeline: Pipeline, send: trio.MemorySendChannel[WorkItem], receive: trio.MemoryReceiveChannel[WorkItem],
    item: WorkItem, done: Callable[[], bool], *, within_s: float = 10,
) -> None:
    """Run the pipeline on ``item`` until ``done()``, then stop it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(item)
        with trio.fail_after(within_s):
            while not done():  # noqa: ASYNC110
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


class RefusedUploads:
    """``store.upload`` refused with an IntegrityError, the first ``times`` times (or always)."""

    def __init__(self, store: BlobStore, monkeypatch: pytest.MonkeyPatch, times: int | None = None) -> None:
        self.count = 0
        real_upload = store.upload

        async def upload(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if times is None or self.count <= times:
                raise IntegrityError("storage computed another MD5")
            return await real_upload(*args, **kwargs)

        monkeypatch.setattr(store, "upload", upload)


class LostUnlinkAnswer:
    """``os.unlink`` of ``path`` done, its first answer EIO: a soft mount that lost it."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_unlink = os.unlink

        def unlink(name: Any, *args: Any, **kwargs: Any) -> None:
            real_unlink(name, *args, **kwargs)
            if Path(os.fsdecode(name)) == path:
                self.count += 1
                if self.count == 1:
                    raise OSError(errno.EIO, "Input/output error", str(name))

        monkeypatch.setattr(os, "unlink", unlink)


async def wait_for_blob(container: ContainerClient, name: str) -> bytes:
    with trio.fail_after(20):
        while not container.get_blob_client(name).exists():  # noqa: ASYNC110
            await trio.sleep(0.05)
    return container.download_blob(name).readall()


async def test_a_file_offered_twice_at_once_is_claimed_once(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offers from the watcher before a session restart and from the one after."""
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "twice.bin")
    data = random_bytes(5000, seed=3)
    source = layout.incoming_path(key)
    source.parent.mkdir(parents=True)
    source.write_bytes(data)
    release = threading.Event()
    claims: list[Path] = []
    real_claim_and_stage = fileops.claim_and_stage

    def slow_claim(source: Path, *args: Any) -> fileops.Claimed:
        claims.append(source)
        release.wait(10)
        return real_claim_and_stage(source, *args)

    monkeypatch.setattr(fileops, "claim_and_stage", slow_claim)
    settled: list[bool] = []
    second_settled = trio.Event()

    def offer() -> WorkItem:
        def done(failed: bool) -> None:
            settled.append(failed)
            if len(settled) == 1:
                second_settled.set()  # the second offer, while the first is still claiming

        stat = source.stat()
        return WorkItem(key, claimed=False, expected=(stat.st_size, stat.st_mtime_ns), on_claim_settled=done)

    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer())
        with trio.fail_after(10):
            while not claims:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await send.send(offer())
            await second_settled.wait()
        release.set()
        assert await wait_for_blob(container, blob_name(key)) == data
        nursery.cancel_scope.cancel()

    assert len(claims) == 1
    assert settled == [False, False]


async def test_a_claim_that_outlives_the_owner_of_its_name_keeps_what_it_claimed(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new file of a name in flight is offered; its owner completes while the claim runs:
    the new file, moved in by that claim, is uploaded, not left for GC to find."""
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "again.bin")
    older = layout.processing_path(key)
    older.parent.mkdir(parents=True)
    older.write_bytes(b"older, in flight")
    progress.claimed.add(key)
    newer = random_bytes(3000, seed=4)
    source = layout.incoming_path(key)
    source.parent.mkdir(parents=True)
    source.write_bytes(newer)
    real_claim = fileops.claim

    def claim_while_the_owner_completes(*args: Any) -> fileops.Claim:
        older.unlink()  # the owner's completion
        trio.from_thread.run_sync(progress.claimed.discard, key)
        return real_claim(*args)

    monkeypatch.setattr(fileops, "claim", claim_while_the_owner_completes)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        assert await wait_for_blob(container, blob_name(key)) == newer
        nursery.cancel_scope.cancel()


async def test_files_staged_before_the_disk_failed_are_no_evidence_against_a_file_it_fails(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The staging disk turns read-only: a file staged before still goes up after another's
    first failure, which says nothing about the disk. Retries run out; the probe of the disk
    fails: nothing is quarantined."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    staged_before, refused = FileKey("20240102", "s", "a.bin"), FileKey("20240102", "s", "b.bin")
    in_incoming(layout, staged_before, refused)
    first_failure = trio.Event()
    real_stage_copy, real_upload = fileops.stage_copy, store.upload
    attempts: list[int] = []

    a_staged = threading.Event()

    def read_only_once_a_is_staged(source: Path, target: Path, *args: Any, **kwargs: Any) -> fileops.StagedFile:
        if target.name == "b.bin":
            a_staged.wait(10)
            attempts.append(1)
            if len(attempts) == 1:
                trio.from_thread.run_sync(first_failure.set)
        if a_staged.is_set():
            raise OSError(errno.EROFS, "Read-only file system", str(target))
        staged = real_stage_copy(source, target, *args, **kwargs)
        a_staged.set()
        return staged

    async def upload_after_b_failed(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        await first_failure.wait()
        return await real_upload(staged, name, **kwargs)

    monkeypatch.setattr(fileops, "stage_copy", read_only_once_a_is_staged)
    monkeypatch.setattr(fileops, "probe_writable", staging_disk_refuses)
    monkeypatch.setattr(store, "upload", upload_after_b_failed)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for key in (staged_before, refused):
            await send.send(offer(layout, key))
        with trio.fail_after(20):
            while progress.files_processed < 1 or (len(attempts) < 5 and not progress.files_quarantined):  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert progress.files_quarantined == 0
    assert layout.processing_path(refused).exists()


async def test_a_file_whose_last_try_failed_in_an_outage_just_over_is_tried_again_not_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its retries ran out in a storage outage; the failure of the last is handled as storage
    comes back (a probe succeeds): that try was no test of the file. README: an outage that
    fails every file quarantines nothing."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "outage.bin")
    in_incoming(layout, key)
    real_upload = store.upload
    tries = 0
    outage_over = False

    async def upload_in_the_outage(*args: Any, **kwargs: Any) -> Any:
        nonlocal tries, outage_over
        tries += 1
        if tries <= settings.max_attempts:
            outage_over = tries == settings.max_attempts  # as this last try gives up
            raise ServiceRequestError("Connection refused")
        return await real_upload(*args, **kwargs)

    monkeypatch.setattr(store, "upload", upload_in_the_outage)
    probe_works_while(store, monkeypatch, lambda: outage_over)
    await run_until(pipeline, send, receive, offer(layout, key),
                    lambda: progress.files_processed + progress.files_quarantined > 0)
    assert (progress.files_processed, progress.files_quarantined) == (1, 0)


async def test_with_one_attempt_an_outage_after_files_went_up_quarantines_nothing(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """APP_MAX_ATTEMPTS=1: a file's first failure decides, and what went up before it
    began (before the outage) is no evidence that storage works now."""
    settings = settings.model_copy(update={"max_attempts": 1, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    before, during = FileKey("20240102", "s", "before.bin"), FileKey("20240102", "s", "during.bin")
    in_incoming(layout, before, during)
    real_upload = store.upload
    outage = False

    async def upload(*args: Any, **kwargs: Any) -> Any:
        if outage:
            raise ServiceRequestError("Connection refused")
        return await real_upload(*args, **kwargs)

    monkeypatch.setattr(store, "upload", upload)
    probe_works_while(store, monkeypatch, lambda: not outage)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, before))
        with trio.fail_after(10):
            while progress.files_processed < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        outage = True
        await send.send(offer(layout, during))
        with trio.fail_after(10):
            while progress.files_failed < 5:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert progress.files_quarantined == 0
        outage = False
        with trio.fail_after(10):
            while progress.files_processed < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert progress.files_quarantined == 0


async def test_a_file_failing_in_the_spells_of_a_flapping_outage_is_not_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Others get through between the spells (seen working before its tries began), but
    storage refuses again as its try fails: asked at once, it does not work now."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    flap = FileKey("20240102", "s", "flap.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(6)]
    in_incoming(layout, flap, *others)
    real_upload = store.upload
    spell = True

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        if spell and name.endswith("flap.bin"):
            raise ServiceRequestError("Connection refused")
        return await real_upload(staged, name, **kwargs)

    monkeypatch.setattr(store, "upload", upload)
    probe_works_while(store, monkeypatch, lambda: not spell)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, flap))
        for key in others:  # going up between its tries
            await send.send(offer(layout, key))
            await trio.sleep(0.05)
        with trio.fail_after(10):
            while progress.files_failed < 5 or progress.files_processed < len(others):  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert progress.files_quarantined == 0
        spell = False
        with trio.fail_after(10):
            while progress.files_processed < len(others) + 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert progress.files_quarantined == 0


def with_quick_timeouts(settings: Settings) -> Settings:
    """Two attempts before a quarantine, retries after a pause others can use, and a read
    timeout short enough for a test."""
    return settings.model_copy(update={
        "max_attempts": 2, "retry_backoff_s": 0.2, "retry_backoff_max_s": 0.3, "azure_read_timeout_s": 0.3,
    })


async def offer_one_by_one(
    send: trio.MemorySendChannel[WorkItem], layout: Layout, keys: list[FileKey], every_s: float
) -> None:
    for key in keys:
        await send.send(offer(layout, key))
        await trio.sleep(every_s)


async def run_among_others(
    pipeline: Pipeline, send: trio.MemorySendChannel[WorkItem], receive: trio.MemoryReceiveChannel[WorkItem],
    layout: Layout, key: FileKey, others: list[FileKey], every_s: float, done: Callable[[], bool],
) -> None:
    """Run the pipeline on ``key``, then on ``others`` offered one by one, until ``done()``."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        nursery.start_soon(offer_one_by_one, send, layout, others, every_s)
        with trio.fail_after(20):
            while not done():  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_file_timing_out_in_the_spells_of_a_flapping_outage_is_not_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage hangs in spells (a stopped server) and answers in the gaps: each try of the
    file begins in a gap, waits out its read timeout in a spell, and the probe after it lands
    in the next gap. Nobody was answered while it waited: no evidence against the file."""
    settings = with_quick_timeouts(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    flap = FileKey("20240102", "s", "flap.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(30)]
    in_incoming(layout, flap, *others)
    real_upload = store.upload
    spell, others_going, flap_tries = False, 0, 0

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        nonlocal spell, others_going, flap_tries
        if name.endswith("flap.bin"):
            flap_tries += 1
            if flap_tries <= 4:
                while others_going:  # noqa: ASYNC110  (a spell stalls every request, these too)
                    await trio.sleep(0.005)
                spell = True
                await trio.sleep(settings.azure_read_timeout_s)
                spell = False
                raise ServiceResponseTimeoutError("Read timed out. (read timeout=0.3)")
        while spell:  # noqa: ASYNC110
            await trio.sleep(0.005)
        others_going += 1
        try:
            return await real_upload(staged, name, **kwargs)
        finally:
            others_going -= 1

    monkeypatch.setattr(store, "upload", upload)
    await run_among_others(pipeline, send, receive, layout, flap, others, 0.05,
                           lambda: progress.files_processed == len(others) + 1)
    assert flap_tries == 5 and progress.files_quarantined == 0


async def test_a_file_timing_out_in_a_hang_that_began_after_it_was_sent_is_not_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage answers others for a moment after the file's request went out, then hangs
    until that request has timed out: answers from before the hang say nothing of it."""
    settings = with_quick_timeouts(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    unlucky = FileKey("20240102", "s", "unlucky.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(60)]
    in_incoming(layout, unlucky, *others)
    real_upload = store.upload
    hang, tries = False, 0

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        nonlocal hang, tries
        if name.endswith("unlucky.bin") and tries < 4:
            tries += 1
            await trio.sleep(settings.azure_read_timeout_s / 4)  # others still answered
            hang = True
            await trio.sleep(settings.azure_read_timeout_s * 3 / 4)
            hang = False
            raise ServiceResponseTimeoutError("Read timed out. (read timeout=0.3)")
        while hang:  # noqa: ASYNC110
            await trio.sleep(0.005)
        return await real_upload(staged, name, **kwargs)

    monkeypatch.setattr(store, "upload", upload)
    await run_among_others(pipeline, send, receive, layout, unlucky, others, 0.02,
                           lambda: progress.files_processed == len(others) + 1)
    assert tries == 4 and progress.files_quarantined == 0


async def test_a_file_timing_out_while_storage_answers_others_is_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = with_quick_timeouts(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    doomed = FileKey("20240102", "s", "doomed.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(60)]  # flowing all along
    in_incoming(layout, doomed, *others)
    real_upload = store.upload

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        if name.endswith("doomed.bin"):  # a middlebox that stalls this file's requests only
            await trio.sleep(settings.azure_read_timeout_s)
            raise ServiceResponseTimeoutError("Read timed out. (read timeout=0.3)")
        return await real_upload(staged, name, **kwargs)

    monkeypatch.setattr(store, "upload", upload)
    await run_among_others(pipeline, send, receive, layout, doomed, others, 0.02,
                           lambda: progress.files_quarantined > 0)
    assert progress.quarantined[0]["file"] == "doomed.bin"


async def test_a_file_whose_lost_answers_hid_an_upload_that_went_through_is_completed_not_quarantined(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every answer to its upload is lost (a timeout after the blob was written): storage
    holds its blob byte for byte, so it is done, not sent again and again."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    lost = FileKey("20240102", "s", "lost.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(20)]
    in_incoming(layout, lost, *others)
    real_upload = store.upload
    tries = 0

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        nonlocal tries
        report = await real_upload(staged, name, **kwargs)
        if name.endswith("lost.bin"):
            tries += 1
            raise ServiceResponseTimeoutError("Read timed out. (read timeout=60.0)")
        return report

    monkeypatch.setattr(store, "upload", upload)
    await run_among_others(pipeline, send, receive, layout, lost, others, 0.02,
                           lambda: progress.files_processed == len(others) + 1 or progress.files_quarantined > 0)
    assert tries == 1 and progress.files_quarantined == 0
    assert container.download_blob(blob_name(lost)).readall() == b"x" * 100
    assert not layout.processing_path(lost).exists()


async def test_a_large_file_whose_commit_answer_was_lost_is_completed_not_quarantined(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, for a file that goes up in blocks while it is copied: its staged copy is
    known from the copy's end on, so the blob is checked against it."""
    settings = with_quick_retries(settings).model_copy(update={"azure_max_single_put_size": 0})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    lost = FileKey("20240102", "s", "lost.bin")
    in_incoming(layout, lost)
    real_upload = store.upload_while_staging
    tries = 0

    async def upload_while_staging(*args: Any, **kwargs: Any) -> Any:
        nonlocal tries
        await real_upload(*args, **kwargs)
        tries += 1
        raise ServiceResponseTimeoutError("Read timed out. (read timeout=60.0)")

    monkeypatch.setattr(store, "upload_while_staging", upload_while_staging)
    await run_until(pipeline, send, receive, offer(layout, lost),
                    lambda: progress.files_processed == 1 or progress.files_quarantined > 0)
    assert tries == 1 and progress.files_quarantined == 0
    assert container.download_blob(blob_name(lost)).readall() == b"x" * 100


async def test_a_file_is_not_quarantined_while_storage_cannot_say_whether_it_went_up(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its answers are lost, and storage answers no one, probes included, for a while: no
    quarantine until storage has said, again and again, that the blob is not there."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "reset.bin")
    in_incoming(layout, key)
    real_holds = store.holds
    down = True
    answers: list[bool] = []  # whether storage answered each check of the blob

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        raise ServiceResponseError("Connection aborted.")  # its answer lost, every time

    async def holds(name: str, staged: fileops.StagedFile, **kwargs: Any) -> bool:
        answers.append(not down)
        if down:
            raise ServiceRequestError("Connection refused.")
        return await real_holds(name, staged, **kwargs)

    monkeypatch.setattr(store, "upload", upload)
    monkeypatch.setattr(store, "holds", holds)
    probe_works_while(store, monkeypatch, lambda: not down)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        with trio.fail_after(10):
            while progress.files_failed < 2 * settings.max_attempts:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert progress.files_quarantined == 0
        down = False
        with trio.fail_after(10):
            while progress.files_quarantined == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert answers.count(True) >= 1 + RECHECKS  # not there, said at its failure and after


async def test_a_file_whose_every_request_fails_while_storage_works_for_others_is_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A middlebox that breaks every request about one blob, its check included: the check
    failing while storage takes probes is the file's own failure too."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "cursed.bin")
    in_incoming(layout, key)

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        raise ServiceResponseError("Connection aborted.")

    async def holds(name: str, staged: fileops.StagedFile, **kwargs: Any) -> bool:
        raise ServiceResponseError("Connection aborted.")

    monkeypatch.setattr(store, "upload", upload)
    monkeypatch.setattr(store, "holds", holds)
    await run_until(pipeline, send, receive, offer(layout, key), lambda: progress.files_quarantined > 0)
    assert progress.quarantined[0]["file"] == "cursed.bin"


async def test_a_write_storage_carries_out_after_its_timeout_is_completed_not_quarantined(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that resumes works off what it had received: the last try's blob lands a
    moment after its request timed out, and after the check made at once."""
    caplog.set_level(logging.INFO, logger="uploader.worker")
    settings = with_quick_timeouts(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    late = FileKey("20240102", "s", "late.bin")
    others = [FileKey("20240102", "s", f"ok{n}.bin") for n in range(60)]
    in_incoming(layout, late, *others)
    real_upload = store.upload
    tries = 0
    writes: list[threading.Timer] = []

    async def upload(staged: fileops.StagedFile, name: str, **kwargs: Any) -> Any:
        nonlocal tries
        if not name.endswith("late.bin"):
            return await real_upload(staged, name, **kwargs)
        tries += 1
        await trio.sleep(settings.azure_read_timeout_s)
        if tries == settings.max_attempts:
            data = staged.path.read_bytes()
            blob = container.get_blob_client(name)
            md5 = ContentSettings(content_md5=bytearray(staged.md5))
            writes.append(threading.Timer(0.05, blob.upload_blob, (data,), {"overwrite": True, "content_settings": md5}))
            writes[-1].start()
        raise ServiceResponseTimeoutError("Read timed out. (read timeout=0.3)")

    monkeypatch.setattr(store, "upload", upload)
    await run_among_others(pipeline, send, receive, layout, late, others, 0.02,
                           lambda: progress.files_processed == len(others) + 1 or progress.files_quarantined > 0)
    for write in writes:
        write.join()
    assert tries == settings.max_attempts and progress.files_quarantined == 0
    assert container.download_blob(blob_name(late)).readall() == b"x" * 100
    assert not layout.processing_path(late).exists()
    assert any("late.bin went up after all" in r.getMessage() for r in caplog.records)  # (asked again)


async def test_a_file_whose_path_is_too_long_for_the_processing_root_is_quarantined_from_incoming(
    settings: Settings, store: BlobStore,
) -> None:
    """No claim can ever work (the system's path limit) and its blob name is too long for
    Azure anyway: it leaves incoming for the failed folder, not offered again for ever."""
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    base = len(os.fsencode(layout.incoming_path(FileKey("20240102", "s", "x")))) - 1
    depth, rest = divmod(4090 - base, 201)
    rel = "/".join(["d" * 200] * depth + ["f" * max(rest - 1, 1)])
    key = FileKey("20240102", "s", rel)
    assert len(os.fsencode(layout.incoming_path(key))) < 4096 < len(os.fsencode(layout.processing_path(key)))
    in_incoming(layout, key)
    await run_until(pipeline, send, receive, offer(layout, key), lambda: progress.files_quarantined > 0)
    assert not layout.incoming_path(key).exists()
    (record,) = progress.quarantined
    assert "cannot be uploaded" in str(record["reason"]) and record["disposition"] == "permanent"
    kept = Path(str(record["path"]))
    assert kept.read_bytes() == b"x" * 100 and ".apart-" in str(kept)  # noqa: ASYNC240
    assert json.loads(layout.failed_reason_path(kept).read_text())["file"] == rel


async def test_a_retry_that_only_completes_is_no_evidence_that_the_staging_disk_works(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Y's completion on NFS fails once (EIO) just as the staging disk turns read-only for
    everyone. Y's retry completes without staging (blob still verified): that must not count
    as 'a file that began after X's first failure completed', or X -- which the read-only
    disk fails like every file -- is quarantined. README: an outage that fails every file
    quarantines nothing."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    y, x = FileKey("20240102", "s", "y.bin"), FileKey("20240102", "s", "x.bin")
    in_incoming(layout, y, x)
    read_only = threading.Event()
    x_failed_at: list[float] = []
    real_stage_copy, real_finish = fileops.stage_copy, fileops.finish

    def stage_copy(source: Path, target: Path, *args: Any, **kwargs: Any) -> fileops.StagedFile:
        if read_only.is_set():
            if target.name == "x.bin":
                x_failed_at.append(time.monotonic())
            raise OSError(errno.EROFS, "Read-only file system", str(target))
        return real_stage_copy(source, target, *args, **kwargs)

    def finish(processing: Path, completed: Path, staged: fileops.StagedFile) -> list[str]:
        if processing.name == "y.bin":
            read_only.set()  # the staging disk fails from now on, for every file
            # Y's completion keeps failing (an NFS blip) until X has failed for a while.
            if not x_failed_at or time.monotonic() - x_failed_at[0] < 0.3:
                raise OSError(errno.EIO, "Input/output error", str(processing))
        return real_finish(processing, completed, staged)

    monkeypatch.setattr(fileops, "stage_copy", stage_copy)
    monkeypatch.setattr(fileops, "finish", finish)
    monkeypatch.setattr(fileops, "probe_writable", staging_disk_refuses)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, y))
        with trio.fail_after(10):
            while not read_only.is_set():  # noqa: ASYNC110
                await trio.sleep(0.01)
        await send.send(offer(layout, x))
        with trio.fail_after(20):
            while progress.files_processed < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await trio.sleep(0.5)  # X's next failures
        nursery.cancel_scope.cancel()

    assert progress.files_processed == 1  # Y, completed without being staged again
    assert len(x_failed_at) >= 2
    # Every file that needs the disk fails, and the disk's probe fails: expected 0.
    assert progress.files_quarantined == 0, [r["file"] for r in progress.quarantined]


async def test_a_claim_that_only_removed_an_owned_twin_takes_nothing_once_the_owner_finished(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The name is owned (claimed, in flight); incoming still holds the same inode (a claim
    stopped between link and unlink). The claim only removes the twin, and the owner
    completes meanwhile: the item moved nothing in and takes no claim (else it would fail on
    a missing file until its retries ran out)."""
    settings = with_quick_retries(settings)
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "twin.bin")
    owner_file = layout.processing_path(key)
    owner_file.parent.mkdir(parents=True)
    owner_file.write_bytes(b"in flight")
    layout.incoming_path(key).parent.mkdir(parents=True)
    os.link(owner_file, layout.incoming_path(key))  # the interrupted claim's twin
    progress.claimed.add(key)
    real_claim = fileops.claim

    def claim_then_the_owner_completes(*args: Any) -> fileops.Claim:
        outcome = real_claim(*args)  # same inode: removes the twin
        owner_file.unlink()  # the owner's completion
        trio.from_thread.run_sync(progress.claimed.discard, key)
        return outcome

    monkeypatch.setattr(fileops, "claim", claim_then_the_owner_completes)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert progress.files_failed == 0, caplog.text[-2000:]


async def test_a_quarantine_that_nfs_failed_half_way_is_finished_and_the_file_never_uploaded(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linked into the failed folder, its reason written, then an error: a retry of the upload
    that worked would leave the file both uploaded and quarantined."""
    settings = settings.model_copy(update={"max_attempts": 1, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "q.bin")
    in_incoming(layout, key)
    uploads = RefusedUploads(store, monkeypatch)
    real_write = fileops.write_atomically
    writes = 0

    def written_then_eio(path: Path, payload: bytes) -> None:
        nonlocal writes
        writes += 1
        real_write(path, payload)
        if writes == 1:  # on the share, and the answer lost
            raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(fileops, "write_atomically", written_then_eio)
    await run_until(pipeline, send, receive, offer(layout, key), lambda: progress.files_quarantined > 0)

    assert uploads.count == 2 and writes == 2  # (the second after storage was seen working)
    assert progress.files_quarantined == 1 and progress.files_processed == 0
    assert not layout.processing_path(key).exists()
    failed = layout.failed_path(key)
    assert failed.read_bytes() == b"x" * 100
    assert json.loads(layout.failed_reason_path(failed).read_bytes())["reason"] == "IntegrityError: storage computed another MD5"
    assert [p.name for p in failed.parent.iterdir()] == ["q.bin"]  # linked once, not twice


async def test_a_quarantine_nfs_keeps_refusing_is_tried_again_ever_later_and_said(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed folder this user may not write (an earlier run as root): its tries must not
    come every second, for ever, unseen in the status."""
    settings = settings.model_copy(update={"max_attempts": 1, "retry_backoff_s": 0.05, "retry_backoff_max_s": 10})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "q.bin")
    in_incoming(layout, key)
    RefusedUploads(store, monkeypatch)
    real_quarantine = fileops.quarantine
    refusals = 0

    def refused_four_times(*args: Any, **kwargs: Any) -> Path:
        nonlocal refusals
        if refusals < 4:
            refusals += 1
            raise PermissionError(errno.EACCES, "Permission denied", str(layout.failed_files_root))
        return real_quarantine(*args, **kwargs)

    monkeypatch.setattr(fileops, "quarantine", refused_four_times)
    with caplog.at_level(logging.WARNING, logger="uploader.worker"):
        await run_until(pipeline, send, receive, offer(layout, key), lambda: progress.files_quarantined > 0)
    delays = [r.args[-1] for r in caplog.records if r.msg.startswith("the quarantine of")]  # type: ignore[index]
    assert len(delays) == 4 and delays[3] > 2 * delays[0]  # 0.4 s or more, against 0.1 s or less
    assert "cannot quarantine it: EACCES" in str(progress.last_error)  # the last error it saw


def test_a_quarantine_whose_last_unlink_was_done_already_is_done(tmp_path: Path) -> None:
    """NFS: a retransmitted unlink answers ENOENT though the first one went through."""
    processing, failed = tmp_path / "proc" / "a", tmp_path / "failed" / "a"
    processing.parent.mkdir()
    processing.write_bytes(b"a")
    real_unlink = os.unlink

    def unlink_answered_enoent(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        if Path(path) == processing:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "unlink", unlink_answered_enoent)
        where = fileops.quarantine(processing, failed, tmp_path / "reasons" / "a.json", {"reason": "r"})
    assert where == failed and failed.read_bytes() == b"a" and not processing.exists()


async def test_a_quarantine_whose_removal_nfs_did_but_answered_an_error_counts_as_quarantined(
    settings: Settings, store: BlobStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings.model_copy(update={"max_attempts": 1, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "q.bin")
    in_incoming(layout, key)
    RefusedUploads(store, monkeypatch)
    LostUnlinkAnswer(layout.processing_path(key), monkeypatch)
    await run_until(pipeline, send, receive, offer(layout, key),
                    lambda: progress.files_quarantined + progress.files_skipped > 0)

    assert (progress.files_quarantined, progress.files_skipped) == (1, 0)
    failed = layout.failed_path(key)
    assert failed.read_bytes() == b"x" * 100 and layout.failed_reason_path(failed).exists()
    assert progress.quarantined[0]["path"] == str(failed)


async def test_a_newer_file_claimed_while_the_older_of_its_name_finishes_goes_up_after_it(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The older one's move to the completed folder frees the name in processing before its
    staging copy (of the same path) is removed: the newer one waits, and is copied again."""
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "status.json")
    older, newer = random_bytes(3000, seed=1), random_bytes(4000, seed=2)
    in_incoming(layout, key)
    layout.incoming_path(key).write_bytes(older)
    moved, newer_claimed = threading.Event(), threading.Event()
    real_finish, real_claim_and_stage = fileops.finish, fileops.claim_and_stage
    finishes = 0

    def finish_slowly_the_first_time(processing: Path, completed: Path, staged: fileops.StagedFile) -> list[str]:
        nonlocal finishes
        finishes += 1
        if finishes > 1:
            return real_finish(processing, completed, staged)
        fileops.mark_completed(processing, completed, staged)
        moved.set()
        newer_claimed.wait(10)
        time.sleep(0.3)  # the newer one's claim is back on the Trio thread
        for path in (completed, staged.path):
            fileops.remove_quietly(path)
        return []

    def claim_and_stage_and_tell(*args: Any) -> fileops.Claimed:
        claimed = real_claim_and_stage(*args)
        newer_claimed.set()
        return claimed

    monkeypatch.setattr(fileops, "finish", finish_slowly_the_first_time)
    monkeypatch.setattr(fileops, "claim_and_stage", claim_and_stage_and_tell)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        await trio.to_thread.run_sync(moved.wait)
        layout.incoming_path(key).write_bytes(newer)
        await send.send(offer(layout, key))
        with trio.fail_after(10):
            while progress.files_processed < 2:  # noqa: ASYNC110
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()

    assert container.download_blob(blob_name(key)).readall() == newer
    assert progress.files_failed == 0 and not progress.claimed
    assert not layout.processing_path(key).exists() and not layout.staging_path(key).exists()


@pytest.mark.parametrize("grown_to", [150 * 1024, 400 * 1024], ids=["within-the-budget", "beyond-the-budget"])
async def test_a_file_that_grows_after_its_claim_is_measured_again_and_never_overfills_staging(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
    grown_to: int,
) -> None:
    budget = 256 * 1024
    settings = with_quick_retries(settings).model_copy(update={
        "azure_max_block_size": 64 * 1024, "azure_max_single_put_size": 64 * 1024,
        "local_staging_max_bytes": budget, "max_attempts": 5,
    })
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "log.bin")
    in_incoming(layout, key)
    first, more = random_bytes(100 * 1024, seed=1), random_bytes(grown_to - 100 * 1024, seed=2)
    layout.incoming_path(key).write_bytes(first)
    real_claim, real_stage_copy = fileops.claim, fileops.stage_copy
    largest_copy = 0

    def claim_then_the_writer_goes_on(*args: Any) -> fileops.Claim:
        outcome = real_claim(*args)
        with open(layout.processing_path(key), "ab") as writer:
            writer.write(more)
        return outcome

    def measured_stage_copy(*args: Any, **kwargs: Any) -> fileops.StagedFile:
        nonlocal largest_copy
        try:
            return real_stage_copy(*args, **kwargs)
        finally:
            if layout.staging_path(key).exists():
                largest_copy = max(largest_copy, layout.staging_path(key).stat().st_size)

    monkeypatch.setattr(fileops, "claim", claim_then_the_writer_goes_on)
    monkeypatch.setattr(fileops, "stage_copy", measured_stage_copy)
    await run_until(pipeline, send, receive, offer(layout, key),
                    lambda: progress.files_processed + progress.files_quarantined > 0, within_s=20)

    assert largest_copy <= min(budget, grown_to)
    if grown_to <= budget:
        assert container.download_blob(blob_name(key)).readall() == first + more
    else:
        assert progress.files_quarantined == 1 and not container.get_blob_client(blob_name(key)).exists()
        assert progress.quarantined[0]["reason"] == f"{grown_to} bytes, larger than APP_LOCAL_STAGING_MAX_BYTES ({budget})"


async def test_a_newer_file_waits_for_the_quarantine_of_its_name_nfs_left_half_done(
    settings: Settings, store: BlobStore, container: ContainerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The older one's removal from processing was done, its answer lost: the name is free,
    but its quarantine is not finished; the newer file must neither be taken for it nor be
    claimed before it is done."""
    settings = settings.model_copy(update={"max_attempts": 1, "retry_backoff_s": 0.5, "retry_backoff_max_s": 0.5})
    progress = Progress()
    layout, pipeline, send, receive = pipeline_for(settings, store, progress)
    key = FileKey("20240102", "s", "q.bin")
    in_incoming(layout, key)
    # Refused twice: once, then once more after the probe saw storage working (alone, the
    # file has no one else's upload to show it).
    RefusedUploads(store, monkeypatch, times=2)
    unlinks = LostUnlinkAnswer(layout.processing_path(key), monkeypatch)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        await send.send(offer(layout, key))
        with trio.fail_after(10):
            while unlinks.count == 0 or progress.retry_waiting == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        layout.incoming_path(key).write_bytes(b"newer" * 40)
        await send.send(offer(layout, key))  # offered while the quarantine is due: not claimed
        with trio.fail_after(10):
            while progress.files_quarantined == 0:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert layout.incoming_path(key).read_bytes() == b"newer" * 40
        await send.send(offer(layout, key))  # its watcher's next offer
        with trio.fail_after(10):
            while progress.files_processed == 0:  # noqa: ASYNC110
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()

    assert container.download_blob(blob_name(key)).readall() == b"newer" * 40
    failed = layout.failed_path(key)
    assert [p.name for p in failed.parent.iterdir()] == ["q.bin"] and failed.read_bytes() == b"x" * 100
    assert (progress.files_quarantined, progress.files_skipped) == (1, 0)
