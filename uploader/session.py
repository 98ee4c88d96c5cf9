"""The session: its state machine, kept on NFS across restarts, and the watcher's scope.

Starting a session creates its folders, records it, and starts the watcher in a cancel
scope of its own; stopping cancels only that scope, so workers drain what is queued.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import math
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from uploader import fileops
from uploader.drain import Drains
from uploader.errors import describe
from uploader.lanes import ThreadLane
from uploader.layout import (
    Layout,
    date_prefix,
    is_date_prefix,
    is_session_name,
    new_session_name,
    validate_new_session_name,
)
from uploader.telemetry import untraced

log = logging.getLogger(__name__)
T = TypeVar("T")


# How long a stop waits to record the state before it answers (then it goes on in the
# background).
STOP_SAVE_WAIT_S = 1.0
# How long a stop waits for its cancelled watcher to end (a step, unless the loop is stalled).
WATCHER_END_WAIT_S = 1.0
# The longest pause between the background tries to record the state: a stop made while the
# share hung is recorded within this of its return.
SAVE_RETRY_MAX_S = 10.0
STATE_WRITE = "state write"  # the kind of call (ThreadLane.run_alone): one at a time


class SessionConflict(Exception):
    pass


class NfsUnavailable(Exception):
    pass


class NfsRefused(NfsUnavailable):
    """The share refuses (a permission, a read-only mount): retrying will not help."""


@dataclass(frozen=True)
class SessionState:
    active: bool = False
    session_name: str | None = None
    date_prefix: str | None = None
    started_at: str | None = None
    stopped_at: str | None = None

    def public(self) -> dict[str, object]:
        return {
            "session_name": self.session_name,
            "date_prefix": self.date_prefix,
            "active": self.active,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
        }


def encode_state(state: SessionState) -> bytes:
    return json.dumps(asdict(state), indent=2).encode()


def _is_time_or_none(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def decode_state(raw: bytes) -> SessionState:
    """Parse the stored state; raises ValueError for anything that is not a state we wrote."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("session state is not a JSON object")
    name, date = data.get("session_name"), data.get("date_prefix")
    active = data.get("active", False)
    if not isinstance(active, bool):
        raise ValueError(f"stored active {active!r} is not true or false")
    for field_name in ("started_at", "stopped_at"):
        if not _is_time_or_none(data.get(field_name)):
            raise ValueError(f"stored {field_name} {data.get(field_name)!r} is not a time")
    if name is None and date is None:
        if active:
            raise ValueError("stored state is active but names no session")
        return SessionState()
    if not (isinstance(name, str) and is_session_name(name)):
        raise ValueError(f"stored session_name {name!r} is not a valid name")
    if not (isinstance(date, str) and is_date_prefix(date)):
        raise ValueError(f"stored date_prefix {date!r} is not YYYYMMDD")
    return SessionState(
        active=active,
        session_name=name,
        date_prefix=date,
        started_at=data.get("started_at"),
        stopped_at=data.get("stopped_at"),
    )


# The service writes a few hundred bytes; anything much larger is not its state.
MAX_STATE_BYTES = 64 * 1024


class BadStateFile(Exception):
    """The state file holds something the service did not write: it was moved aside."""


