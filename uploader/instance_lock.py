"""One service per processing root: a lock held for the process's whole life.

Two services on one share (a Deployment scaled to 2, a second release pointed at the same
volume) would each recover the other's claimed files, upload them twice, count each other's
completions as failures and overwrite each other's session state. The lock is a POSIX
record lock (``fcntl``) on ``<processing root>/.uploader.lock`` (``Layout.lock_file``): NFS v4 carries it to the
server, so it holds across hosts, and the kernel releases it when the process ends, however
it ends (after a lost node, once the server's lease runs out, 90 s by default). A second
service waits for it, not ready, and says who holds it. Where the share has no locks
(ENOLCK: NFS v3 mounted ``nolock``), the service runs unprotected and says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from uploader.errors import Fatal, describe
from uploader.fileops import in_folder
from uploader.lanes import ThreadLane
from uploader.progress import Progress

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how often a waiting service tries again
CHECK_EVERY_S = 10.0  # how often the holder checks that its lock file is still the one there
NOTE_EVERY_S = 30.0  # how often it says it is still waiting
_HELD_ELSEWHERE = (errno.EAGAIN, errno.EACCES)  # what F_SETLK answers when another holds it


class HeldElsewhere(Exception):
    """Another process holds the lock; the message says who, as it wrote in the file."""


def still_there(path: Path, fd: int) -> bool:
    """Blocking: whether ``path`` is still the file ``fd`` holds locked. Someone removing or
    replacing it lets a second service lock a new file of that name beside this one."""
    held = os.fstat(fd)
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def holder_description() -> str:
    """Who this process is, for a second service's message: host (the pod), pid, start."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return f"{socket.gethostname()} pid {os.getpid()} since {started}"


_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


