"""The blocking filesystem steps of a file's journey. Each runs in a worker thread.

Claiming uses ``link()`` + ``unlink()``: a rename onto a name that is still in flight would
silently replace the older file, while ``link()`` fails with EEXIST, on NFS too. A crash
between the two leaves the same inode under both names, which ``same_file`` recognises, so
the next claim or the recovery finishes the job. Only where the kernel refuses the link (a
file of another user under ``fs.protected_hardlinks``) is the file renamed, after checking
that its name is free.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import hashlib
import itertools
import json
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from opentelemetry import trace

from uploader.errors import (
    NotARegularFile,
    SourceChanged,
    SourceVanished,
    describe,
    is_benign_race,
)
from uploader.layout import name_with_suffix, reason_file_name

T = TypeVar("T")
_tracer = trace.get_tracer(__name__)
COPY_CHUNK = 1024 * 1024
MAX_BLOCKS_PER_BLOB = 50_000  # Azure's limit for a block blob


class Claim(enum.Enum):
    CLAIMED = "claimed"
    # The other half of an interrupted claim (the file under both names): only the name left
    # in incoming was removed. Whoever holds the claimed file uploads it.
    FINISHED = "an interrupted claim finished"
    GONE = "gone"  # taken or deleted by someone else: nothing to do
    # An older file of that name, or named like one of its folders, or files in a folder of
    # its name, are still in flight.
    BUSY = "a file of this name, of one of its folders or in a folder of its name is still in flight"
    CHANGED = "changed"  # changed since the watcher found it stable: still being written
    # The claim's call failed (an OSError: the worker's outcome, never returned here); the
    # file stays in incoming and is offered again.
    FAILED = "failed"


class ScanEntry(NamedTuple):
    # A tuple, not a dataclass: a scan makes one per file, 100,000 of them for a big folder.
    rel: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Scan:
    entries: list[ScanEntry]
    # Entries left out that a user should know of, one line each: those that could not be
    # read this time, and FIFOs, sockets and devices (never read: a read could block for ever).
    skipped: list[str]


def list_files(root: Path, extensions: tuple[str, ...] = ()) -> Scan:
    """List the regular files below ``root``, recursively; FileNotFoundError if it is missing.

    Symlinks are never followed: nothing outside the folder is ever read. Each folder is
    opened from its parent's descriptor without following a link, so a folder replaced by a
    link while we look is left out rather than entered. An entry that vanishes or goes stale
    while we look (ENOENT, ESTALE) is skipped; the next scan sees it again if it still exists.
    """
    entries: list[ScanEntry] = []
    skipped: list[str] = []
    device = -1  # the session folder's file system

    def left_out(exc: OSError, rel: str) -> None:
        if not is_benign_race(exc):
            exc.filename = os.path.join(root, rel)  # the whole path, not the name in its folder
            skipped.append(describe(exc))

    def list_folder(fd: int, prefix: str) -> list[str]:
        """List one open folder; returns its sub-folders' names."""
        folders: list[str] = []
        with os.scandir(fd) as iterator:
            for entry in iterator:
                rel = prefix + entry.name
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    left_out(exc, rel)
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if info.st_dev != device:
                        # A claim is a link() within one file system: its files never could be.
                        skipped.append(f"{os.path.join(root, rel)} is another file system mounted "
                                       "in the session folder, whose files cannot be claimed")
                        continue
                    folders.append(entry.name)
                elif stat.S_ISREG(info.st_mode):
                    if extensions and not entry.name.lower().endswith(extensions):
                        continue
                    entries.append(ScanEntry(rel, info.st_size, info.st_mtime_ns))
                elif stat.S_ISLNK(info.st_mode):
                    continue  # never followed, by design
                elif not extensions or entry.name.lower().endswith(extensions):
                    skipped.append(f"{os.path.join(root, rel)} is a FIFO, socket or device, never uploaded")
        return folders

    # Depth first, so that only one descriptor per level of the tree is open at a time. An
    # entry leaves the stack before its descriptor is closed: never closed twice.
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append((os.open(root, _FOLDER_LIST), "", []))
        try:
            device = os.fstat(stack[-1][0]).st_dev
            stack[-1][2].extend(list_folder(stack[-1][0], ""))
        except OSError as exc:
            exc.filename = str(root)  # not the descriptor, which the error would name
            raise
        while stack:
            fd, prefix, folders = stack[-1]
            if not folders:
                stack.pop()
                os.close(fd)
                continue
            rel = prefix + folders.pop()
            try:
                inner = os.open(os.path.basename(rel), _FOLDER_LIST, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # now a link or a file
                    left_out(exc, rel)
                continue
            stack.append((inner, rel + "/", []))
            try:
                stack[-1][2].extend(list_folder(inner, rel + "/"))
            except OSError as exc:
                stack.pop()
                os.close(inner)
                left_out(exc, rel)
    except BaseException:
        for fd, _, _ in reversed(stack):
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return Scan(entries, skipped)


_FOLDER_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_session_folder(path: Path) -> bool:
    """Make a session's incoming folder, unless it is there already as a real folder; True
    if it was made. Its parent, the incoming root, is never made: one gone (a share not
    mounted, a root renamed) is a FileNotFoundError, not a new empty root nobody drops into.

    NotADirectoryError when something else has its name: through a symbolic link, the
    session would read, upload and delete files outside incoming/.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        try:
            os.mkdir(path)
            return True
        except FileExistsError:
            mode = os.lstat(path).st_mode  # made meanwhile: check what it is
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "the incoming root is gone (a share not mounted? renamed?)", str(path.parent)
            ) from None
    if not stat.S_ISDIR(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
        raise NotADirectoryError(errno.ENOTDIR, f"it is {what}, and only a real folder is read", str(path))
    return False


def check_listable(folder: Path) -> None:
    """PermissionError unless this user may list ``folder`` and reach what is in it."""
    os.close(os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
    if not os.access(folder, os.X_OK, effective_ids=True):
        raise PermissionError(errno.EACCES, "Permission denied (no search permission)", str(folder))


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def in_folder(path: Path, operation: Callable[[], T], *, attempts: int = 4) -> T:
    """Run ``operation``, creating ``path``'s folder when it is missing.

    GC removes empty folders while workers run; whoever needs a folder makes it again.
    """
    for _ in range(attempts - 1):
        try:
            return operation()
        except FileNotFoundError:
            # GC may also remove a parent just made while makedirs makes the rest: the next
            # round makes it again.
            with contextlib.suppress(FileNotFoundError):
                os.makedirs(path.parent, exist_ok=True)
    return operation()


def instead_of_an_empty_folder(path: Path, make: Callable[[], T]) -> T:
    """Run ``make``, which puts a file at ``path`` in one of the service's own trees (staging,
    completed). Where a folder has that name, left by the files that were in it ("a/b" done,
    now the file "a") until GC's sweep removes it, the folder goes and ``make`` runs again;
    a folder that still holds files (their cleanup is not done yet) fails the attempt with
    EBUSY, which is retried.
    """
    try:
        return make()
    except IsADirectoryError:
        try:
            os.rmdir(path)  # only if empty
        except FileNotFoundError:
            pass  # GC's sweep took it meanwhile
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OSError(errno.EBUSY, "a folder of this name still holds files", str(path)) from None
            raise
        return make()


# link() refused for the file, not the name: fs.protected_hardlinks (on by default) lets only
# a file's owner link it, and some file systems have no hard links.
_LINK_REFUSED = frozenset({errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP})
# unlink() refused: the file is still there.
_UNLINK_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def move_no_clobber(
    source: Path | str, target: Path, before: os.stat_result, *, source_dir_fd: int | None = None
) -> bool:
    """Give ``source`` (as ``before`` found it; a name in the folder ``source_dir_fd`` when
    given) the name ``target`` too, never replacing a file already there (FileExistsError).
    True if ``source`` is gone (renamed), False if it is still there, linked (the caller
    unlinks it).

    Where the kernel will not link the file, it is renamed once the name is free: only this
    service writes those folders, and one name is never moved twice at once.
    """
    try:
        in_folder(
            target,
            lambda: os.link(source, target, src_dir_fd=source_dir_fd, follow_symlinks=False),
        )
        return False
    except OSError as exc:
        if exc.errno not in _LINK_REFUSED:
            raise
    if exists(target):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    try:
        in_folder(target, lambda: os.rename(source, target, src_dir_fd=source_dir_fd))
    except FileNotFoundError:
        # On NFS, a rename retransmitted after it was done answers ENOENT.
        if not _is(target, before):
            raise
    return True


def _move_in(name: str, target: Path, before: os.stat_result, folder: int) -> bool:
    """``move_no_clobber`` into the processing folder, where an empty folder of the target's
    name (left by the files that were in it, "a/b" done, now the file "a") is removed first
    rather than waited for until GC's sweep."""
    try:
        return move_no_clobber(name, target, before, source_dir_fd=folder)
    except FileExistsError:
        try:
            os.rmdir(target)  # only an empty folder: a file, or a folder in use, stays
        except FileNotFoundError:
            pass  # GC's sweep took it meanwhile
        except OSError:
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        return move_no_clobber(name, target, before, source_dir_fd=folder)


