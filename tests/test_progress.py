"""The counters and what /v1/status shows of them."""

from __future__ import annotations

import json
import os

from uploader.layout import FileKey
from uploader.progress import Progress


def test_a_quarantined_path_that_is_no_utf8_is_shown_as_valid_unicode() -> None:
    progress = Progress()
    raw = os.fsdecode(b"/share/.processing/.failed/files/20240102/s/bad-\xff.bin")
    progress.quarantined.append({"file": "bad-%FF.bin", "path": raw})
    [shown] = progress.snapshot()["quarantined"]  # type: ignore[misc]
    assert shown["path"] == "/share/.processing/.failed/files/20240102/s/bad-%FF.bin"
    json.dumps(shown, ensure_ascii=False).encode("utf-8")  # no lone surrogate left
    assert progress.quarantined[0]["path"] == raw  # kept as it is for recovery


def test_a_long_error_is_shortened_and_still_resolved() -> None:
    progress = Progress()
    message = "cannot do it: " + "/very/deep" * 500
    progress.note_error(message)
    assert progress.last_error is not None and len(progress.last_error) <= 1000
    assert progress.last_error.endswith(f" ... ({len(message)} characters)")
    progress.resolve_error(message)
    assert progress.last_error is None


def test_a_claim_under_way_shows_until_it_ends() -> None:
    progress = Progress()
    key = FileKey("20240102", "s", "a.bin")
    progress.claim_started(key)
    assert progress.snapshot()["claiming"] == 1 and progress.snapshot()["claimed"] == 0
    progress.claim_ended(key)
    assert progress.snapshot()["claiming"] == 0
