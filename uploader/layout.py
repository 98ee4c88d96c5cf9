"""Where every file lives, and what its blob is called: pure functions, no I/O.

The service owns everything under the processing root::

    <processing root>/session.json                        the session state, kept across restarts
    <processing root>/.uploader.lock                      held by the one service on this root
    <processing root>/<YYYYMMDD>/<session>/<rel>          claimed, in flight (the contract's path)
    <processing root>/.completed/<YYYYMMDD>/<session>/<rel>   uploaded and verified, GC deletes it
    <processing root>/.failed/files/<YYYYMMDD>/<session>/<rel>    quarantined, never deleted
    <processing root>/.failed/reasons/<YYYYMMDD>/<session>/<rel>.json  why it was quarantined

Date folders are always eight digits, so the dot-entries and ``session.json`` can never
collide with a session's files, whatever those files are called. Within the failed folder a
file and a folder of one name can meet over time (``a`` quarantined, later ``a/b``; a user's
folder ``a.json`` beside the reason of ``a``), and a path can be too long with the failed
folder's prefix: that file, or its reason, goes to ``<session>/.apart-<device>-<inode>-<hash of rel>/<name>``
instead, and the reason's ``path`` says where the file is (its ``file``, where it came from).
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import uuid_utils

SESSION_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_.\-]+$")
# A session name is a folder name on NFS and in staging: NAME_MAX on Linux.
MAX_SESSION_NAME_LENGTH = 255
DATE_PREFIX_PATTERN = re.compile(r"^\d{8}$")
STATE_FILE_NAME = "session.json"
LOCK_FILE_NAME = ".uploader.lock"
NAME_MAX = 255  # bytes in one file name, on Linux and on NFS
COMPLETED_DIR_NAME = ".completed"
FAILED_DIR_NAME = ".failed"
DRAINS_DIR_NAME = ".drains"


class InvalidSessionName(ValueError):
    """The message is one sentence a user can act on."""


def validate_session_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidSessionName("session_name must be a string.")
    if name == "":
        raise InvalidSessionName("session_name must not be empty; omit it to get a generated name.")
    if len(name) > MAX_SESSION_NAME_LENGTH:
        raise InvalidSessionName(
            f"session_name is {len(name)} characters long; the limit is {MAX_SESSION_NAME_LENGTH}."
        )
    if not SESSION_NAME_PATTERN.fullmatch(name):
        raise InvalidSessionName(
            "session_name may only contain ASCII letters, digits, '_', '.' and '-'."
        )
    if name in (".", ".."):
        raise InvalidSessionName(f"session_name {name!r} is a path, not a name.")
    return name


def validate_new_session_name(name: object) -> str:
    """``validate_session_name``, and no final '.', which Azure drops from the session's
    segment of every blob name (sessions recorded before this rule still resume: their
    blob names escape it, see ``blob_name``)."""
    name = validate_session_name(name)
    if name.endswith("."):
        raise InvalidSessionName(
            "session_name must not end with '.', which Azure Blob Storage drops from blob names."
        )
    return name


def new_session_name() -> str:
    return f"00-session-{uuid_utils.uuid7()}"


def date_prefix(moment: datetime) -> str:
    """The UTC date of ``moment`` as YYYYMMDD."""
    if moment.tzinfo is None:
        raise ValueError("date_prefix needs an aware datetime")
    return moment.astimezone(UTC).strftime("%Y%m%d")


def is_date_prefix(name: str) -> bool:
    if not DATE_PREFIX_PATTERN.fullmatch(name):
        return False
    try:
        datetime.strptime(name, "%Y%m%d")
    except ValueError:
        return False
    return True


def is_session_name(name: str) -> bool:
    try:
        validate_session_name(name)
    except InvalidSessionName:
        return False
    return True


@dataclass(frozen=True, order=True)
class FileKey:
    """One file of one session: ``rel`` is its path below the session folder, '/'-separated."""

    date_prefix: str
    session: str
    rel: str

    def __str__(self) -> str:
        return blob_name(self)


def _percent_escape(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    bad = error.object[error.start : error.end]
    return "".join(f"%{byte:02X}" for byte in bad), error.end


codecs.register_error("uploader-percent", _percent_escape)


# What Azure does not keep in a blob name: a backslash becomes '/' (so a file named 'a\\b'
# and the file b in the folder a would share a blob), control characters are refused or
# break listings, and a '.' that ends a path segment is dropped ('x.' would become 'x').
_UNSAFE_IN_BLOB_NAMES = re.compile(r"[\\\x00-\x1f\x7f-\x9f]|\.(?=/|\Z)")
# What an escape of ours looks like: an undecodable byte (80-FF), an escaped '%' (25), or
# one of the characters above ('.' 2E, backslash 5C, controls 00-1F and 7F, and C1
# controls, which UTF-8 writes as C2 80-9F).
_LOOKS_ESCAPED = re.compile(r"%(?:25|2E|5C|[01][0-9A-F]|7F|[89A-F][0-9A-F])")


def _escape_unsafe(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def printable(rel: str) -> str:
    """``rel`` as valid Unicode that Azure keeps as it is, a different one for every file name.

    Linux file names are bytes; Python hands undecodable bytes over as lone surrogates,
    which no URL or JSON document can carry: those bytes become %XX (uppercase, 80-FF), and
    so do the characters Azure would change (``_UNSAFE_IN_BLOB_NAMES``), and '%' becomes %25.
    So that no name can come out as another's, a valid name that already holds such a
    sequence (%25, %2E, %5C, %00 to %1F, %7F, %80 to %FF) is escaped the same way; every
    other name (``100%.csv``, ``a%20b``, ``café``) stays exactly as it is.
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if _LOOKS_ESCAPED.search(rel) is None and _UNSAFE_IN_BLOB_NAMES.search(rel) is None:
            return rel
    escaped = os.fsencode(rel).replace(b"%", b"%25").decode("utf-8", errors="uploader-percent")
    return _UNSAFE_IN_BLOB_NAMES.sub(_escape_unsafe, escaped)