def _as_found(path: Path, before: os.stat_result, expected: tuple[int, int]) -> bool:
    """Whether ``path`` is still the file ``before`` describes, with the (size, mtime_ns)
    that was found stable."""
    now = os.lstat(path)
    return same_file(now, before) and (now.st_size, now.st_mtime_ns) == expected


def _file_on_the_way(path: Path) -> bool:
    """Whether the nearest existing folder of ``path``'s folders is a regular file."""
    for folder in path.parents:
        try:
            return stat.S_ISREG(os.lstat(folder).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


def exists(path: Path) -> bool:
    """Whether something has the name ``path``. Unlike ``os.path.lexists``, only "no such
    file" is an answer: a share failing the lookup (EIO, ESTALE) raises, never says "free"."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def holds(path: Path, file: os.stat_result | None) -> bool:
    """Whether ``path`` is the file ``file`` describes (any file, for None); a share failing
    the lookup raises, never says no."""
    return exists(path) if file is None else _is(path, file)


def _is(path: Path | str, before: os.stat_result, *, dir_fd: int | None = None) -> bool:
    try:
        return same_file(os.lstat(path, dir_fd=dir_fd), before)
    except (FileNotFoundError, NotADirectoryError):  # (a file now holds a folder's name)
        return False


_FOLDER_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_folder_within(root: Path, folders: Sequence[str]) -> int:
    """A file descriptor (O_PATH) of ``root/folders[0]/folders[1]/...``, opened one folder at
    a time without following a symbolic link: a folder on the way that someone replaced by a
    link fails (ENOTDIR), where a path would lead outside ``root``. ``root`` itself is the
    operator's setting and may be reached through links."""
    fd = os.open(root, _FOLDER_WALK & ~os.O_NOFOLLOW)
    try:
        for name in folders:
            fd, outer = os.open(name, _FOLDER_WALK, dir_fd=fd), fd
            os.close(outer)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def claim(source: Path, target: Path, expected: tuple[int, int] | None, within: Path) -> Claim:
    """Move ``source`` (incoming) to ``target`` (processing) without clobbering ``target``.

    Every folder between ``within`` (the incoming root) and ``source`` must still be a real
    folder: one replaced by a symbolic link since the scan would lead to files outside
    incoming, which are never read, nor deleted. The file is then gone, as far as we know.
    """
    *folders, name = source.relative_to(within).parts
    try:
        folder = open_folder_within(within, folders)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE, errno.ENOTDIR, errno.ELOOP):
            return Claim.GONE
        raise
    try:
        return _claim_in(folder, name, source, target, expected)
    except OSError as exc:
        if exc.filename == name:
            exc.filename = os.fspath(source)  # the whole path, for logs and status
        if exc.errno in (errno.EACCES, errno.EPERM) and (why := why_refused(source, target)) is not None:
            raise type(exc)(exc.errno, why[1], why[0]) from None
        raise
    finally:
        os.close(folder)