def take(path: Path) -> int:
    """Blocking: open ``path`` and lock it at once, or raise HeldElsewhere. Returns the open
    descriptor, which holds the lock until it is closed (or the process ends)."""
    fd = os.open(path, _OPEN_FLAGS, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _HELD_ELSEWHERE:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                raise HeldElsewhere(holder or "a process that has not said who it is") from None
            raise
        # Who holds it is for a second service's message only: a share failing the write
        # must not cost the lock, which is held already.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder_description()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_again(path: Path, held: int) -> tuple[int, bool]:
    """Blocking: lock ``path`` anew after a check found it removed or replaced. Returns the
    descriptor that holds the lock and whether it is the one held before: a check can miss a
    file that is there (NFS can answer ENOENT for a moment). Where it was such a miss, any
    descriptor opened here must stay open, since closing any descriptor of a file drops every
    POSIX lock this process holds on it; it is returned, and kept by the caller."""
    if still_there(path, held):
        return held, True
    try:
        locked: tuple[int, int] | None = _file_id(os.fstat(held))
    except OSError:
        locked = None  # the held file is gone for good (ESTALE): nothing of it to keep
    # Its folder too, where the processing root itself went (renamed, removed): the claims
    # to come make it again anyway, and the session state is written there again.
    fd = in_folder(path, lambda: os.open(path, _OPEN_FLAGS, 0o644))
    try:
        same = _file_id(os.fstat(fd)) == locked
    except BaseException:
        if locked is None:
            os.close(fd)  # cannot be the held file: closing it drops nothing
        raise  # (else fd stays open: it may be the held file's)
    if same:
        return fd, True
    os.close(fd)  # another file: closing it drops nothing of ours
    return take(path), False


def _explained(path: Path, exc: OSError) -> str:
    """``exc`` described, with the owner and mode of a lock file this user may not open (one
    an earlier run as another user left): "EACCES" alone reads as a passing failure."""
    if isinstance(exc, PermissionError):
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            return (
                f"this service (uid {os.geteuid()}) may not open it for writing (owner uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}): change its owner or mode, or "
                "remove it while no service runs"
            )
    return describe(exc)


def _file_id(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class _OneCall:
    """A blocking call in the NFS lane, sent once and waited for in slices. A call the share
    does not answer is never sent again beside itself: abandoned calls would pile up in the
    lane's threads, and a late ``take`` that fails closes its descriptor, which drops every
    lock this process holds on the file (POSIX locks belong to the process)."""

    def __init__(self, nursery: trio.Nursery, nfs: ThreadLane, fn: Callable[..., Any], *args: object) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: Exception | None = None
        nursery.start_soon(self._run, nfs, fn, args)

    async def _run(self, nfs: ThreadLane, fn: Callable[..., Any], args: tuple[object, ...]) -> None:
        try:
            self._value = await nfs.run(fn, *args)
        except Exception as exc:  # the waiter's to handle
            self._error = exc
        finally:
            self._done.set()

    async def answered_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self._done.wait()
        return self._done.is_set()

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


async def run(
    path: Path,
    nfs: ThreadLane,
    progress: Progress,
    *,
    timeout_s: float,
    on_replaced: Callable[[], None] = lambda: None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Take the lock at ``path``, waiting as long as another service holds it or the share
    fails or does not answer within ``timeout_s`` (logged now and then, and shown as the
    status's last error), then report started and hold it until cancelled. ``on_replaced``
    is called when the lock file was found removed or replaced, and locked again: whatever
    else the service keeps beside it (the session state) went the same way."""
    async with trio.open_nursery() as calls:
        fd = await _take(path, nfs, progress, timeout_s, calls)
        task_status.started()
        if fd is not None:
            await _hold(path, fd, nfs, timeout_s, calls, on_replaced)


async def _take(
    path: Path, nfs: ThreadLane, progress: Progress, timeout_s: float, calls: trio.Nursery
) -> int | None:
    """The descriptor that holds the lock, once it is free; None where the share has none."""
    last_note = -NOTE_EVERY_S
    noted: str | None = None
    call: _OneCall | None = None
    while True:
        call = call or _OneCall(calls, nfs, take, path)
        problem = f"cannot lock {path} now: no answer within {timeout_s:g} s; still waiting for it"
        if await call.answered_within(timeout_s):
            answered, call = call, None
            try:
                fd: int = answered.result()
                break
            except HeldElsewhere as exc:
                problem = (
                    f"another uploader holds {path} ({exc}); waiting for it to stop, since two "
                    "on one share would upload files twice and overwrite each other's session state"
                )
            except OSError as exc:
                if exc.errno == errno.ENOLCK:
                    log.warning(
                        "cannot lock %s: the share has no file locks (%s); nothing keeps a second "
                        "service off this processing root", path, describe(exc),
                    )
                    return None
                problem = f"cannot lock {path} now: {_explained(path, exc)}; trying again"
        if trio.current_time() - last_note >= NOTE_EVERY_S:
            log.warning("%s", problem)
            progress.note_error(problem)
            noted, last_note = problem, trio.current_time()
        if call is None:
            await trio.sleep(RETRY_S)
    if noted is not None:
        progress.resolve_error(noted)  # the wait is over
    return fd


async def _hold(
    path: Path, fd: int, nfs: ThreadLane, timeout_s: float, calls: trio.Nursery,
    on_replaced: Callable[[], None],
) -> None:
    """Check every CHECK_EVERY_S that ``path`` is still the file ``fd`` holds locked; lock a
    new one where it was removed or replaced. Raises Fatal when another service locked it
    first: this one stops, so that one service works the share. A share that fails or does
    not answer changes nothing: the pending call is waited for, and the next check tells."""
    pending: tuple[str, _OneCall] | None = None
    kept_open: list[int] = []  # descriptors of the held file that must not be closed before it
    try:
        while True:
            if pending is None or pending[0] == "check":
                # (A lock being taken again is waited for at once: until it is back, what the
                # service keeps beside it, the session state, is not written again.)
                await trio.sleep(CHECK_EVERY_S)
            kind, call = pending or ("check", _OneCall(calls, nfs, still_there, path, fd))
            pending = (kind, call)
            if not await call.answered_within(timeout_s):
                continue
            pending = None
            try:
                answer = call.result()
            except HeldElsewhere as exc:
                raise Fatal(
                    f"{path} was removed while this service held it, and another uploader "
                    f"locked it since ({exc}); stopping, so that one service works the share"
                ) from None
            except OSError:
                continue
            if kind == "check":
                if not answer:
                    pending = ("take", _OneCall(calls, nfs, take_again, path, fd))
                continue
            new_fd, same_file = answer
            if same_file:
                if new_fd != fd:
                    kept_open.append(new_fd)
                log.info("%s is still the file this service holds locked (a check missed it)", path)
                continue
            log.warning("%s was removed or replaced while this service held it; locked again", path)
            calls.start_soon(nfs.run, os.close, fd)  # the old file's lock, of no use now
            fd = new_fd
            on_replaced()
    finally:
        # Closing releases the lock, a call to the server that may hang with it: bounded,
        # and the process's end releases it anyway.
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for held in (*kept_open, fd):
                await nfs.run(os.close, held)
