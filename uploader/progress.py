"""What the pipeline has done and is doing: the counters behind /v1/status.

Only the Trio thread touches this object, so it needs no locks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime

from uploader.layout import FileKey, printable

RECENT_QUARANTINED = 100
MAX_ERROR_CHARS = 1000


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _shortened(message: str) -> str:
    # A path can be 4 KiB, and some errors name two: status stays readable.
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[: MAX_ERROR_CHARS - 30]} ... ({len(message)} characters)"


@dataclass
class Progress:
    files_processed: int = 0
    files_failed: int = 0  # failed attempts; each one is retried or quarantined
    files_retried: int = 0
    files_quarantined: int = 0
    files_skipped: int = 0  # benign races: the file went away before we could claim it
    bytes_uploaded: int = 0  # bytes of completed files
    bytes_sent: int = 0  # bytes sent to storage, retries included
    bytes_resumed: int = 0  # bytes found already staged in storage and not sent again
    in_flight: int = 0  # files inside a worker right now
    retry_waiting: int = 0
    # Files in the session's folder whose claim keeps failing (a folder the service may not
    # write to, a name too long for the processing folder): retried, never quarantined.
    claims_failing: int = 0
    # Entries of the session's folder its last scan left out (could not read them, or not
    # regular files): they stay in incoming until someone fixes them.
    entries_skipped: int = 0
    # Files in the active session's folder (stable or not, queued or not): the backlog the
    # queue, capped at max_queue_size, does not show. Set by each scan, less each claim since
    # (while the queue is full the watcher waits to offer, and does not scan again).
    incoming_files: int = 0
    incoming_session: str | None = None  # whose folder that is
    last_error: str | None = None
    last_error_at: str | None = None
    # Files claimed from incoming (or recovered) and not yet completed or quarantined.
    claimed: set[FileKey] = field(default_factory=set)
    # Files a worker is claiming right now (by how many workers): the claim may already have
    # made their staging copy, which GC must not take for an orphan before the claim is done.
    claiming: collections.Counter[FileKey] = field(default_factory=collections.Counter)
    quarantined: collections.deque[dict[str, object]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_QUARANTINED)
    )
    # Where the files quarantined by this run went, until the failed folder has been read
    # once at start-up (which must not count them twice); None after.
    quarantined_before_recall: set[str] | None = field(default_factory=set)

    def left_incoming(self, key: FileKey) -> None:
        if key.session == self.incoming_session and self.incoming_files > 0:
            self.incoming_files -= 1

    def is_claimed(self, key: FileKey) -> bool:
        return key in self.claimed or key in self.claiming

    def claim_started(self, key: FileKey) -> None:
        self.claiming[key] += 1

    def claim_ended(self, key: FileKey) -> None:
        self.claiming[key] -= 1
        if self.claiming[key] <= 0:
            del self.claiming[key]

    def note_error(self, message: str) -> None:
        self.last_error = _shortened(message)
        self.last_error_at = utc_now_iso()

    def resolve_error(self, message: str) -> None:
        """``message`` is no longer true (a wait that ended, a write done at last): drop it
        if it is still the last error, rather than leave a claim that misleads."""
        if self.last_error == _shortened(message):
            self.last_error = self.last_error_at = None

    def snapshot(self) -> dict[str, object]:
        return {
            "files_processed": self.files_processed,
            "files_failed": self.files_failed,
            "files_retried": self.files_retried,
            "files_quarantined": self.files_quarantined,
            "files_skipped": self.files_skipped,
            "bytes_uploaded": self.bytes_uploaded,
            "bytes_sent": self.bytes_sent,
            "bytes_resumed": self.bytes_resumed,
            "in_flight": self.in_flight,
            "retry_waiting": self.retry_waiting,
            "claims_failing": self.claims_failing,
            "entries_skipped": self.entries_skipped,
            "incoming_files": self.incoming_files,
            "claimed": len(self.claimed),
            # A claim of a small file copies it to staging in the same call: on a slow or hung
            # share it is here, neither in incoming_files nor yet in in_flight or claimed.
            "claiming": len(self.claiming),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            # A path as valid Unicode, written like the blob names (%XX for bytes that are
            # no UTF-8): JSON readers turn Python's lone surrogates into U+FFFD.
            "quarantined": [{**record, "path": printable(str(record.get("path", "")))}
                            for record in self.quarantined],
        }
