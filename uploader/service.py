"""The service wiring: one root nursery supervises everything.

    root nursery
     ├── HTTP API (Quart-trio on Hypercorn)
     ├── session control ── session scope (only while a session is active) ── watcher
     ├── pipeline ── workers x N (and their retry timers)
     ├── GC
     ├── instance lock (held while the service runs: one service per processing root)
     └── recovery feed (re-queues what a previous run left unfinished, then ends)
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from uploader import api, gc, instance_lock, watcher
from uploader.blobstore import BlobStore, open_blob_store
from uploader.config import Settings
from uploader.drain import Drains, Offers
from uploader.errors import StartupError, describe
from uploader.folders import check_folders, make_folders
from uploader.lanes import Lanes, ThreadLane
from uploader.layout import FileKey, Layout
from uploader.progress import Progress, utc_now_iso
from uploader.recovery import Recovered, find_quarantined, read_stored_state, recover
from uploader.session import SessionControl, SessionState
from uploader.staging_space import StagingSpace
from uploader.telemetry import Metrics, Telemetry, untraced
from uploader.worker import Pipeline, WorkItem

log = logging.getLogger(__name__)


STORAGE_WAIT_NOTE_S = 15.0
# An NFS server may refuse a read for a while; a state file refused this long is not read.
STATE_REFUSED_GIVE_UP_S = 30.0


async def say_still_waiting_for_storage(settings: Settings, progress: Progress) -> None:
    """Say now and then, in the log and the status's last error, while start-up waits for
    storage: an endpoint that takes connections and never answers holds it for
    (APP_AZURE_RETRY_TOTAL + 1) read timeouts. The last word is taken back once it answers."""
    waited = 0.0
    said: str | None = None
    try:
        while True:
            await trio.sleep(STORAGE_WAIT_NOTE_S)
            waited += STORAGE_WAIT_NOTE_S
            said = (
                f"still waiting for Azure Blob Storage after {waited:.0f} s (each request: up to "
                f"{settings.azure_retry_total + 1} tries, {settings.azure_read_timeout_s:g} s read "
                "timeout each)"
            )
            log.warning("%s", said)
            progress.note_error(said)
    finally:
        if said is not None:
            progress.resolve_error(said)


def make_lanes(settings: Settings) -> Lanes:
    return Lanes(
        nfs=ThreadLane("nfs", settings.nfs_threads, stuck_after_s=settings.nfs_call_stuck_s),
        staging=ThreadLane("staging", max(4, settings.worker_concurrency)),
        azure=ThreadLane(
            "azure",
            settings.worker_concurrency * settings.azure_max_concurrency,
            stuck_after_s=settings.azure_read_timeout_s,
        ),
    )


class Service:
    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.layout = Layout(
            settings.nfs_incoming_dir, settings.nfs_processing_root, settings.local_staging_root
        )
        self.lanes = make_lanes(settings)
        self.progress = Progress()
        self.started_at = utc_now_iso()
        lanes = (self.lanes.nfs, self.lanes.staging, self.lanes.azure)
        self.metrics = Metrics.create(
            queue_depth=self.queue_depth,
            retry_waiting=lambda: self.progress.retry_waiting,
            claimed=lambda: len(self.progress.claimed),
            incoming=lambda: self.progress.incoming_files,
            stuck_calls=lambda: {lane.name: lane.stuck() for lane in lanes},
        )
        self.ready = False
        # The session state recovery read, shown by status until start-up is done (then the
        # session control's): the session that will resume, while the share is still worked.
        self._recovered_state: SessionState | None = None
        self.sessions: SessionControl | None = None
        self.drains: Drains | None = None
        self.store: BlobStore | None = None
        self._queue: trio.MemoryReceiveChannel[WorkItem] | None = None
        self._pipeline: Pipeline | None = None
        self._send: trio.MemorySendChannel[WorkItem] | None = None

    def queue_depth(self) -> int:
        # Also read by the metrics exporter's thread: a length read, safe under the GIL.
        return 0 if self._queue is None else self._queue.statistics().current_buffer_used

    def status(self) -> dict[str, object]:
        if not self.ready and self._recovered_state is not None:
            state = self._recovered_state
        else:
            state = self.sessions.state if self.sessions else SessionState()
        session = state.public()
        return {
            **session,
            "draining": self.draining(),
            "ready": self.ready,
            "queue_depth": self.queue_depth(),
            **self.progress.snapshot(),
            "nfs_calls": self.lanes.nfs.snapshot(),
            "staging_calls": self.lanes.staging.snapshot(),
            "azure_calls": self.lanes.azure.snapshot(),
            "staging": self._pipeline.space.snapshot() if self._pipeline else dict(StagingSpace.NOTHING),
        }

    def draining(self) -> list[str]:
        """The stopped sessions whose queued files are not all claimed yet (drain.py)."""
        return self.drains.names() if self.drains else []

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        async with trio.open_nursery() as root:
            # The API comes first, so /healthz answers while the rest starts.
            try:
                await root.start(partial(api.serve, api.create_app(self), settings))
            except (OSError, BaseExceptionGroup) as exc:
                cause = _first_os_error(exc)
                if cause is None:
                    raise
                raise StartupError(
                    f"cannot listen on {settings.host}:{settings.port} (APP_HOST/APP_PORT): "
                    f"{cause.strerror or cause}"
                ) from None
            # Before storage: a wrong folder is a mistake a user fixes, not worth an Azure wait.
            # Missing folders are made only once storage works too: a bad setting changes nothing.
            # What the folder checks say of a share that fails or hangs is true until start-up
            # has got through the steps that need the share (make_folders, the lock, recovery).
            folder_notes: list[str] = []

            def note_folder_problem(message: str) -> None:
                folder_notes.append(message)
                self.progress.note_error(message)

            missing = await check_folders(settings, self.lanes.nfs, note_error=note_folder_problem)
            async with trio.open_nursery() as waiting:
                waiting.start_soon(say_still_waiting_for_storage, settings, self.progress)
                self.store = await open_blob_store(settings, self.lanes)
                waiting.cancel_scope.cancel()
            try:
                await make_folders(settings, self.lanes.nfs, missing, note_error=note_folder_problem)
                # Before recovery: what is claimed under the processing root is the holder's.
                await root.start(
                    partial(
                        instance_lock.run,
                        timeout_s=settings.nfs_op_timeout_s,
                        on_replaced=self._processing_root_replaced,
                    ),
                    self.layout.lock_file, self.lanes.nfs, self.progress,
                )
                await self._start_pipeline(root)
                self.ready = True
                self._recovered_state = None
                for message in folder_notes:
                    self.progress.resolve_error(message)
                log.info("ready on %s:%d", settings.host, settings.port)
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self.ready = False
                self.store.close()

    def _processing_root_replaced(self) -> None:
        """The lock file went (the processing root renamed or removed, the share mounted
        again empty): the session state and the drains kept beside it went too, and a crash
        now would not resume the session. They are written again from memory."""
        problem = (
            f"{self.layout.lock_file} was removed or replaced while this service held it (the "
            "processing root moved, or the share was mounted again?); the session state and the "
            "drains of stopped sessions are written there again"
        )
        log.error("%s", problem)
        self.progress.note_error(problem)
        if self.sessions is not None:
            self.sessions.record_again()
        if self.drains is not None:
            self.drains.record_again()

    async def _start_pipeline(self, root: trio.Nursery) -> None:
        settings, layout, lanes = self.settings, self.layout, self.lanes
        assert self.store is not None
        recovered = await self._recover()
        # Claimed before GC's first sweep, which would otherwise see them as unowned.
        self.progress.claimed.update(recovered.unfinished)
        if recovered.state_problem is not None:
            self.progress.note_error(recovered.state_problem)
        try:
            if removed := await lanes.staging.run(gc.empty_staging, layout.staging_root):
                log.info("removed %d copies an earlier run left in staging", removed)
            if foreign := await lanes.staging.run(gc.foreign_in_staging, layout.staging_root):
                shown = ", ".join(repr(name) for name in foreign[:5])
                log.warning(
                    "APP_LOCAL_STAGING_ROOT (%s) holds %d entries that are not the service's (%s%s); "
                    "they are left alone, but a staging folder of its own is safer",
                    layout.staging_root, len(foreign), shown, ", ..." if len(foreign) > 5 else "",
                )
        except OSError as exc:  # a staging disk that refuses fails each copy, and says so
            log.warning("cannot empty the staging folder: %s", describe(exc))
        send, receive = trio.open_memory_channel[WorkItem](settings.max_queue_size)
        self._send, self._queue = send, receive
        self._pipeline = pipeline = Pipeline(
            settings=settings,
            layout=layout,
            lanes=lanes,
            store=self.store,
            progress=self.progress,
            metrics=self.metrics,
            retry_send=send.clone(),
        )
        await root.start(pipeline.run, receive)
        await root.start(
            partial(
                gc.run,
                send.clone(),
                layout=layout,
                lanes=lanes,
                progress=self.progress,
                interval_s=settings.gc_interval_s,
            )
        )
        self.drains = await root.start(Drains(layout, lanes.nfs, send.clone(), self.progress).run)
        control = SessionControl(
            layout, lanes.nfs, self._watch, drains=self.drains,
            nfs_timeout_s=settings.nfs_op_timeout_s,
            note_error=self.progress.note_error, resolve_error=self.progress.resolve_error,
        )
        self.sessions = await root.start(control.run)
        root.start_soon(self._feed_recovered, send.clone(), recovered.unfinished)
        root.start_soon(self._recall_quarantined)
        state = recovered.state
        if state.active:
            await control.resume(state)
        else:
            control.state = state
        root.start_soon(self.drains.catch_up)

    async def _recover(self) -> Recovered:
        """Recovery must finish before the service is ready; a failing share delays it. A
        state file this user may not read (for STATE_REFUSED_GIVE_UP_S) only costs the
        session's resumption: the claimed files are not held back for it."""
        delay = 0.5
        stored = None
        refused_since: float | None = None
        noted: str | None = None
        while True:
            try:
                if stored is None:
                    try:
                        stored = await read_stored_state(self.layout, self.lanes.nfs)
                    except PermissionError as exc:
                        refused_since = trio.current_time() if refused_since is None else refused_since
                        if trio.current_time() - refused_since < STATE_REFUSED_GIVE_UP_S:
                            raise
                        problem = (
                            f"session state {self.layout.state_file} cannot be read "
                            f"({describe(exc)}); no session resumed: let this user read it and "
                            "restart, or start a session, which replaces it"
                        )
                        log.error("%s", problem)
                        stored = (SessionState(), problem)
                    self._recovered_state = stored[0]
                recovered = await recover(self.layout, self.lanes.nfs, stored)
                if noted is not None:
                    self.progress.resolve_error(noted)  # no longer true
                return recovered
            except OSError as exc:
                noted = f"cannot read {self.layout.processing_root} for recovery: {describe(exc)}"
                log.error("%s; retrying in %.1f s", noted, delay)
                self.progress.note_error(noted)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)  # nothing works until recovery is done: keep trying

    async def _recall_quarantined(self) -> None:
        """Count the files an earlier run quarantined and list the last of them in status;
        after start-up, since a failed folder can be large."""
        try:
            found = await self.lanes.nfs.run(find_quarantined, self.layout, 100, self.started_at)
        except OSError as exc:
            log.warning("cannot read the failed folder: %s", describe(exc))
            self.progress.quarantined_before_recall = None
            return
        progress = self.progress
        since_start = list(progress.quarantined)
        # Files this run quarantined while the folder was being read were counted already.
        counted = found.since & (progress.quarantined_before_recall or set())
        progress.quarantined_before_recall = None
        progress.files_quarantined += found.count - len(counted)
        recent = [record for record in found.recent if record["path"] not in counted]
        progress.quarantined.clear()
        progress.quarantined.extend([*recent, *since_start])  # the last 100 of both

    async def _feed_recovered(
        self, send: trio.MemorySendChannel[WorkItem], unfinished: list[FileKey]
    ) -> None:
        async with send:
            for key in unfinished:
                await send.send(WorkItem(key, claimed=True))

    @untraced  # it runs for the session's life, not the starting request's
    async def _watch(
        self,
        date_prefix: str,
        session: str,
        *,
        offers: Offers | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        assert self._send is not None
        settings = self.settings
        try:
            await watcher.run(
                self._send.clone(),
                date_prefix=date_prefix,
                session=session,
                layout=self.layout,
                nfs=self.lanes.nfs,
                progress=self.progress,
                poll_interval_s=settings.poll_interval_s,
                min_file_age_s=settings.min_file_age_s,
                extensions=settings.file_extensions,
                offers=offers,
                task_status=task_status,
            )
        finally:
            # A stopped session's folder is not ours to report.
            self.progress.claims_failing = self.progress.entries_skipped = 0
            self.progress.incoming_files, self.progress.incoming_session = 0, None


def _first_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_os_error(inner)
            if found is not None:
                return found
    return None