def _read_state_bytes(path: Path) -> bytes:
    """The file's bytes; ValueError where it is not a small regular file (a FIFO would block
    a plain read for ever, a link to a device would never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("it is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("it is not a regular file")
        if info.st_size > MAX_STATE_BYTES:
            raise ValueError(f"it holds {info.st_size} bytes, more than a session state ever does")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)


def read_state(path: Path) -> SessionState:
    """The stored state. One that cannot be used is moved aside (kept for a human, never
    overwritten by the next start) and BadStateFile says why; OSError when the share fails."""
    try:
        raw = _read_state_bytes(path)
    except FileNotFoundError:
        # Whether a session resumes hangs on this: believe "no such file" only if the
        # folder's listing agrees (an NFS lookup can miss for a moment).
        try:
            listed = path.name in os.listdir(path.parent)
        except FileNotFoundError:
            listed = False  # a first start: nothing there yet
        if listed:
            raise OSError(errno.EIO, "listed but cannot be opened", str(path)) from None
        return SessionState()
    except ValueError as exc:
        problem = str(exc)
    else:
        try:
            return decode_state(raw)
        except (ValueError, RecursionError) as exc:
            problem = str(exc) or type(exc).__name__
    aside = path.with_name(f"{path.name}.bad-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        # A lost NFS reply makes the retransmitted rename fail with ENOENT: done all the same.
        if not (isinstance(exc, FileNotFoundError) and os.path.lexists(aside)):
            raise BadStateFile(
                f"session state {path} could not be used ({problem}) nor moved aside "
                f"({describe(exc)}); no session resumed: remove or fix it"
            ) from None
    raise BadStateFile(
        f"session state {path} could not be used ({problem}); no session resumed, "
        f"the file was kept as {aside.name}"
    )


def _make_session_folders(layout: Layout, date: str, name: str) -> bool:
    """Make a session's folders; True when its incoming folder was made here (not there
    before), so that a start that fails after all can take it away again."""
    incoming = layout.incoming_dir(name)
    try:
        made = fileops.make_session_folder(incoming)
    except NotADirectoryError as exc:
        raise SessionConflict(
            f"{incoming} exists but {exc.strerror}; remove it or choose another session name."
        ) from None
    try:
        # One there already (made by an administrator, or by another user) that the watcher
        # could not list would start a session that reads nothing.
        fileops.check_listable(incoming)
        os.makedirs(layout.processing_dir(date, name), exist_ok=True)
    except OSError:
        if made:  # a start that fails leaves no folder for a session that never was
            with contextlib.suppress(OSError):
                os.rmdir(incoming)
        raise
    # Only a convenience: workers make staging folders as they need them, and a staging disk
    # that refuses for a while (read-only, say) fails, counts and retries each file; it is
    # no reason to refuse the session, nor NFS's fault.
    with contextlib.suppress(OSError):
        os.makedirs(layout.staging_dir(date, name), exist_ok=True)
    return made


class StateFile:
    """The session state on NFS, written in the order the writes were asked for (a write
    abandoned by a timeout must not put an older state back)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writes = fileops.OrderedWrites(path)

    def writer(self, state: SessionState) -> Callable[[], None]:
        """The blocking write of ``state``, numbered now (on the event loop), for a thread."""
        return self._writes.writer(encode_state(state))


# The watcher of one session, as the service wires it: (date_prefix, session, task_status).
WatchFn = Callable[..., Awaitable[None]]


