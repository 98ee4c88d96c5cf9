"""Start-up recovery: find every file a previous run claimed and did not finish.

Every unfinished file of every session folder under the processing root is queued again
(its blob is overwritten), and the session that was active resumes. A claim that stopped
between ``link()`` and ``unlink()`` left the same file in incoming too: that name is
removed from incoming, so the file goes up once.

Recovery reads what it can: a folder the share will not list now is left to GC, which
queues claimed files that nobody owns (see gc.py), so a flaky share cannot hold start-up.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from uploader.errors import describe
from uploader.fileops import list_files, same_file
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout, is_date_prefix, is_session_name
from uploader.session import SessionState, read_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    state: SessionState
    unfinished: list[FileKey]
    unreadable: list[str]  # what could not be read this time, one line each
    # The reason records of the files still in the failed folder, oldest first.
    quarantined: list[dict[str, object]] = field(default_factory=list)


def _subfolders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _drop_incoming_twin(layout: Layout, key: FileKey) -> None:
    try:
        twin = os.lstat(layout.incoming_path(key))
        claimed = os.lstat(layout.processing_path(key))
    except FileNotFoundError:
        return
    if same_file(twin, claimed):
        os.unlink(layout.incoming_path(key))
        log.info("finished an interrupted claim of %s", key)


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
                unfinished.append(key)
    return unfinished, unreadable


def find_quarantined(layout: Layout) -> list[dict[str, object]]:
    """Blocking: the reason records of the files still in the failed folder, oldest first,
    so that status keeps showing them after a restart. Unreadable records are skipped."""
    records: list[dict[str, object]] = []
    for folder, _, names in os.walk(layout.failed_reasons_root):
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                record = json.loads((Path(folder) / name).read_bytes())
            except (OSError, ValueError, RecursionError):
                continue
            where = record.get("path") if isinstance(record, dict) else None
            if isinstance(where, str) and os.path.lexists(where):
                records.append(record)
    return sorted(records, key=lambda record: str(record.get("quarantined_at", "")))


async def recover(layout: Layout, nfs: ThreadLane) -> Recovered:
    state = await nfs.run(read_state, layout.state_file)
    unfinished, unreadable = await nfs.run(find_unfinished, layout)
    quarantined = await nfs.run(find_quarantined, layout)
    if unfinished:
        log.info("recovery found %d unfinished files", len(unfinished))
    for problem in unreadable:
        log.warning("recovery could not read %s; GC queues what it finds there later", problem)
    if state.active:
        log.info("session %s was active before the restart", state.session_name)
    return Recovered(state, unfinished, unreadable, quarantined)