def blob_name(key: FileKey) -> str:
    return f"{key.date_prefix}/{printable(key.session)}/{printable(key.rel)}"


# Azure's limits on a blob name (https://learn.microsoft.com/rest/api/storageservices/
# naming-and-referencing-containers--blobs--and-metadata); Azurite does not enforce them.
MAX_BLOB_NAME_CHARACTERS = 1024
MAX_BLOB_NAME_SEGMENTS = 254


def blob_name_problem(name: str) -> str | None:
    """Why Azure would refuse ``name``, in one sentence; None when it would take it."""
    # Counted in UTF-16 code units: the stricter count for characters beyond U+FFFF.
    characters = len(name.encode("utf-16-le")) // 2
    if characters > MAX_BLOB_NAME_CHARACTERS:
        return (
            f"its blob name would be {characters} characters long, and Azure allows at most "
            f"{MAX_BLOB_NAME_CHARACTERS}"
        )
    segments = name.count("/") + 1
    if segments > MAX_BLOB_NAME_SEGMENTS:
        return (
            f"its blob name would have {segments} path segments, and Azure allows at most "
            f"{MAX_BLOB_NAME_SEGMENTS}"
        )
    return None


@dataclass(frozen=True)
class Layout:
    incoming_root: Path
    processing_root: Path
    staging_root: Path

    @property
    def state_file(self) -> Path:
        return self.processing_root / STATE_FILE_NAME

    @property
    def lock_file(self) -> Path:
        return self.processing_root / LOCK_FILE_NAME

    @property
    def completed_root(self) -> Path:
        return self.processing_root / COMPLETED_DIR_NAME

    @property
    def failed_files_root(self) -> Path:
        return self.processing_root / FAILED_DIR_NAME / "files"

    @property
    def failed_reasons_root(self) -> Path:
        return self.processing_root / FAILED_DIR_NAME / "reasons"

    @property
    def drains_root(self) -> Path:
        return self.processing_root / DRAINS_DIR_NAME

    def drain_file(self, date: str, session: str) -> Path:
        """The record of what a stopped session had queued (drain.py)."""
        return self.drains_root / date / name_with_suffix(session, ".json", room=len(".tmp"))

    def incoming_dir(self, session: str) -> Path:
        return self.incoming_root / session

    def incoming_path(self, key: FileKey) -> Path:
        return self.incoming_dir(key.session) / key.rel

    def processing_dir(self, date: str, session: str) -> Path:
        return self.processing_root / date / session

    def processing_path(self, key: FileKey) -> Path:
        return self.processing_dir(key.date_prefix, key.session) / key.rel

    def staging_dir(self, date: str, session: str) -> Path:
        return self.staging_root / date / session

    def staging_path(self, key: FileKey) -> Path:
        return self.staging_dir(key.date_prefix, key.session) / key.rel

    def completed_path(self, key: FileKey) -> Path:
        return self.completed_root / key.date_prefix / key.session / key.rel

    def failed_path(self, key: FileKey, apart: str | None = None) -> Path:
        """Where a quarantined file goes; ``apart`` names a folder of its own inside the
        session's, for a file whose path cannot be kept there (it meets a file or a folder of
        the failed folder, or is too long): there it keeps only its name, its path being in
        its reason."""
        session = self.failed_files_root / key.date_prefix / key.session
        if apart is None:
            return session / key.rel
        return session / apart / key.rel.rsplit("/", 1)[-1]

    def failed_reason_path(self, failed_path: Path) -> Path:
        relative = failed_path.relative_to(self.failed_files_root)
        return self.failed_reasons_root / relative.parent / reason_file_name(relative.name)

    def failed_apart(self, key: FileKey, file: os.stat_result) -> tuple[Path, Path]:
        """(failed path, reason path) of ``key``'s file, as ``file`` is, in a folder apart."""
        path = self.failed_path(key, apart_folder_name(file.st_dev, file.st_ino, key.rel))
        return path, self.failed_reason_path(path)


def apart_folder_name(device: int, inode: int, rel: str) -> str:
    """A folder of the failed folder for one file apart, named after the file itself (and its
    path: two hard links of one file are two files) so that an attempt that stopped half-way
    (a crash) is found and finished by the next one."""
    digest = hashlib.sha256(os.fsencode(rel)).hexdigest()[:12]
    return f".apart-{device:x}-{inode:x}-{digest}"


def name_with_suffix(name: str, suffix: str, *, room: int = 0) -> str:
    """``name + suffix``, shortened where that would not fit in a file name (NAME_MAX bytes,
    less ``room`` kept free for a temporary suffix): the end of ``name`` gives way to a
    hash of all of it, so different names stay different."""
    raw = os.fsencode(name)
    limit = NAME_MAX - room - len(os.fsencode(suffix))
    if len(raw) <= limit:
        return name + suffix
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return os.fsdecode(raw[: limit - len(digest) - 1]) + "~" + digest + suffix


def reason_file_name(failed_name: str) -> str:
    """The name of a quarantined file's reason file, with room for write_atomically's '.tmp'."""
    return name_with_suffix(failed_name, ".json", room=len(".tmp"))