class SessionControl:
    """Owns the session state and the watcher's cancel scope. Start and stop are serialised."""

    def __init__(
        self,
        layout: Layout,
        nfs: ThreadLane,
        watch: WatchFn,
        *,
        drains: Drains | None = None,
        nfs_timeout_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        note_error: Callable[[str], None] = lambda message: None,
        resolve_error: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.layout = layout
        self._note_error, self._resolve_error = note_error, resolve_error  # the status's last_error
        self._unrecorded: str | None = None  # the problem noted while a stop is not recorded
        self.nfs = nfs
        self._watch = watch
        self._drains = drains
        # Drain records asked for by stops and not on NFS yet: no state is written before
        # them, or a restart could find a session stopped and nothing to say what it queued.
        self._drains_pending: list[trio.Event] = []
        self._nfs_timeout_s = nfs_timeout_s
        self._clock = clock
        self.state = SessionState()
        self._state_file = StateFile(layout.state_file)
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._watcher_ended = trio.Event()
        self._saving_in_background = False
        # Starts carried through, by session name: a folder a given-up start made late is
        # removed only if no session of its name started since.
        self._starts: collections.Counter[str] = collections.Counter()

    async def run(self, *, task_status: trio.TaskStatus[SessionControl] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    async def start(self, requested_name: object | None = None) -> SessionState:
        """Start a session; raises InvalidSessionName, SessionConflict, NfsRefused or
        NfsUnavailable, all within APP_NFS_OP_TIMEOUT_S of the call."""
        name = new_session_name() if requested_name is None else validate_new_session_name(requested_name)
        return await self._to_the_end(self._start, name, self._deadline())

    async def stop(self, expected_name: str | None = None) -> SessionState:
        """Stop the active session's watcher (the workers drain the queue); the state after.
        With ``expected_name``, only that session: SessionConflict when another one is the
        session of the moment (a stop meant for a session that ended, and a newer one started
        since, must not stop the newer one). NfsUnavailable when the session state cannot be
        had within APP_NFS_OP_TIMEOUT_S (an earlier start or stop still holds it)."""
        return await self._to_the_end(self._stop, expected_name, self._deadline())

    def _deadline(self) -> float:
        # A client is answered within APP_NFS_OP_TIMEOUT_S of asking, whatever it waits for:
        # the lock (held by a start or a background write on a hung share) included.
        return trio.current_time() + self._nfs_timeout_s

    @contextlib.asynccontextmanager
    async def _locked(self, deadline: float) -> AsyncIterator[None]:
        """The lock that serialises starts, stops and state writes, or NfsUnavailable when it
        is not free by ``deadline``: whoever holds it is waiting for the share."""
        acquired = False
        with trio.move_on_at(deadline):
            await self._lock.acquire()
            acquired = True
        if not acquired:
            raise NfsUnavailable(
                f"the NFS share did not answer within {self._nfs_timeout_s:g} s (an earlier start or "
                "stop, or a write of the session state, is still waiting for it)."
            )
        try:
            yield
        finally:
            self._lock.release()

    async def _to_the_end(self, operation: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``operation`` in this control's own nursery and wait for its outcome. A caller
        that goes away (a client hanging up cancels its request) must not leave a start or a
        stop half done: the state recorded on NFS, not in memory, nor the watcher started."""
        assert self._nursery is not None
        done = trio.Event()
        result: list[T] = []
        failure: list[Exception] = []

        async def run() -> None:
            try:
                result.append(await operation(*args))
            except Exception as exc:  # the caller's to handle, not the nursery's
                failure.append(exc)
            finally:
                done.set()

        self._nursery.start_soon(run)
        await done.wait()
        if failure:
            raise failure[0]
        if not result:  # cancelled with the whole service
            raise NfsUnavailable("the service is shutting down.")
        return result[0]

    async def _start(self, name: str, deadline: float) -> SessionState:
        async with self._locked(deadline):
            if self.state.active:
                raise SessionConflict(
                    f"session {self.state.session_name!r} is already active; stop it first."
                )
            now = self._clock()
            state = SessionState(True, name, date_prefix(now), now.isoformat(timespec="seconds"))
            made = await self._make_folders(state, deadline)
            try:
                await self._save(state, deadline)
            except (NfsUnavailable, NfsRefused):
                # The write given up on may still land, in its thread: the start failed, so
                # the state as it is goes over it (writes take turns), or a restart would
                # resume a session the client was told did not start.
                self._keep_saving()
                if made:
                    ended = trio.Event()
                    ended.set()
                    self._remove_unused_later(name, ended, [made])
                raise
            await self._start_watcher(state)
            self._starts[name] += 1
            log.info("session %s started", name, extra={"session": name})
            return state

    async def _make_folders(self, state: SessionState, deadline: float) -> bool:
        """Make the session's folders by ``deadline`` (True: its incoming folder was made
        now), or NfsUnavailable. The call given up on goes on in its thread: an incoming
        folder it makes after the client was told the session did not start is removed again."""
        assert self._nursery is not None and state.date_prefix is not None and state.session_name is not None
        done = trio.Event()
        outcome: list[bool] = []
        failure: list[Exception] = []

        async def make() -> None:
            try:
                outcome.append(await self._on_nfs(
                    _make_session_folders, self.layout, state.date_prefix, state.session_name, deadline=math.inf
                ))
            except Exception as exc:  # for the start to raise, not the nursery
                failure.append(exc)
            finally:
                done.set()

        self._nursery.start_soon(make)
        with trio.move_on_at(deadline):
            await done.wait()
        if failure:
            raise failure[0]
        if not done.is_set():
            self._remove_unused_later(state.session_name, done, outcome)
            raise NfsUnavailable(f"the NFS share did not answer within {self._nfs_timeout_s:g} s.")
        if not outcome:  # cancelled with the whole service
            raise NfsUnavailable("the service is shutting down.")
        return outcome[0]

    def _remove_unused_later(self, name: str, ended: trio.Event, outcome: list[bool]) -> None:
        """In the background: remove the incoming folder of a start that failed, once the
        making of its folders has ``ended``, if that made it (``outcome`` is [True])."""
        assert self._nursery is not None
        self._nursery.start_soon(self._remove_unused, name, ended, outcome, self._starts[name])

    @untraced
    async def _remove_unused(self, name: str, ended: trio.Event, outcome: list[bool], starts: int) -> None:
        """Remove the incoming folder a failed start made, if it is still empty and no session
        of that name started since: a folder of a session that never started would mislead
        whoever drops files there (they would wait for uploads that never come)."""
        await ended.wait()
        if outcome != [True]:
            return  # it failed, or the folder was there before (someone made it for the session)
        async with self._lock:
            if self._starts[name] != starts:
                return
            folder = self.layout.incoming_dir(name)
            with trio.move_on_after(self._nfs_timeout_s), contextlib.suppress(OSError):
                # rmdir: only an empty folder goes; one holding a file already stays.
                await self.nfs.run(os.rmdir, folder)
                log.info("removed %s, made by a start that had answered 503 already", folder)

    async def resume(self, state: SessionState) -> None:
        """Restart the watcher of a session that was active before the restart."""
        async with self._lock:
            assert state.active and not self.state.active
            await self._start_watcher(state)
            log.info("session %s resumed", state.session_name, extra={"session": state.session_name})

    async def _stop(self, expected_name: str | None, deadline: float) -> SessionState:
        async with self._locked(deadline):
            if expected_name is not None and expected_name != self.state.session_name:
                now = (
                    f"{self.state.session_name!r} is" if self.state.active
                    else "no session is"
                )
                raise SessionConflict(
                    f"session {expected_name!r} is not the active session ({now}); nothing was stopped."
                )
            if not self.state.active:
                return self.state  # stopped already: a stop asked again gets the same answer
            if self._scope is not None:
                self._scope.cancel()
                self._scope = None
                # A watcher waiting to queue a file is cancelled at its next step, not here:
                # until it has ended, that file would count as queued in the drain below.
                with trio.move_on_after(WATCHER_END_WAIT_S):
                    await self._watcher_ended.wait()
            stopped = SessionState(
                False,
                self.state.session_name,
                self.state.date_prefix,
                self.state.started_at,
                self._clock().isoformat(timespec="seconds"),
            )
            self.state = stopped
            # Recorded before the answer, so a crash right after it cannot resume the
            # session; a hung share must not hold the answer up for long, though.
            saved = False
            if self._drains is not None:
                # What its watcher queued and no worker claimed yet, on record first: a
                # restart must not leave it in the folder of a stopped session.
                assert stopped.date_prefix is not None and stopped.session_name is not None
                self._drains_pending.append(self._drains.record(stopped.date_prefix, stopped.session_name))
            with trio.move_on_after(min(self._nfs_timeout_s, STOP_SAVE_WAIT_S)):
                with contextlib.suppress(NfsUnavailable, NfsRefused):
                    await self._save(stopped)
                    saved = True
            if not saved:
                problem = (
                    f"session {stopped.session_name} is stopped, but the stop is not recorded on "
                    "NFS yet: a restart before it is would resume the session"
                )
                log.error("%s; retrying", problem)
                self._note_error(problem)
                self._unrecorded = problem
                self._keep_saving()
            log.info("session %s stopped", stopped.session_name, extra={"session": stopped.session_name})
            return stopped

    async def _start_watcher(self, state: SessionState) -> None:
        assert self._nursery is not None
        self._scope = await self._nursery.start(self._watch_in_scope, state)
        self.state = state

    async def _watch_in_scope(
        self, state: SessionState, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        self._watcher_ended = ended = trio.Event()
        try:
            with contextlib.ExitStack() as stack, trio.CancelScope() as scope:
                watch = partial(self._watch, state.date_prefix, state.session_name)
                if self._drains is not None:
                    assert state.date_prefix is not None and state.session_name is not None
                    offers = stack.enter_context(self._drains.watching(state.date_prefix, state.session_name))
                    watch = partial(watch, offers=offers)
                async with trio.open_nursery() as nursery:
                    await nursery.start(watch)
                    task_status.started(scope)
        finally:
            ended.set()

    def record_again(self) -> None:
        """Write the session state again (in the background, until it is): the file that
        held it was lost with its folder."""
        self._keep_saving()

    def _keep_saving(self) -> None:
        """Record the current state in the background until it is. One loop at a time, as it
        always writes the state of the moment: a client retrying starts against a hung share
        must not add a loop, and an abandoned write in a thread, per try."""
        if not self._saving_in_background:
            self._saving_in_background = True
            assert self._nursery is not None
            self._nursery.start_soon(self._save_in_background)

    @untraced
    async def _save_in_background(self) -> None:
        try:
            await self._save_until_recorded()
        finally:
            self._saving_in_background = False

    async def _save_until_recorded(self) -> None:
        delay = 1.0
        while True:
            async with self._lock:
                try:
                    await self._save(self.state)
                    log.info("session state recorded at last: %s", "active" if self.state.active else "stopped")
                    if self._unrecorded is not None:
                        self._resolve_error(self._unrecorded)
                        self._unrecorded = None
                    return
                except (NfsUnavailable, NfsRefused) as exc:
                    # The reason is written as a sentence: its full stop does not go inside brackets.
                    reason = str(exc).removesuffix(".")
                    log.error("cannot record the session state (%s); retrying in %.0f s", reason, delay)
            held = self.nfs.alone_running(STATE_WRITE)
            with trio.move_on_after(delay):
                if held is not None:
                    # A write the share still holds (maybe of an older state: a start it gave
                    # up on): once it lands, the state of the moment goes over it at once.
                    await held.wait()
                else:
                    await trio.sleep_forever()
            delay = min(delay * 2, SAVE_RETRY_MAX_S)

    async def _save(self, state: SessionState, deadline: float | None = None) -> None:
        """Record ``state``, by ``deadline`` (default: APP_NFS_OP_TIMEOUT_S from now), or
        NfsUnavailable / NfsRefused."""
        if deadline is None:
            deadline = self._deadline()
        with trio.move_on_at(deadline):
            for written in list(self._drains_pending):
                await written.wait()
        self._drains_pending = [written for written in self._drains_pending if not written.is_set()]
        if self._drains_pending:
            raise NfsUnavailable(
                f"the NFS share did not take the record of a stopped session's queue within "
                f"{self._nfs_timeout_s:g} s."
            )
        # One write at a time: one abandoned on a hung share holds its thread until the share
        # answers, and the starts and stops a client retries meanwhile would each add one.
        await self._on_nfs(self._state_file.writer(state), deadline=deadline, alone=STATE_WRITE)

    async def _on_nfs(
        self, fn: Callable[..., T], *args: object, deadline: float | None = None, alone: str | None = None
    ) -> T:
        """``fn`` in the NFS lane, its OSErrors as NfsRefused or NfsUnavailable; given up on
        at ``deadline`` (default: APP_NFS_OP_TIMEOUT_S from now; math.inf: never). ``alone``:
        after the last call of that kind has returned (waiting for it counts in the time)."""
        if deadline is None:
            deadline = self._deadline()
        try:
            with trio.fail_at(deadline):
                if alone is None:
                    return await self.nfs.run(fn, *args)
                # After the one before, which a slow share may still be carrying out.
                return await self.nfs.run_alone(alone, fn, *args)
        except trio.TooSlowError:
            raise NfsUnavailable(
                f"the NFS share did not answer within {self._nfs_timeout_s:g} s."
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise NfsRefused(f"the NFS share refuses it: {describe(exc)}.") from None
            raise NfsUnavailable(f"the NFS share failed: {describe(exc)}.") from None
