"""The workers: receive → claim → stage → upload → mark completed, as a pipeline.

A file that fails stays claimed, on NFS, and is tried again later in this process with
capped exponential backoff. It is quarantined when its failure is permanent, or after
``max_attempts`` failures when the side that fails it works for others: a file whose attempt
began after its first failure has completed since, or a probe of that side (a write to
storage, a listing on NFS, a write on the staging disk) succeeds. An outage of NFS or
storage, which fails everyone, quarantines nothing.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from azure.core.exceptions import AzureError
from opentelemetry import trace

from uploader import fileops
from uploader.blobstore import BlobStore, UploadReport
from uploader.config import Settings
from uploader.errors import (
    BlobNameRefused,
    Disposition,
    SourceChanged,
    backoff_delay,
    classify,
    describe,
    is_out_of_space,
    may_have_gone_through,
    refused_by_storage,
    unanswered,
)
from uploader.fileops import Claim, Claimed, StagedFile
from uploader.lanes import Lanes
from uploader.layout import (
    FileKey,
    Layout,
    blob_name,
    blob_name_problem,
    printable,
)
from uploader.progress import Progress, utc_now_iso
from uploader.staging_space import StagingSpace
from uploader.telemetry import Metrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
# What a file's attempt needs to work: the share, the local staging disk, blob storage.
SIDES = ("nfs", "staging", "storage")
# How often storage must say a blob is not up, a back-off apart, before the file whose request
# went unanswered is quarantined: a server that resumes may carry the request out late.
RECHECKS = 3


@dataclass
class WorkItem:
    key: FileKey
    # True when the file already sits at its processing path (claimed before, or recovered).
    claimed: bool
    # (size, mtime_ns) the watcher found stable; the claim refuses a file that differs.
    expected: tuple[int, int] | None = None
    # Tells the watcher this file is no longer waiting for a claim, and whether the claim
    # failed (the watcher then waits before it offers the file again).
    on_claim_settled: Callable[[bool], None] | None = None
    attempts: int = 0
    # When its last attempt failed (trio clock; None: it has not failed), and the sides
    # (SIDES) seen working since then, as the current step began: a failure of a step begun
    # while its side worked for others is the file's own.
    failed_at: float | None = None
    seen_working: frozenset[str] = frozenset()
    staged: StagedFile | None = None
    report: UploadReport | None = None
    completing: bool = False  # the attempt got as far as the completion on NFS
    # The staged copy whose blob storage had confirmed when the completion on NFS failed: the
    # retry checks the blob is still that one and completes, instead of sending it all again.
    verified: StagedFile | None = None
    # The file's size when claimed, where known: small files are staged at once.
    claimed_size: int | None = None
    # This attempt's span, carried from stage to stage.
    span: trace.Span | None = None
    # Its room on the staging disk (staging_space.py), held until its copy is removed.
    room: int | None = None
    # (reason, disposition) of a quarantine decided and not done (NFS failed it, maybe
    # half-way: linked into the failed folder): the next try finishes it, never an upload.
    quarantine_due: tuple[str, Disposition] | None = None
    # The file's stat as the last quarantine try found it: the next try finds it in the
    # failed folder by it, should the failed try have got as far as its removal.
    quarantine_stat: os.stat_result | None = None
    quarantine_tries: int = 0  # failed ones: the wait before the next one doubles too
    # The staged copy whose last request storage left unanswered: the quarantine due first
    # asks whether its blob went up after all (storage may carry out a request late).
    recheck: StagedFile | None = None
    rechecks_left: int = 0  # answers "not up" still to get before the quarantine
    in_pipeline: bool = False


def _expected_size(item: WorkItem) -> int | None:
    return None if item.expected is None else item.expected[0]


def _known_size(item: WorkItem) -> int | None:
    return item.claimed_size if item.claimed_size is not None else _expected_size(item)


def _size(path: os.PathLike[str]) -> int:
    return os.lstat(path).st_size


def _log_fields(key: FileKey) -> dict[str, str]:
    """The session and file of a log line about ``key``, as JSON fields."""
    return {"session": key.session, "file": printable(key.rel)}


def _attributes(item: WorkItem) -> dict[str, str | int]:
    return {
        "session": item.key.session,
        "file": printable(item.key.rel),
        "date_prefix": item.key.date_prefix,
        "attempt": item.attempts + 1,
    }


class Pipeline:
    """Three stages, each with ``worker_concurrency`` tasks, joined by small channels:

        claim + stage copy  →  upload + verify  →  mark completed + clean up

    While one file goes up, the next ones are being claimed and copied and the last one is
    being completed, so the uploads keep storage as busy as a plain upload loop would.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        layout: Layout,
        lanes: Lanes,
        store: BlobStore,
        progress: Progress,
        metrics: Metrics,
        retry_send: trio.MemorySendChannel[WorkItem],
    ) -> None:
        self.settings = settings
        self.space = StagingSpace(
            layout.staging_root, lanes.staging, budget=settings.local_staging_max_bytes
        )
        self.layout = layout
        self.lanes = lanes
        self.store = store
        self.progress = progress
        self.metrics = metrics
        self._retry_send = retry_send
        self._nursery: trio.Nursery | None = None
        # Files inside the pipeline: one file is never worked on twice at once.
        self._active: set[FileKey] = set()
        self._someone_left = trio.Event()  # set (and replaced) whenever a file leaves _active
        # Files whose quarantine NFS failed, to be tried again: their name in processing may be
        # free already, and must not be claimed by a newer file before the quarantine is done.
        self._quarantines_due: set[FileKey] = set()
        # When each side was last seen working: a step that needs it went through (a claim
        # or completion on NFS, a copy written to staging, an upload), or its probe did. A
        # file staged before a disk failed and uploaded after says nothing of the disk.
        self._working_at = dict.fromkeys(SIDES, -math.inf)
        # Files whose claim has to wait (busy, changed) and was said so in the log: once, not
        # at every poll while they wait.
        self._said_waiting: dict[FileKey, Claim] = {}

    async def run(
        self,
        receive: trio.MemoryReceiveChannel[WorkItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the stages on ``receive`` until cancelled."""
        width = self.settings.worker_concurrency
        staged_send, staged_receive = trio.open_memory_channel[WorkItem](width)
        uploaded_send, uploaded_receive = trio.open_memory_channel[WorkItem](width)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with receive, staged_send, staged_receive, uploaded_send, uploaded_receive:
                for _ in range(width):
                    nursery.start_soon(self._stage_files, receive.clone(), staged_send.clone())
                    nursery.start_soon(
                        self._upload_files, staged_receive.clone(), uploaded_send.clone()
                    )
                    nursery.start_soon(self._finish_files, uploaded_receive.clone())
            task_status.started()

    async def _stage_files(
        self, receive: trio.MemoryReceiveChannel[WorkItem], send: trio.MemorySendChannel[WorkItem]
    ) -> None:
        async with receive, send:
            async for item in receive:
                item.span = tracer.start_span("file", attributes=_attributes(item))
                if await self._step(item, self._stage):
                    await send.send(item)

    async def _upload_files(
        self, receive: trio.MemoryReceiveChannel[WorkItem], send: trio.MemorySendChannel[WorkItem]
    ) -> None:
        async with receive, send:
            async for item in receive:
                if await self._step(item, self._upload):
                    await send.send(item)

    async def _finish_files(self, receive: trio.MemoryReceiveChannel[WorkItem]) -> None:
        async with receive:
            async for item in receive:
                await self._step(item, self._finish)

    async def _step(self, item: WorkItem, step: Callable[[WorkItem], Awaitable[bool]]) -> bool:
        """Run one stage of ``item`` inside its span: True if it goes on to the next stage."""
        span = item.span
        assert span is not None
        with trace.use_span(span, end_on_exit=False):
            try:
                self._note_sides_seen(item)
                return await step(item)
            except Exception as exc:
                span.set_attribute("outcome", "failed")
                span.set_attribute("disposition", classify(exc).value)
                if (size := _known_size(item)) is not None:
                    span.set_attribute("size", size)
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, describe(exc))
                # What follows (a quarantine) is part of the span, and of the file's time in
                # the pipeline: a newer file of its name, claimed once the quarantine moved
                # this one, waits until this one's staging copy is removed. So does the room.
                try:
                    await self._failed(item, exc)
                except Exception as bug:
                    # A bug must not take the other files down with it: the file stays where
                    # it is (incoming, or claimed where GC finds it: no longer ours) and the
                    # stage goes on.
                    if item.claimed:
                        self.progress.claimed.discard(item.key)
                    log.exception("unexpected error on %s", item.key)
                    self.progress.note_error(f"{item.key}: {describe(bug)}")
                finally:
                    # No checkpoint since _failed returned: a retry it scheduled comes after.
                    self._leave(item, end_span=False)
                    span.end()
                return False

    def _enter(self, item: WorkItem) -> None:
        self._active.add(item.key)
        item.in_pipeline = True
        self.progress.in_flight += 1
        self.metrics.in_flight.add(1)

    def _release_room(self, item: WorkItem) -> None:
        self.space.release(item.room)
        item.room = None

    def _leave(self, item: WorkItem, *, end_span: bool = True) -> None:
        self._release_room(item)  # its copy is removed now
        if item.in_pipeline:
            item.in_pipeline = False
            self._active.discard(item.key)
            self._someone_left.set()
            self._someone_left = trio.Event()
            self.progress.in_flight -= 1
            self.metrics.in_flight.add(-1)
        if item.span is not None and end_span:
            item.span.end()

    def _streams(self, size: int | None) -> bool:
        """Whether a file is large enough to go up in blocks while it is being copied."""
        return size is None or size > self.settings.azure_max_single_put_size

    async def _stage(self, item: WorkItem) -> bool:
        """Claim the file and copy it to staging; a large file is only claimed here, its
        copy made by the upload step as its blocks go up."""
        key, span = item.key, item.span
        assert span is not None
        stage_error: Exception | None = None
        claimed_now = not item.claimed
        if not item.claimed:
            size = _expected_size(item)
            stage_now = not self._streams(size)
            staging = self.layout.staging_path(item.key)
            item.room = await self.space.take(size if stage_now and size is not None else 0, staging)
            claimed = await self._claim(item, stage=stage_now)
            if claimed.outcome is not Claim.CLAIMED:
                self._release_room(item)
                if claimed.outcome is not Claim.FAILED:  # (which said so on the span)
                    span.set_attribute("outcome", f"not claimed: {claimed.outcome.value}")
                span.end()
                return False
            item.staged, stage_error = claimed.staged, claimed.stage_error
        if key in self._active and claimed_now:
            # Claimed just now, so the older file of its name is finishing (its name in
            # processing was free): this one goes after it.
            while key in self._active:
                await self._someone_left.wait()
            self.progress.claimed.add(key)  # (the older one's finish forgot the name)
            if item.staged is not None and not await self.lanes.staging.run(os.path.lexists, item.staged.path):
                item.staged = None  # its copy was taken for the older one's: made again below
        if key in self._active:
            self._release_room(item)
            span.set_attribute("outcome", "already being uploaded")
            span.end()
            return False
        self._enter(item)
        if stage_error is not None:
            raise stage_error
        if item.staged is not None:
            self._working("nfs", "staging")
            return True  # copied in the claim's trip to a thread
        if item.verified is not None:
            # The blob was verified: a failure from here on (a storage read) quarantines nothing.
            item.completing = True
            if await self._still_in_storage(item, item.verified):
                item.staged, item.verified = item.verified, None
                item.report = UploadReport(0, item.staged.size, 0)
                # Neither staged nor uploaded now: no evidence that either works.
                return True
            item.verified, item.completing = None, False
        processing = self.layout.processing_path(key)
        if item.claimed_size is None:
            item.claimed_size = await self.lanes.nfs.run(_size, processing)
        staging = self.layout.staging_path(key)
        # Held until the copy is removed; here, where waiting for it holds up no copy that
        # is further down the pipeline (a large file's copy is made by the upload step).
        if item.room is None:  # (taken already for a small file whose claim made no copy)
            item.room = await self.space.take(item.claimed_size, staging)
            self._note_sides_seen(item)  # (the wait for room may have been long)
        if not self._streams(item.claimed_size):
            with tracer.start_as_current_span("stage"):
                item.staged = await self.lanes.nfs.run(
                    partial(fileops.stage_copy, at_most=item.claimed_size),
                    processing, staging, self.settings.azure_max_block_size,
                )
        self._working("nfs")
        if item.staged is not None:
            self._working("staging")
        return True

    async def _still_in_storage(self, item: WorkItem, verified: StagedFile) -> bool:
        """Whether the blob is still the one verified before the completion failed (nobody
        deleted or replaced it meanwhile)."""
        with tracer.start_as_current_span("check stored"):
            if await self.store.holds(blob_name(item.key), verified):
                return True
        log.info("the blob of %s changed since it was verified; uploading again", item.key,
                 extra=_log_fields(item.key))
        return False

    async def _claim(self, item: WorkItem, *, stage: bool) -> Claimed:
        """Claim the file and, when it is ours now and ``stage``, copy it to staging in the
        same trip to a thread."""
        key, layout = item.key, self.layout
        if key in self.progress.claiming or key in self._quarantines_due:
            # Offered twice (by a watcher before a session restart and by the one after, say)
            # and being claimed by another worker now: one claim of a name at a time, or the
            # two would share one staging copy. The watcher offers it again if it is still there.
            if item.on_claim_settled is not None:
                item.on_claim_settled(False)
            return Claimed(Claim.BUSY)
        # A file whose name is already claimed here can only be the other half of an
        # interrupted claim: finish the claim, but its owner stages and uploads it.
        owned = key in self.progress.claimed
        failed = False
        self.progress.claim_started(key)
        try:
            with tracer.start_as_current_span("claim"):
                if owned or not stage:
                    claimed = Claimed(
                        await self.lanes.nfs.run(
                            fileops.claim, layout.incoming_path(key), layout.processing_path(key),
                            item.expected, layout.incoming_root,
                        )
                    )
                else:
                    claimed = await self.lanes.nfs.run(
                        fileops.claim_and_stage,
                        layout.incoming_path(key),
                        layout.processing_path(key),
                        layout.staging_path(key),
                        item.expected,
                        self.settings.azure_max_block_size,
                        layout.incoming_root,
                        _expected_size(item),  # what room was made for
                    )
        except OSError as exc:
            # Still in incoming: the watcher offers it again after a while.
            self._said_waiting.pop(key, None)
            failed = True
            disposition = classify(exc)
            self.progress.files_failed += 1
            self.metrics.files_failed.add(1, {"disposition": disposition.value})
            span = trace.get_current_span()  # the file's: a failed attempt, as any other
            span.set_attribute("outcome", "failed")
            span.set_attribute("disposition", disposition.value)
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, describe(exc))
            self.progress.note_error(f"claim {key}: {describe(exc)}")
            log.warning("cannot claim %s: %s", key, describe(exc), extra=_log_fields(key))
            if exc.errno == errno.ENAMETOOLONG and (problem := blob_name_problem(blob_name(key))):
                # Its path is too long for the processing root, and Azure would refuse its
                # blob name anyway: no claim can ever work, so it leaves incoming for the
                # failed folder as it is, instead of being offered again for ever.
                item.attempts += 1
                reason = f"{key} cannot be uploaded: {problem}"
                if await self._quarantine(item, reason, Disposition.PERMANENT, source=layout.incoming_path(key)):
                    failed = False
                    self.progress.left_incoming(key)
            return Claimed(Claim.FAILED)
        finally:
            self.progress.claim_ended(key)
            if item.on_claim_settled is not None:
                item.on_claim_settled(failed)
        if claimed.outcome in (Claim.CLAIMED, Claim.FINISHED, Claim.GONE):
            self._said_waiting.pop(key, None)
            self.progress.left_incoming(key)
        if claimed.outcome is Claim.FINISHED:
            if owned:
                return Claimed(Claim.GONE)  # the file's owner uploads it
            claimed = Claimed(Claim.CLAIMED, claimed.staged, claimed.stage_error)
        if claimed.outcome is Claim.CLAIMED:
            # Moved in now: ours, even where the name was owned when the claim began (that
            # owner finished meanwhile, or the name could not have been free).
            item.claimed = True
            item.claimed_size = _expected_size(item)
            self.progress.claimed.add(key)
        elif claimed.outcome is Claim.GONE:
            self.progress.files_skipped += 1
            log.info("%s left incoming before it could be claimed; skipped", key, extra=_log_fields(key))
        elif self._said_waiting.get(key) is not claimed.outcome:
            if len(self._said_waiting) >= 10_000:  # names that never came back: forget them
                self._said_waiting.clear()
            self._said_waiting[key] = claimed.outcome
            log.info("not claiming %s yet: %s", key, claimed.outcome.value, extra=_log_fields(key))
        return claimed

    async def _upload(self, item: WorkItem) -> bool:
        def sent(n: int) -> None:
            self.progress.bytes_sent += n

        if item.report is not None:
            return True  # still in storage from an attempt whose completion failed
        key = item.key
        problem = blob_name_problem(blob_name(key))
        if problem is not None:
            raise BlobNameRefused(f"{key} cannot be uploaded: {problem}")
        started = trio.current_time()
        with tracer.start_as_current_span("upload") as span:
            if item.staged is None:
                item.staged, item.report = await self.store.upload_while_staging(
                    self.layout.processing_path(key), self.layout.staging_path(key),
                    blob_name(key), on_sent=sent, at_most=item.claimed_size,
                    on_staged=partial(setattr, item, "staged"),  # (asked by _failed: is it up?)
                )
                self._working("staging", "storage")
            else:
                item.report = await self.store.upload(item.staged, blob_name(key), on_sent=sent)
                self._working("storage")
            span.set_attribute("size", item.staged.size)
            span.set_attribute("bytes_resumed", item.report.bytes_resumed)
        self.metrics.upload_duration.record(trio.current_time() - started)
        return True

    async def _finish(self, item: WorkItem) -> bool:
        key, staged, report, span = item.key, item.staged, item.report, item.span
        assert staged is not None and report is not None and span is not None
        item.completing = True
        with tracer.start_as_current_span("complete"):
            problems = await self.lanes.nfs.run(
                fileops.finish, self.layout.processing_path(key), self.layout.completed_path(key),
                staged,
            )
        for problem in problems:
            log.warning("cleanup after %s failed (GC retries it): %s", key, problem, extra=_log_fields(key))
        progress = self.progress
        progress.claimed.discard(key)
        progress.files_processed += 1
        self._working("nfs")
        progress.bytes_uploaded += staged.size
        progress.bytes_resumed += report.bytes_resumed
        self.metrics.files_processed.add(1)
        self.metrics.file_size.record(staged.size)
        self.metrics.bytes_uploaded.add(staged.size)
        log.info(
            "uploaded %s (%d bytes, %d resumed)", key, staged.size, report.bytes_resumed,
            extra=_log_fields(key),
        )
        span.set_attribute("outcome", "uploaded")
        span.set_attribute("size", staged.size)
        self._leave(item)
        return True

    async def _failed(self, item: WorkItem, exc: Exception) -> None:
        key, progress = item.key, self.progress
        disposition = classify(exc)
        reason = describe(exc)
        item.attempts += 1
        failed_at = trio.current_time()  # (before a probe: one that succeeds is seen after it)
        # Its side worked for others when this attempt began: then the failure is the file's.
        # Evidence from after the failure (storage back a moment ago) only earns it another
        # attempt, begun while the side is known to work: a long outage, failing every try of
        # a file, must not quarantine it the moment it ends.
        side_worked = self._side_of(exc) in item.seen_working
        # A request storage never answered (a timeout) is the file's only if storage answered
        # others while it waited: in a flapping outage a try begun in a gap times out in the
        # next spell, and the probe below may land in the gap after it.
        answered_others = self._answered_others_while_waiting(exc)
        progress.files_failed += 1
        self.metrics.files_failed.add(1, {"disposition": disposition.value})
        progress.note_error(f"{key}: {reason}")
        at_completion, item.completing = item.completing, False
        if at_completion and isinstance(exc, OSError) and item.staged is not None:
            # NFS failed the move, not the file (a changed or vanished file is no OSError).
            item.verified = item.staged
        item.report = None
        if isinstance(exc, SourceChanged):
            item.claimed_size = None  # measured again: its room on the staging disk too
        if disposition is Disposition.PERMANENT:
            # A refusal by storage may be the account's, not the file's (an account that now
            # requires HTTPS answers 400 to every request): then the probe is refused too.
            # (A probe, not only what went through before: the refusal may be new, as
            # everyone's.) And, like any failure, it is the file's only when storage worked
            # for others as the step began: a probe just after an account-wide refusal ended
            # earns the file one more attempt, which decides.
            if refused_by_storage(exc):
                works_now = await self._works_for_others(exc)
                give_up = side_worked and works_now
                if not works_now:  # said as what it is: no file's fault
                    progress.note_error(f"storage refuses every request, not only {key}'s: {reason}")
            else:
                give_up = True
        elif at_completion:
            # The blob is up and verified: what failed is the move to the completed folder on
            # NFS, which fails every file alike while the share does (a listing that works
            # says nothing about renames). Retried as long as it takes, never quarantined.
            give_up = False
        elif is_out_of_space(exc):
            # A full disk fails whoever needs room, and room comes back as files complete:
            # only a file larger than the whole staging disk can never be copied, whatever
            # the attempt.
            give_up = await self._larger_than_staging(item)
            if give_up:  # the reason kept with the file says what no retry can change
                budget = self.settings.local_staging_max_bytes
                if budget and (_known_size(item) or 0) > budget:
                    reason = f"{_known_size(item)} bytes, larger than APP_LOCAL_STAGING_MAX_BYTES ({budget})"
                else:
                    reason = (
                        f"{_known_size(item)} bytes, larger than the whole staging disk "
                        f"({self.layout.staging_root}): {reason}"
                    )
                disposition = Disposition.PERMANENT
                progress.note_error(f"{key}: {reason}")  # rather than the disk's words
        elif item.attempts >= self.settings.max_attempts:
            # And it works now, asked at once: a flapping outage lets others through between
            # its spells, and this step may have begun in one gap and failed in the next spell.
            works_now = await self._works_for_others(exc)  # (seen working: the next attempt decides)
            give_up = (
                side_worked and works_now and answered_others and not await self._folder_refused(exc)
            )
        else:
            give_up = False
        recheck: StagedFile | None = None
        sent_unanswered = may_have_gone_through(exc)
        if item.staged is not None and self._side_of(exc) == "storage" and (
            sent_unanswered or (give_up and disposition is Disposition.RETRYABLE)
        ):
            # A request whose answer was lost (a timeout, a reset) may have gone through: the
            # file is up, byte for byte, and its retry only completes it (sent again, its
            # lost answers could go on for ever; quarantined, it would be both up and set aside).
            went_up = await self._is_up(item, item.staged)
            if went_up:
                log.info("%s is up all the same: its retry only completes it", key, extra=_log_fields(key))
                give_up = False
                item.verified = item.staged
            elif went_up is None:  # storage answers no one now: asked again next time
                give_up = False
            elif give_up and sent_unanswered:
                # Storage may yet carry it out (a server that resumes works off what it had
                # received): asked again after a while, before the quarantine.
                recheck = item.staged
        item.failed_at = failed_at
        if give_up:
            if recheck is None:
                if await self._quarantine(item, reason, disposition):
                    return
                item.quarantine_tries += 1
            item.quarantine_due = (reason, disposition)
            item.recheck, item.rechecks_left = recheck, RECHECKS
            self._quarantines_due.add(key)
        # A file waiting for its retry keeps no staging copy: during an outage every file
        # waits, and staging must hold only the files in flight. The retry copies it again.
        item.staged = None
        await self._drop_staging(key)
        if item.quarantine_due is None:
            progress.files_retried += 1
            self._retry_soon(item, "attempt %d of %s failed (%s); retrying in %.1f s", item.attempts, key, reason)
        elif item.recheck is not None:
            self._retry_soon(
                item, "attempt %d of %s failed (%s); whether it went up after all is asked in %.1f s, "
                "before its quarantine", item.attempts, key, reason,
            )
        else:
            self._retry_soon(item, "the quarantine of %s will be tried again in %.1f s", key)

    def _retry_soon(self, item: WorkItem, message: str, *args: object) -> None:
        delay = backoff_delay(
            item.attempts + item.quarantine_tries, self.settings.retry_backoff_s,
            self.settings.retry_backoff_max_s,
        )
        log.warning(message, *args, delay, extra=_log_fields(item.key))
        self.progress.retry_waiting += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._retry_later, item, delay)

    async def _larger_than_staging(self, item: WorkItem) -> bool:
        size = _known_size(item)
        return size is not None and await self.space.larger_than_disk(size)

    async def _folder_refused(self, exc: Exception) -> bool:
        """Whether a staging failure is its folder's, which this user may not write (one an
        earlier run as another user left): it fails every file of that folder, while files
        of other folders go through and show the disk working."""
        if not isinstance(exc, OSError) or (failed := self._on_staging_disk(exc)) is None:
            return False
        try:
            await self.lanes.staging.run(fileops.check_folder_writable, self.layout.staging_root, failed)
        except OSError:
            return True
        return False

    def _note_sides_seen(self, item: WorkItem) -> None:
        """Which sides were seen working since the file's last failure, as a step of it
        begins (none before its first: evidence from long before says nothing of now)."""
        failed_at = item.failed_at
        item.seen_working = (
            frozenset() if failed_at is None
            else frozenset(side for side, at in self._working_at.items() if at > failed_at)
        )

    async def _is_up(self, item: WorkItem, staged: StagedFile) -> bool | None:
        """Whether storage holds the blob of ``staged``, though its upload failed; None when
        storage answers no one now. A check that fails while storage takes a probe is the
        blob's own failure, like its upload's: not up."""
        name = blob_name(item.key)
        with trio.move_on_after(self.settings.azure_read_timeout_s + 1):
            try:
                return await self.store.holds(name, staged, once=True)
            except AzureError as exc:
                log.info("cannot read the properties of %s: %s", name, describe(exc), extra=_log_fields(item.key))
        if await self.store.probe():
            self._working("storage")
            return False
        return None

    def _answered_others_while_waiting(self, exc: Exception) -> bool:
        """For a request storage left unanswered until its timeout ran out (just now): whether
        another request of storage's went through meanwhile. True for any other failure."""
        wait = unanswered(exc)
        if wait is None:
            return True
        settings = self.settings
        waited = settings.azure_connect_timeout_s if wait == "connect" else settings.azure_read_timeout_s
        # A request sent once this one had waited half its time, and answered before it ran
        # out: storage was answering then. (One merely answered meanwhile proves less: begun
        # before a hang, or in the backlog a resumed server works off, where this one was too.)
        now = time.monotonic()  # (the lanes' clock)
        return self.lanes.azure.answered_within(now - waited / 2, now)

    def _working(self, *sides: str) -> None:
        now = trio.current_time()
        for side in sides:
            self._working_at[side] = now

    def _side_of(self, exc: Exception) -> str:
        """The side (of SIDES) whose failure ``exc`` is."""
        if isinstance(exc, OSError) and self._on_staging_disk(exc) is not None:
            return "staging"
        if isinstance(exc, OSError | SourceChanged):
            return "nfs"
        return "storage"

    async def _works_for_others(self, exc: Exception) -> bool:
        """Probe the side that failed this file: is it the file, or is everything failing?
        A side that answers is seen working from now on."""
        side = self._side_of(exc)
        working = False
        with trio.move_on_after(self.settings.nfs_op_timeout_s):
            try:
                # One check of a side at a time, each after the one before: a check that does
                # not return within the time (a hung share) answers "not working" for the
                # failures meanwhile, which wait in no thread.
                if side == "staging":
                    assert isinstance(exc, OSError)
                    failed = self._on_staging_disk(exc)
                    await self.lanes.staging.run_alone(
                        "probe", fileops.probe_writable, self.layout.staging_root, failed
                    )
                elif side == "nfs":
                    await self.lanes.nfs.run_alone("probe", os.listdir, self.layout.processing_root)
                working = side != "storage" or await self.store.probe()
            except OSError:
                working = False
        if working:
            self._working(side)
        return working

    def _on_staging_disk(self, exc: OSError) -> Path | None:
        """The path on the local staging disk (read-only, failing) that the failure names."""
        for name in (exc.filename, exc.filename2):
            if name is not None and (path := Path(os.fsdecode(name))).is_relative_to(self.layout.staging_root):
                return path
        return None

    async def _retry_later(self, item: WorkItem, delay: float) -> None:
        try:
            await trio.sleep(delay)
        finally:
            self.progress.retry_waiting -= 1
        if item.quarantine_due is None:
            await self._retry_send.send(item)
            return
        reason, disposition = item.quarantine_due
        with tracer.start_as_current_span("file", attributes=_attributes(item)) as item.span:
            try:
                if item.recheck is not None:
                    went_up = await self._is_up(item, item.recheck)
                    if went_up:
                        log.info("%s went up after all; completing it", item.key, extra=_log_fields(item.key))
                        item.span.set_attribute("outcome", "went up after all")
                        item.verified, item.recheck, item.quarantine_due = item.recheck, None, None
                        self._quarantines_due.discard(item.key)
                        self.progress.files_retried += 1  # (its failure ends in a retry after all)
                        await self._retry_send.send(item)
                        return
                    if went_up is None or item.rechecks_left > 1:
                        if went_up is False:
                            item.rechecks_left -= 1
                        item.quarantine_tries += 1
                        self._retry_soon(item, "whether %s went up after all is asked again in %.1f s", item.key)
                        return
                    item.recheck = None
                done = await self._quarantine(item, reason, disposition)
            except Exception as bug:
                # As in _step: a bug must not take the other files down with it. The file
                # stays claimed, no longer ours: GC finds it and queues it again.
                self.progress.claimed.discard(item.key)
                self._quarantines_due.discard(item.key)
                log.exception("unexpected error on %s", item.key)
                self.progress.note_error(f"{item.key}: {describe(bug)}")
                return
            if done:
                self._quarantines_due.discard(item.key)
            else:
                item.quarantine_tries += 1
                self._retry_soon(item, "the quarantine of %s will be tried again in %.1f s", item.key)

    async def _quarantine(
        self, item: WorkItem, reason: str, disposition: Disposition, *, source: Path | None = None
    ) -> bool:
        """Move the claimed file (or ``source``) to the failed folder; whether it is done."""
        key, layout = item.key, self.layout
        source = source or layout.processing_path(key)
        failed = layout.failed_path(key)

        record: dict[str, object] = {
            "date_prefix": key.date_prefix,
            "session": key.session,
            "file": printable(key.rel),
            "blob_name": blob_name(key),
            "attempts": item.attempts,
            "reason": reason,
            "disposition": disposition.value,
            "quarantined_at": utc_now_iso(),
        }

        def quarantine(*args: Any) -> Path:
            return fileops.quarantine(
                *args, seen=partial(setattr, item, "quarantine_stat"), tried_before=item.quarantine_stat
            )

        try:
            where = await self.lanes.nfs.run(
                quarantine,
                source,
                failed,
                layout.failed_reason_path(failed),
                record,
                partial(layout.failed_apart, key),
            )
        except FileNotFoundError:
            try:
                if await self.lanes.nfs.run(fileops.holds, source, item.quarantine_stat):
                    return False
            except OSError:
                return False  # the share cannot say: tried again later
            # Retries ran out and the file is still not there: someone removed it from NFS.
            log.error("%s is gone from NFS; nothing left to upload", key, extra=_log_fields(key))
            self.progress.claimed.discard(key)
            self.progress.files_skipped += 1
            await self._drop_staging(key)
            return True
        except OSError as exc:
            log.error("cannot quarantine %s: %s", key, describe(exc), extra=_log_fields(key))
            self.progress.note_error(f"{key}: cannot quarantine it: {describe(exc)}")
            return False
        record["path"] = str(where)
        if item.span is not None:
            item.span.set_attribute("outcome", "quarantined")
        # Said once it is done: a file found gone instead is not quarantined.
        log.error("quarantined %s after %d attempt%s: %s", key, item.attempts,
                  "" if item.attempts == 1 else "s", reason, extra=_log_fields(key))
        self.progress.claimed.discard(key)
        self.progress.files_quarantined += 1
        self.progress.quarantined.append(record)
        if self.progress.quarantined_before_recall is not None:
            self.progress.quarantined_before_recall.add(str(where))
        self.metrics.files_quarantined.add(1)
        await self._drop_staging(key)
        return True

    async def _drop_staging(self, key: FileKey) -> None:
        try:
            await self.lanes.staging.run(fileops.remove_quietly, self.layout.staging_path(key))
        except OSError as exc:
            log.warning("cannot remove the staging copy of %s: %s", key, describe(exc), extra=_log_fields(key))