def why_refused(*paths: Path) -> tuple[str, str] | None:
    """Blocking: (path, why) for the first of ``paths`` that this user may not move or
    create: its folder not writable, or sticky with the file another user's. "EACCES on
    'a' -> 'b'" names two paths and no cause; an operator needs the folder, its owner and
    mode, and who the service runs as."""
    uid = os.geteuid()
    for path in paths:
        folder = path.parent
        try:
            info = os.stat(folder)
        except OSError:
            continue
        said = f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}; this service runs as uid {uid}"
        if not os.access(folder, os.W_OK | os.X_OK):
            mode_allows = uid == 0 or (info.st_uid == uid and info.st_mode & stat.S_IWUSR)
            return os.fspath(folder), f"this folder is not writable by this service ({said})" + (
                ", though its mode allows it: an immutable attribute, an ACL, a read-only mount "
                "or NFS root squashing refuses it" if mode_allows else ""
            )
        if info.st_mode & stat.S_ISVTX and info.st_uid != uid:
            try:
                owner = os.lstat(path).st_uid
            except OSError:
                continue
            if owner != uid:
                return os.fspath(path), (
                    f"its folder is sticky ({said}) and the file belongs to uid {owner}: only "
                    "its owner or the folder's may move it"
                )
    return None


def _claim_in(
    folder: int, name: str, source: Path, target: Path, expected: tuple[int, int] | None
) -> Claim:
    """``claim`` of the file ``name`` in the open ``folder``."""
    try:
        before = os.lstat(name, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            return Claim.GONE
        raise
    if not stat.S_ISREG(before.st_mode):
        return Claim.GONE
    if expected is not None and (before.st_size, before.st_mtime_ns) != expected:
        return Claim.CHANGED
    # A file this user may not read (an instrument writing 0600 as its own user) stays in
    # incoming, its claim failing until someone fixes its mode: claimed, it could only be
    # quarantined. Closed before the link, or NFS would keep the unlinked name as .nfsXXXX.
    try:
        readable = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE, errno.ELOOP):
            return Claim.GONE  # gone, or a symbolic link now
        raise
    os.close(readable)
    linked_now = False
    try:
        if _move_in(name, target, before, folder):
            return Claim.CLAIMED
        linked_now = True
    except FileExistsError:
        if not _is(target, before):
            return Claim.BUSY  # (or it just left; the next scan claims this one)
        # Same inode: an earlier claim stopped between link and unlink.
    except FileNotFoundError:
        return Claim.GONE
    except NotADirectoryError:
        # The source is a name in an open folder: a folder of the target's path is a file in
        # flight ("a" still going up, now "a/b"); it leaves once done, like a file of this name.
        if not _file_on_the_way(target):
            raise
        return Claim.BUSY
    if linked_now and expected is not None and not _as_found(target, before, expected):
        # Rewritten, or replaced by a rename, between the check above and the link: not the
        # file that was found stable. Its link goes; it stays in incoming until it is.
        os.unlink(target)
        return Claim.CHANGED
    claimed = Claim.CLAIMED if linked_now else Claim.FINISHED
    # The name is unlinked, not the file: a writer that renamed a new version onto it since
    # the link (the checks above take NFS round trips) would lose that version with it. So
    # the name is looked at once more, just before; the claim stands either way, and a new
    # version stays in incoming for its own turn. No unlink is conditional on the inode, so
    # a window of one round trip remains.
    if not _is(name, before, dir_fd=folder):
        return claimed
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Refused (a folder we may not write to): the file stays in incoming, so the link
        # made just now is taken back, or the copy left there would be claimed and uploaded
        # again after this one. After other errors the unlink may have been done (NFS):
        # the claim stands, and the next offer finishes it (same inode).
        if linked_now and exc.errno in _UNLINK_REFUSED and _is(name, before, dir_fd=folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        raise
    return claimed


@dataclass(frozen=True)
class StagedFile:
    path: Path
    size: int
    mtime_ns: int  # of the NFS file the copy was made from
    # Its ctime then: a writer can set the mtime back (touch -r, rsync -t), never the ctime.
    # Only comparable from the claim on, which changed it (link, unlink).
    ctime_ns: int
    md5: bytes
    block_size: int
    block_md5s: tuple[bytes, ...]

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)


