"""The start-up check of the service's three folders.

A folder that is not a folder, or that this user cannot use, stops start-up with one line.
Only what cannot pass by itself is fatal: a refusal read from the folder's own permission
bits, a file where a folder should be, a read-only file system, two folders that meet
through symlinks. An NFS server can refuse a call (EACCES), fail it (EIO, ESTALE) or hang
for a while: that is logged, start-up goes on, and recovery waits for the share
(Service._recover).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from uploader.config import Settings, overlapping_folders
from uploader.errors import StartupError, describe
from uploader.lanes import ThreadLane

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMISSION_WORDS = ((os.R_OK, "readable"), (os.W_OK, "writable"), (os.X_OK, "searchable"))
_USE = os.R_OK | os.W_OK | os.X_OK  # listed (recovery, GC), written, entered
# What the path itself causes, whatever the share does: a loop of symlinks, a name too long.
_NEVER_PASSES = (errno.ELOOP, errno.ENAMETOOLONG)


def _missing_permissions(path: Path, need: int) -> int:
    """The permissions of ``need`` that ``path``'s mode bits refuse this process, when
    access() refuses them too (an ACL may grant what the bits do not); 0 when none is
    refused for sure, or when ``path`` cannot be read now."""
    try:
        info = os.stat(path)
        if os.access(path, need):
            return 0
    except OSError:
        return 0
    uid = os.geteuid()
    if uid == 0:
        return 0  # root is refused only by the server (root squash), which may change
    if info.st_uid == uid:
        granted = info.st_mode >> 6
    elif info.st_gid == os.getegid() or info.st_gid in os.getgroups():
        granted = info.st_mode >> 3
    else:
        granted = info.st_mode
    return need & ~granted & 0o7


def _words(missing: int) -> str:
    return " and ".join(word for bit, word in _PERMISSION_WORDS if missing & bit)


def _user() -> str:
    return f"by this user (uid {os.geteuid()})"


def _unreachable(variable: str, path: Path) -> StartupError | None:
    """A folder on the way to ``path`` that refuses this user entry for sure, or None."""
    for folder in reversed(path.parents):  # from /
        if _missing_permissions(folder, os.X_OK):
            return StartupError(f"{variable} ({path}) cannot be reached: {folder} is not searchable {_user()}")
    return None


def _cannot_create(variable: str, path: Path) -> StartupError | None:
    """Why creating ``path`` is refused for sure, or None."""
    existing = next((p for p in path.parents if os.path.exists(p)), None)
    if existing is not None and (missing := _missing_permissions(existing, os.W_OK | os.X_OK)):
        return StartupError(f"{variable} ({path}) cannot be created: {existing} is not {_words(missing)} {_user()}")
    return _unreachable(variable, path)


def _not_a_folder(variable: str, path: Path) -> StartupError:
    blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    return StartupError(
        f"{variable} ({path}) cannot be a folder: {blocker or 'a part of the path'} is not a folder"
    )


def prepare_folder(variable: str, path: Path) -> None:
    """Blocking: make ``path`` when it is missing (as the service would later anyway) and check
    that this process can use it.

    Raises StartupError when it cannot be used; other OSErrors (the share failing for now)
    propagate.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        _create(variable, path)
        info = os.stat(path)
    except NotADirectoryError:
        raise _not_a_folder(variable, path) from None
    except PermissionError as exc:
        raise _unreachable(variable, path) or exc from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{variable} ({path}) is not a folder")
    if os.access(path, _USE):
        return
    # In the incoming root the service only makes session folders, which an administrator
    # may make instead (writable by the service): there it must read and enter, no more.
    need = os.R_OK | os.X_OK if variable == "APP_NFS_INCOMING_DIR" else _USE
    if missing := _missing_permissions(path, need):
        raise StartupError(f"{variable} ({path}) is not {_words(missing)} {_user()}")
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise StartupError(f"{variable} ({path}) is on a read-only file system")
    if need != _USE and _missing_permissions(path, os.W_OK):
        log.warning(
            "%s (%s) is not writable %s: a session starts only where its folder exists already",
            variable, path, _user(),
        )
        return
    # An ACL or the NFS server refuses, maybe for a while: the calls that need it will tell.
    log.warning("%s (%s) may not be usable: access() refuses this user (uid %d)", variable, path, os.geteuid())


