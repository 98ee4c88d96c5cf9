"""Start-up recovery: find every file a previous run claimed and did not finish.

Every unfinished file of every session folder under the processing root is queued again
(its blob is overwritten), and the session that was active resumes. A claim that stopped
between ``link()`` and ``unlink()`` left the same file in incoming too: that name is
removed from incoming, so the file goes up once. A quarantine that stopped between its
``link()`` into the failed folder and its ``unlink()`` is taken back: the file is claimed
still, and tried again (uploaded, or quarantined once more, never both).

Recovery reads what it can: a folder the share will not list now is left to GC, which
queues claimed files that nobody owns (see gc.py), so a flaky share cannot hold start-up.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from uploader.errors import describe
from uploader.fileops import list_files, open_folder_within, same_file, undo_quarantine
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout, is_date_prefix, is_session_name
from uploader.session import BadStateFile, SessionState, read_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    state: SessionState
    unfinished: list[FileKey]
    unreadable: list[str]  # what could not be read this time, one line each
    state_problem: str | None = None  # why the stored session state was not used


def _subfolders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _drop_incoming_twin(layout: Layout, key: FileKey) -> None:
    """Finish a claim a crash stopped between link and unlink: the name in incoming goes.
    Its folders are walked without following links: a folder replaced by a link since then
    leads outside incoming, where nothing is ever deleted."""
    *folders, name = layout.incoming_path(key).relative_to(layout.incoming_root).parts
    try:
        folder = open_folder_within(layout.incoming_root, folders)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        claimed = os.lstat(layout.processing_path(key))
        # The name's file is looked at last, just before its unlink: a version renamed onto
        # the name meanwhile is not the claimed file, and stays.
        twin = os.lstat(name, dir_fd=folder)
        if same_file(twin, claimed):
            os.unlink(name, dir_fd=folder)
            log.info("finished an interrupted claim of %s", key)
    except FileNotFoundError:
        return
    finally:
        os.close(folder)


def _take_back_interrupted_quarantine(layout: Layout, key: FileKey) -> None:
    failed = layout.failed_path(key)
    taken_back = undo_quarantine(
        layout.processing_path(key), failed, layout.failed_reason_path(failed),
        partial(layout.failed_apart, key),
    )
    if taken_back is not None:
        log.info("took back %s, whose quarantine a restart interrupted: it is tried again", key)


def find_unfinished(layout: Layout) -> tuple[list[FileKey], list[str]]:
    """Blocking: the claimed files of every session (run it in a thread).

    Raises OSError only when the processing root itself cannot be listed.
    """
    unfinished: list[FileKey] = []
    unreadable: list[str] = []
    for date in _subfolders(layout.processing_root):
        if not is_date_prefix(date):
            continue
        try:
            sessions = _subfolders(layout.processing_root / date)
        except OSError as exc:
            unreadable.append(describe(exc))
            continue
        for session in sessions:
            if not is_session_name(session):
                log.warning("ignoring %s: not a session folder", layout.processing_root / date / session)
                continue
            try:
                scan = list_files(layout.processing_dir(date, session))
            except OSError as exc:
                unreadable.append(describe(exc))
                continue
            unreadable.extend(scan.skipped)
            for entry in scan.entries:
                key = FileKey(date, session, entry.rel)
                try:
                    _drop_incoming_twin(layout, key)
                except OSError as exc:
                    # The claim finishes when the watcher offers the twin again.
                    log.warning("cannot check %s for an interrupted claim: %s", key, describe(exc))
                try:
                    _take_back_interrupted_quarantine(layout, key)
                except OSError as exc:
                    # Its next quarantine, if it comes to that, finishes this one.
                    log.warning("cannot check %s for an interrupted quarantine: %s", key, describe(exc))
                unfinished.append(key)
    return unfinished, unreadable


@dataclass(frozen=True)
class Quarantined:
    count: int  # files in the failed folder
    recent: list[dict[str, object]]  # the reason records of the last of them, oldest first
    since: set[str]  # paths of the files quarantined at or after the time asked about


def find_quarantined(layout: Layout, keep: int = 100, since: str = "~") -> Quarantined:
    """Blocking: how many files are in the failed folder, and the reason records of the last
    ``keep`` of them, so that status still shows them after a restart; also which of them
    were quarantined at or after ``since`` (an ISO time), which the running service may
    have counted already.

    A record names its file (``path``; one written before it did is found beside its reason
    file's place); records that cannot be read, and files no longer there, are left out.
    """
    count = 0
    records: list[dict[str, object]] = []
    recent_paths: set[str] = set()
    for folder, _, names in os.walk(layout.failed_reasons_root):
        for name in names:
            if not name.endswith(".json"):
                continue
            reason_file = Path(folder) / name
            try:
                record = json.loads(reason_file.read_bytes())
            except (OSError, ValueError, RecursionError):
                continue
            if not isinstance(record, dict):
                continue
            where = record.get("path")
            if not isinstance(where, str):
                relative = reason_file.relative_to(layout.failed_reasons_root)
                where = str(layout.failed_files_root / relative.parent / relative.name.removesuffix(".json"))
            if os.path.lexists(where):
                count += 1
                records.append({**record, "path": where})
                if _quarantined_at(record) >= since:
                    recent_paths.add(where)
                if len(records) > 2 * keep:  # keep memory bounded on a huge failed folder
                    records = heapq.nlargest(keep, records, key=_quarantined_at)
    recent = sorted(heapq.nlargest(keep, records, key=_quarantined_at), key=_quarantined_at)
    return Quarantined(count, recent, recent_paths)


def _quarantined_at(record: dict[str, object]) -> str:
    return str(record.get("quarantined_at", ""))


async def read_stored_state(layout: Layout, nfs: ThreadLane) -> tuple[SessionState, str | None]:
    """The stored session state, and why it was not used where it could not be."""
    try:
        return await nfs.run(read_state, layout.state_file), None
    except BadStateFile as exc:
        log.error("%s", exc)
        return SessionState(), str(exc)


def make_own_folders(layout: Layout) -> None:
    """Blocking: the folders of the service's own under the processing root, made at start-up rather
    than at a file's completion, quarantine or a stop: a mkdir in the processing root waits behind
    a listing of it that the share holds (a hung READDIR locks the folder), and every worker
    completing a file would wait there, while one made in advance is only looked up."""
    for folder in (layout.completed_root, layout.failed_files_root, layout.failed_reasons_root,
                   layout.drains_root):
        os.makedirs(folder, exist_ok=True)


async def recover(
    layout: Layout, nfs: ThreadLane, stored: tuple[SessionState, str | None] | None = None
) -> Recovered:
    """``stored``: the state an earlier, failed attempt has read already (a state file it
    moved aside is not there to be read again)."""
    state, state_problem = stored if stored is not None else await read_stored_state(layout, nfs)
    try:
        await nfs.run(make_own_folders, layout)
    except OSError as exc:  # made when first needed, then
        log.warning("cannot make the service's folders under the processing root: %s", describe(exc))
    unfinished, unreadable = await nfs.run(find_unfinished, layout)
    if unfinished:
        log.info("recovery found %d unfinished files", len(unfinished))
    for problem in unreadable:
        log.warning("recovery could not read %s; GC queues what it finds there later", problem)
    if state.active:
        log.info("session %s was active before the restart", state.session_name)
    return Recovered(state, unfinished, unreadable, state_problem)