class _WholeFileHash:
    """The whole file's MD5, computed beside the per-block MD5s.

    For a large file, in a thread of its own: hashlib lets go of the GIL, so the two MD5s
    of every byte run on two cores instead of one after the other.
    """

    def __init__(self, *, in_background: bool) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._chunks: queue.Queue[bytes | None] | None = None
        if in_background:
            self._chunks = queue.Queue(maxsize=16)  # at most 16 chunks (16 MiB) behind
            self._thread = threading.Thread(target=self._run, name="whole-file-md5", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._chunks is not None
        while (chunk := self._chunks.get()) is not None:
            self._md5.update(chunk)

    def update(self, chunk: bytes) -> None:
        if self._chunks is None:
            self._md5.update(chunk)
        else:
            self._chunks.put(chunk)

    def digest(self) -> bytes:
        if self._chunks is not None:
            self._chunks.put(None)
            self._thread.join()
        return self._md5.digest()


def _find_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter uses
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the staging copy stays in the page cache until it is removed
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _find_sync_file_range()
# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
# What a file system without it answers; anything else is a real write error.
_NOT_SUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE})


class _WriteBehind:
    """Writes a large staging copy back to disk block by block, and drops each block from the
    page cache once it is on disk.

    Without it, a 2 GiB file sits in 2 GiB of page cache until its blob is committed: memory
    the kernel charges to the pod's cgroup, and that a VM must find fresh pages for (on the
    benchmark's VM, writing into fresh pages cost 4.5 CPU s per GiB against 0.6 into pages
    the kernel had just freed). Blocks still to be sent are read back from disk. Where the
    file system does not do it, the copy behaves as a plain one; a write error it reports
    fails the copy. The final fsync is what makes the copy durable either way.
    """

    LAG = 2  # blocks between starting a block's write-back and waiting for it

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._written: list[tuple[int, int]] = []
        self._enabled = _sync_file_range is not None

    def block_written(self, offset: int, length: int) -> None:
        if not self._enabled:
            return
        if not self._sync(offset, length, _WRITE):
            return
        self._written.append((offset, length))
        if len(self._written) > self.LAG:
            old_offset, old_length = self._written.pop(0)
            if self._sync(old_offset, old_length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER):
                drop_from_page_cache(self._fd, old_offset, old_length)

    def _sync(self, offset: int, length: int, flags: int) -> bool:
        """One sync_file_range call; False where the file system does not do it.

        A write error is raised, never passed over: the kernel reports it once per file,
        so once this call has seen it, the final fsync would return success.
        """
        assert _sync_file_range is not None
        if _sync_file_range(self._fd, offset, length, flags) == 0:
            return True
        code = ctypes.get_errno()
        if code in _NOT_SUPPORTED:
            self._enabled = False
            return False
        raise OSError(code, os.strerror(code))


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name ``path`` in an error of a call on its descriptor, which names no file: the name
    tells which disk failed (an EIO on a staging write is the staging disk's, not the
    share's: worker.Pipeline._on_staging_disk) and the user which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def drop_from_page_cache(fd: int, offset: int, length: int) -> None:
    """Tell the kernel these pages will not be read again soon (pages still dirty stay)."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# Told of each block as soon as it is in the staging copy: (index, offset, length, md5).
BlockReady = Callable[[int, int, int, bytes], None]


def stage_copy(
    source: Path, target: Path, block_size: int, on_block: BlockReady | None = None,
    *, at_most: int | None = None,
) -> StagedFile:
    """Copy ``source`` to local staging, hashing the whole file and every block on the way.

    ``on_block`` lets a large file's blocks go up while the rest is still being copied;
    the copy is only complete (fsynced, and checked unchanged) when this returns. A file
    larger than ``at_most`` (the room made for it on the staging disk: it grew since it was
    measured) is not copied beyond it: SourceChanged, and the next attempt measures again.
    """
    try:
        fd_in = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceVanished(f"{source} is gone") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotARegularFile(f"{source} is a symbolic link") from None
        raise
    try:
        before = os.fstat(fd_in)
        if not stat.S_ISREG(before.st_mode):
            raise NotARegularFile(f"{source} is not a regular file")
        if at_most is not None and before.st_size > at_most:
            raise _grown(source, before.st_size, at_most)
        # A file too large for 50,000 blocks of the configured size gets larger blocks.
        block_size = max(block_size, -(-before.st_size // MAX_BLOCKS_PER_BLOB))
        fd_out = instead_of_an_empty_folder(target, lambda: in_folder(target, lambda: _create_fresh(target)))
        ours = os.fstat(fd_out)
        whole = _WholeFileHash(in_background=before.st_size > block_size)
        write_behind = _WriteBehind(fd_out)
        blocks: list[bytes] = []
        block = hashlib.md5(usedforsecurity=False)
        in_block = 0
        size = 0
        copied = False
        try:
            while chunk := _read(source, fd_in, min(COPY_CHUNK, block_size - in_block, _read_at_most(at_most, size))):
                view = memoryview(chunk)
                with _naming(target):
                    while view:
                        view = view[os.write(fd_out, view) :]
                whole.update(chunk)
                block.update(chunk)
                in_block += len(chunk)
                size += len(chunk)
                if at_most is not None and size > at_most:
                    raise _grown(source, size, at_most)
                if in_block == block_size:
                    with _naming(target):
                        write_behind.block_written(size - in_block, in_block)
                    blocks.append(block.digest())
                    if on_block is not None:
                        on_block(len(blocks) - 1, size - in_block, in_block, blocks[-1])
                    block = hashlib.md5(usedforsecurity=False)
                    in_block = 0
            if in_block:
                blocks.append(block.digest())
                if on_block is not None:
                    on_block(len(blocks) - 1, size - in_block, in_block, blocks[-1])
            with _naming(target):
                os.fsync(fd_out)
            copied = True
        finally:
            os.close(fd_out)
            digest = whole.digest()
            if not copied:
                # A part of a copy is of no use to the next attempt, and on a full disk
                # (ENOSPC) the parts of every worker's copy would keep it full for good.
                _remove_if_still(target, ours)
        after = os.fstat(fd_in)
    finally:
        os.close(fd_in)
    if size != after.st_size or not _unchanged(source, _identity(before), _identity(after), digest):
        _remove_if_still(target, ours)
        raise SourceChanged(f"{source} changed while it was copied to staging")
    return StagedFile(
        target, size, before.st_mtime_ns, after.st_ctime_ns, digest, block_size, tuple(blocks)
    )


def _read(source: Path, fd: int, length: int) -> bytes:
    with _naming(source):
        return os.read(fd, length)


def _read_at_most(at_most: int | None, size: int) -> int:
    """What the copy may read next: one byte beyond its room tells that the file grew."""
    return COPY_CHUNK if at_most is None else at_most + 1 - size


def _grown(source: Path, size: int, room: int) -> SourceChanged:
    return SourceChanged(f"{source} has grown to {size} bytes since it was measured ({room} for its copy)")


def _unchanged(
    path: Path, before: tuple[int, int, int], now: tuple[int, int, int], md5: bytes
) -> bool:
    """Whether the file at ``path`` still holds the bytes whose MD5 is ``md5``, as it did at
    ``before``. A ctime that moved alone (a chmod; a claim, completion or removal of another
    name of the same inode, as hard links in one session have) is settled by reading the file
    again, which costs less than sending it again."""
    if now == before:
        return True
    if now[:2] != before[:2]:  # size or mtime
        return False
    try:
        reread, after = _md5_of(path)
    except PermissionError:
        return False  # its mode changed, and it cannot be read again to tell: as changed
    # Written while it was read again: changed, whatever the MD5 of what was read. (Its ctime
    # alone may move meanwhile: the other names of a hard-linked file come and go.)
    return reread == md5 and after[:2] == now[:2]


def _md5_of(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """The MD5 of the file at ``path`` and its identity once read."""
    md5 = hashlib.md5(usedforsecurity=False)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, COPY_CHUNK):
            md5.update(chunk)
        return md5.digest(), _identity(os.fstat(fd))
    finally:
        os.close(fd)


def _fresh_stat(path: Path) -> os.stat_result:
    """The file's attributes as the NFS server has them now: an open revalidates them
    (close-to-open), where a stat may answer from the client's attribute cache, seconds old,
    and miss a write made since the copy."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if not isinstance(exc, PermissionError) and exc.errno != errno.ELOOP:
            raise
        return os.lstat(path)  # not a file this user may open now (a symlink, a new mode)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    """What changes whenever the file's bytes do."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _remove_if_still(path: Path, ours: os.stat_result) -> None:
    """Remove our copy at ``path``, unless a newer attempt (this one abandoned, its thread
    still running) has made a copy of its own there; never hide the error being raised."""
    with contextlib.suppress(OSError):
        if _is(path, ours):
            os.unlink(path)


def read_block(path: Path, offset: int, length: int) -> bytes:
    """Read a block of a staging copy. Its bytes are not hashed again here: they go up with
    the MD5 taken while copying, and storage refuses them if they differ."""
    with open(path, "rb") as staged, _naming(path):
        staged.seek(offset)
        data = staged.read(length)
        # Read once to be sent: a retry reads it again from disk.
        drop_from_page_cache(staged.fileno(), offset, length)
    if len(data) != length:
        raise SourceChanged(f"staging copy {path} is shorter than expected")
    return data


def mark_completed(processing: Path, completed: Path, staged: StagedFile) -> None:
    """Move a verified file out of the way; refuse if it changed since it was staged."""
    try:
        now = _fresh_stat(processing)
    except FileNotFoundError:
        # An earlier attempt may have moved it already, its answer lost on the way back.
        # (Or removed where it was, the completed folder unable to take it: no way to tell.)
        try:
            done = os.lstat(completed)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise
        else:
            if (done.st_size, done.st_mtime_ns) == (staged.size, staged.mtime_ns):
                return
        raise SourceVanished(f"{processing} is gone") from None
    staged_identity = (staged.size, staged.mtime_ns, staged.ctime_ns)
    if not _unchanged(processing, staged_identity, _identity(now), staged.md5):
        raise SourceChanged(f"{processing} changed after it was uploaded")
    try:
        instead_of_an_empty_folder(completed, lambda: in_folder(completed, lambda: os.rename(processing, completed)))
    except OSError as exc:
        if not _cannot_be_kept_there(exc):
            raise
        # The completed folder cannot take it under its name (the completed file "a", not yet
        # removed, where "a/b" goes; a path too long): no retry would change that, and the
        # file is done all the same. Removed where it is.
        os.unlink(processing)


@dataclass(frozen=True)
class Claimed:
    """What ``claim_and_stage`` did: the claim's outcome and, once claimed, the staged copy
    or what stopped it (the file is claimed either way)."""

    outcome: Claim
    staged: StagedFile | None = None
    stage_error: Exception | None = None


def claim_and_stage(
    source: Path, target: Path, staging: Path, expected: tuple[int, int] | None, block_size: int,
    within: Path, at_most: int | None = None,
) -> Claimed:
    """Claim a file and copy it to staging, in one trip to a worker thread (each trip costs
    a thread wake-up and a wake-up of the event loop: per small file, that adds up)."""
    outcome = claim(source, target, expected, within)
    if outcome not in (Claim.CLAIMED, Claim.FINISHED):
        return Claimed(outcome)
    with _tracer.start_as_current_span("stage"):
        try:
            return Claimed(outcome, stage_copy(target, staging, block_size, at_most=at_most))
        except Exception as exc:
            return Claimed(outcome, stage_error=exc)


def finish(processing: Path, completed: Path, staged: StagedFile) -> list[str]:
    """Mark a verified file completed and delete it and its staging copy; returns the
    cleanup that failed (GC's sweep repeats it), one line each."""
    mark_completed(processing, completed, staged)
    problems = []
    for path in (completed, staged.path):
        try:
            remove_quietly(path)
        except OSError as exc:
            problems.append(describe(exc))
    return problems


PROBE_FILE_NAME = ".uploader-probe"  # at the top of a root, where no date folder is


def check_folder_writable(root: Path, failed: Path) -> None:
    """PermissionError where this user may not write the folder of ``failed`` (a path below
    ``root``; the nearest of its folders there is), as an earlier run under another user may
    have left it: every file that needs it fails, whatever others do."""
    folder = failed.parent if failed != root else root
    while folder != root and folder.is_relative_to(root) and not os.path.isdir(folder):
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable by this user", os.fspath(folder))


def probe_writable(root: Path, failed: Path | None = None) -> None:
    """Write, sync and remove a small file in ``root``: OSError where the disk refuses. With
    ``failed`` (a path below ``root`` that an operation failed on), first: OSError where this
    user may not write the folder it is in (or the nearest one of its folders there is), as
    an earlier run under another user may have left it."""
    if failed is not None:
        check_folder_writable(root, failed)
    probe = root / f"{PROBE_FILE_NAME}-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"probe")
        os.fsync(fd)
    finally:
        os.close(fd)
        remove_quietly(probe)


def remove_quietly(path: Path) -> bool:
    """Remove ``path`` if it is there; whether it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def quarantine(
    processing: Path,
    failed: Path,
    reason_path: Path,
    reason: dict[str, object],
    apart: Callable[[os.stat_result], tuple[Path, Path]] | None = None,
    *,
    seen: Callable[[os.stat_result], None] = lambda found: None,
    tried_before: os.stat_result | None = None,
) -> Path:
    """Move a file that cannot be uploaded to the failed folder, beside a reason file.

    Never overwrites an earlier quarantined file of the same name: a numbered suffix
    keeps both. Where a file and a folder of one name meet there (a file ``a`` quarantined
    before, now ``a/b``; a user's folder ``a.json`` among the reasons beside the reason of
    ``a``), the file or its reason goes to ``apart(the file's stat)`` instead: (failed path,
    reason path) in a folder of its own. Returns where the file went.

    ``seen`` is told the file's stat before anything is done; given as ``tried_before`` to
    a try after a failed one, it lets that try find the file in the failed folder when the
    failed try got as far as removing it from processing (its answer lost, NFS).
    """
    here: os.stat_result | None
    try:
        here = os.lstat(processing)
    except FileNotFoundError:
        here = None
    if tried_before is not None and (here is None or not same_file(here, tried_before)):
        # Not there any more (another file may have its name now: not this one's to move).
        for candidate, first, reasons in _links_in_failed(tried_before, failed, reason_path, apart):
            target = _reason_of(candidate, first, reasons)
            if not os.path.lexists(target):
                payload = json.dumps({**reason, "path": str(candidate)}, indent=2, sort_keys=True).encode()
                write_atomically(target, payload)
            return candidate
        raise FileNotFoundError(errno.ENOENT, "the file to quarantine is gone", str(processing))
    if here is None:
        raise FileNotFoundError(errno.ENOENT, "the file to quarantine is gone", str(processing))
    before = here
    seen(before)
    try:
        candidate, renamed = _move_to_failed(processing, failed, before)
    except OSError as exc:
        if apart is None or not _cannot_be_kept_there(exc):
            raise
        failed, reason_path = apart(before)
        candidate, renamed = _move_to_failed(processing, failed, before)
    record = {**reason, "path": str(candidate)}  # read again after a restart (recovery.py)
    payload = json.dumps(record, indent=2, sort_keys=True).encode()
    try:
        write_atomically(_reason_of(candidate, failed, reason_path), payload)
    except OSError as exc:
        if apart is None or not _cannot_be_kept_there(exc):
            raise
        write_atomically(_reason_of(candidate, failed, apart(before)[1]), payload)
    if not renamed:
        try:
            os.unlink(processing)
        except FileNotFoundError:
            # A retransmitted unlink whose first try went through (NFS), or someone removed
            # the claimed name: either way the file is in the failed folder and only there.
            if not _is(candidate, before):
                raise
    return candidate


def undo_quarantine(
    processing: Path,
    failed: Path,
    reason_path: Path,
    apart: Callable[[os.stat_result], tuple[Path, Path]],
) -> Path | None:
    """Take back a quarantine that a crash stopped half-way: the file is still claimed at
    ``processing`` and already linked into the failed folder (``quarantine``'s arguments say
    where it may be), maybe with its reason beside it. The claim is what counts: the link
    in the failed folder and its reason go, and the file is tried again like any other
    claimed file, instead of being both uploaded and listed as quarantined. Returns the
    name taken back, if any.
    """
    here = os.lstat(processing)
    if here.st_nlink < 2:
        return None  # linked nowhere else (or moved by a rename, which leaves no twin)
    apart_reason = apart(here)[1]
    for candidate, first, reasons in _links_in_failed(here, failed, reason_path, apart):
        for reason in {_reason_of(candidate, first, reasons), _reason_of(candidate, first, apart_reason)}:
            for leftover in (reason, reason.with_name(reason.name + ".tmp")):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    os.unlink(leftover)
        os.unlink(candidate)
        return candidate
    return None


def _links_in_failed(
    here: os.stat_result,
    failed: Path,
    reason_path: Path,
    apart: Callable[[os.stat_result], tuple[Path, Path]] | None,
) -> Iterator[tuple[Path, Path, Path]]:
    """Where a quarantine may have put the file ``here`` is: (its name in the failed folder,
    the path it was to have there, the path of that path's reason), first found first."""
    places = [(failed, reason_path), *([apart(here)] if apart is not None else [])]
    for first, reasons in places:
        # Its name there, or a numbered one (whatever was removed from the folder since).
        try:
            with os.scandir(first.parent) as entries:
                names = [e.name for e in entries if e.inode() == here.st_ino]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            candidate = first.with_name(name)
            # Not another file's quarantine, hard-linked to this one by someone.
            if _a_name_quarantine_gives(first.name, name) and _is(candidate, here):
                yield candidate, first, reasons


def _a_name_quarantine_gives(name: str, candidate: str) -> bool:
    """Whether ``_move_to_failed`` may have given a file to be kept as ``name`` the name
    ``candidate``: that name, or it numbered."""
    if candidate == name:
        return True
    _, dot, number = candidate.rpartition(".")
    return bool(dot) and number.isdigit() and candidate == name_with_suffix(name, f".{int(number)}")


def _cannot_be_kept_there(exc: OSError) -> bool:
    """A file and a folder of one name meet, or the path is too long: no retry helps."""
    return exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.ENAMETOOLONG)


def _move_to_failed(processing: Path, failed: Path, before: os.stat_result) -> tuple[Path, bool]:
    """Give the file a free name in the failed folder: (that name, whether ``processing``
    is gone already)."""
    candidate = failed
    for n in range(1, 10_000):
        try:
            return candidate, move_no_clobber(processing, candidate, before)
        except FileExistsError:
            if _is(candidate, before):
                return candidate, False  # linked there by an attempt that stopped half-way
            if stat.S_ISDIR(os.lstat(candidate).st_mode):  # a folder of quarantined files
                raise IsADirectoryError(errno.EISDIR, "a folder has this name", str(candidate)) from None
            candidate = failed.with_name(name_with_suffix(failed.name, f".{n}"))
    raise FileExistsError(errno.EEXIST, "no free name in the failed folder", str(failed))  # pragma: no cover


def _reason_of(candidate: Path, failed: Path, reason_path: Path) -> Path:
    return reason_path if candidate == failed else reason_path.with_name(reason_file_name(candidate.name))


def write_atomically(path: Path, payload: bytes) -> None:
    """Blocking: put ``payload`` at ``path`` all at once (a crash leaves the old content or
    the new, never a mix), through ``<name>.tmp``, on disk before it counts."""
    tmp = path.with_name(path.name + ".tmp")
    fd = in_folder(tmp, lambda: _open_new(tmp))
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


class OrderedWrites:
    """Writes (and the removal) of one small file on NFS, done in the order they were asked
    for. A write abandoned by a timeout (a hung share) goes on in its thread and may end after
    a newer one was asked for: it must not put older content back. They take turns, and one
    older than the last done is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._versions = itertools.count(1)
        self._asked = 0
        self._done = 0
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        """Whether the last one asked for is done: any older one, still in a thread, is dropped."""
        return self._done >= self._asked

    def writer(self, payload: bytes) -> Callable[[], None]:
        """The blocking write of ``payload``, numbered now (on the event loop), for a thread."""
        version = self._asked = next(self._versions)

        def write() -> None:
            self._in_turn(version, lambda: write_atomically(self.path, payload))

        return write

    def remover(self) -> Callable[[], None]:
        """The blocking removal of the file, numbered now, for a thread."""
        version = self._asked = next(self._versions)

        def remove() -> None:
            self._in_turn(version, lambda: remove_quietly(self.path))

        return remove

    def _in_turn(self, version: int, operation: Callable[[], object]) -> None:
        with self._lock:
            if version > self._done:
                operation()
                self._done = version


def _create_fresh(path: Path) -> int:
    """A new file at ``path`` for a staging copy, on an inode of its own: an earlier attempt's
    copy still running in an abandoned thread, which removes its file if it fails, can never
    take this one for its own. (A folder of the name: IsADirectoryError.)"""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _open_new(path: Path) -> int:
    """Create ``path`` as a new file of this process. Whatever has the name already (a
    crash's leftover, a symlink someone put there) is removed first, never written through:
    a link would carry the write outside the service's folders."""
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            try:
                os.unlink(path)
            except IsADirectoryError:
                os.rmdir(path)  # an empty folder goes; one with files in it fails the write
            except FileNotFoundError:
                pass


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut, not only a crash); best effort, as
    some file systems cannot sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