def inspect_folder(variable: str, path: Path) -> bool:
    """Blocking, and changes nothing: check ``path`` as ``prepare_folder`` would. True when it
    is missing and could be made (``prepare_folder`` makes it once start-up may go on)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        _check_creatable(variable, path)
        return True
    except NotADirectoryError:
        raise _not_a_folder(variable, path) from None
    except PermissionError as exc:
        raise _unreachable(variable, path) or exc from None
    prepare_folder(variable, path)  # there already: it only checks
    return False


def _check_creatable(variable: str, path: Path) -> None:
    """Raise a StartupError where ``os.makedirs(path)`` would fail for sure."""
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if existing is None:
        return
    if not os.path.isdir(existing):
        if os.path.islink(existing):  # a symlink to nothing, on the way or at the end
            raise StartupError(f"{variable} ({path}) cannot be created: {existing} exists and is not a folder")
        raise _not_a_folder(variable, path)
    if problem := _cannot_create(variable, path):
        raise problem
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise StartupError(f"{variable} ({path}) cannot be created: read-only file system")


def _create(variable: str, path: Path) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except NotADirectoryError:
        raise _not_a_folder(variable, path) from None
    except FileExistsError as exc:  # a symlink to nothing, on the way or at the end
        raise StartupError(
            f"{variable} ({path}) cannot be created: {exc.filename} exists and is not a folder"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise StartupError(f"{variable} ({path}) cannot be created: read-only file system") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _cannot_create(variable, path) or exc from None
        raise


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _ignore(message: str) -> None:
    pass


async def check_folders(
    settings: Settings, nfs: ThreadLane, *, note_error: Callable[[str], None] = _ignore
) -> list[tuple[str, Path]]:
    """Check each folder in the NFS lane, each call within APP_NFS_OP_TIMEOUT_S, and that the
    folders, symlinks followed, are still apart (config.py compares them as written: it reads
    no file system). Makes nothing: a bad setting must change nothing. Returns the folders
    that are missing, for ``make_folders`` once nothing else stops start-up. A folder that
    cannot be checked now is logged and given to ``note_error`` (the status's last_error)."""
    checked: dict[str, Path] = {}
    missing: list[tuple[str, Path]] = []
    for variable, path in settings.folders.items():
        answer = await _within(settings, nfs, inspect_folder, variable, path, "check", note_error)
        if answer is not None:
            checked[variable] = path
            if answer:
                missing.append((variable, path))
    overlap = None
    with trio.move_on_after(settings.nfs_op_timeout_s):
        overlap = await nfs.run(overlapping_folders, checked, _resolved)
    if overlap:
        raise StartupError(overlap)
    if {"APP_NFS_INCOMING_DIR", "APP_NFS_PROCESSING_ROOT"} <= checked.keys():
        with trio.move_on_after(settings.nfs_op_timeout_s):
            await nfs.run(_check_one_file_system, settings.nfs_incoming_dir, settings.nfs_processing_root)
    return missing


def _device(path: Path) -> int:
    """The file system ``path`` is on, or will be on once made (its nearest existing folder's)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(FileNotFoundError):
            return os.stat(folder).st_dev
    raise FileNotFoundError(errno.ENOENT, "no folder of the path exists", str(path))


def _check_one_file_system(incoming: Path, processing: Path) -> None:
    """Raise a StartupError when the two NFS folders are on different file systems: a claim
    is a link() from one to the other, which no file system does across (EXDEV)."""
    if _device(incoming) != _device(processing):
        raise StartupError(
            f"APP_NFS_INCOMING_DIR ({incoming}) and APP_NFS_PROCESSING_ROOT ({processing}) are on "
            "different file systems: files are claimed by a link from one to the other, which "
            "works only within one file system (one NFS mount)"
        )


async def make_folders(
    settings: Settings, nfs: ThreadLane, missing: list[tuple[str, Path]], *,
    note_error: Callable[[str], None] = _ignore,
) -> None:
    """Make the folders ``check_folders`` found missing, and check them."""
    for variable, path in missing:
        await _within(settings, nfs, prepare_folder, variable, path, "make", note_error)


async def _within(
    settings: Settings, nfs: ThreadLane, step: Callable[[str, Path], T], variable: str, path: Path,
    doing: str, note_error: Callable[[str], None],
) -> T | None:
    """Run ``step`` on one folder in the NFS lane; None (logged, and given to ``note_error``)
    when the share fails or does not answer within APP_NFS_OP_TIMEOUT_S. A StartupError goes
    through."""
    problem = f"no answer within {settings.nfs_op_timeout_s:g} s"
    with trio.move_on_after(settings.nfs_op_timeout_s):
        try:
            return await nfs.run(step, variable, path)
        except OSError as exc:
            if exc.errno in _NEVER_PASSES:
                raise StartupError(f"{variable} ({path}) cannot be used: {describe(exc)}") from None
            problem = describe(exc)
    said = f"cannot {doing} {variable} ({path}) now: {problem}; starting anyway"
    log.warning("%s", said)
    # In the status too, at once: start-up may wait on the share long before anything else
    # there says why (readiness waits for recovery, which needs the share).
    note_error(said)
    return None
