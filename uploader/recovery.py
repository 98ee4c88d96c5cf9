"""Start-up recovery: find every file a previous run claimed and did not finish.

Every unfinished file of every session folder under the processing root is queued again
(its blob is overwritten), and the session that was active resumes. A claim that stopped
between ``link()`` and ``unlink()`` left the same file in incoming too: that name is
removed from incoming, so the file goes up once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from uploader.fileops import list_files, same_file
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout, is_date_prefix, is_session_name
from uploader.session import SessionState, read_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    state: SessionState
    unfinished: list[FileKey]


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


def find_unfinished(layout: Layout) -> list[FileKey]:
    """Blocking: list the claimed files of every session (run it in a thread)."""
    unfinished = []
    for date in _subfolders(layout.processing_root):
        if not is_date_prefix(date):
            continue
        for session in _subfolders(layout.processing_root / date):
            if not is_session_name(session):
                log.warning("ignoring %s: not a session folder", layout.processing_root / date / session)
                continue
            scan = list_files(layout.processing_dir(date, session))
            for problem in scan.skipped:
                log.error("recovery could not read an entry of %s/%s: %s", date, session, problem)
            for entry in scan.entries:
                key = FileKey(date, session, entry.rel)
                _drop_incoming_twin(layout, key)
                unfinished.append(key)
    return unfinished


async def recover(layout: Layout, nfs: ThreadLane) -> Recovered:
    state = await nfs.run(read_state, layout.state_file)
    unfinished = await nfs.run(find_unfinished, layout)
    if unfinished:
        log.info("recovery found %d unfinished files", len(unfinished))
    if state.active:
        log.info("session %s was active before the restart", state.session_name)
    return Recovered(state, unfinished)



