"""Unit tests for what recovery reads back from the processing root (uploader/recovery.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from uploader.fileops import quarantine
from uploader.layout import FileKey, Layout
from uploader.recovery import find_quarantined, find_unfinished


def quarantined_file(layout: Layout, name: str, at: str) -> Path:
    key = FileKey("20240102", "s", name)
    processing = layout.processing_path(key)
    processing.parent.mkdir(parents=True, exist_ok=True)
    processing.write_bytes(b"bad")
    failed = layout.failed_path(key)
    return quarantine(processing, failed, layout.failed_reason_path(failed), {"file": name, "quarantined_at": at})


def test_the_failed_folder_is_counted_and_its_last_records_listed_oldest_first(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    for n in range(5):
        quarantined_file(layout, f"f{n}", f"2024-01-02T00:00:0{n}+00:00")

    count, recent = find_quarantined(layout, keep=3)

    assert count == 5
    assert [record["file"] for record in recent] == ["f2", "f3", "f4"]


def test_files_no_longer_in_the_failed_folder_and_broken_records_are_left_out(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    kept = quarantined_file(layout, "kept", "2024-01-02T00:00:01+00:00")
    quarantined_file(layout, "moved-back", "2024-01-02T00:00:02+00:00").unlink()
    reasons = layout.failed_reasons_root / "20240102" / "s"
    (reasons / "broken.json").write_text("{not json")
    (reasons / "kept.json.tmp").write_text("{}")  # a write that a crash interrupted

    count, recent = find_quarantined(layout)

    assert count == 1
    assert [record["path"] for record in recent] == [str(kept)]


def test_a_record_written_before_records_named_their_file_is_found_by_its_place(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    failed = quarantined_file(layout, "old", "2024-01-02T00:00:01+00:00")
    reason = layout.failed_reason_path(failed)
    record = json.loads(reason.read_bytes())
    del record["path"]
    reason.write_text(json.dumps(record))

    count, recent = find_quarantined(layout)

    assert count == 1 and recent[0]["path"] == str(failed)


def interrupted_claim(tmp_path: Path) -> tuple[Layout, Path, Path]:
    """A crash between the claim's link and its unlink: one file under two names."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    key = FileKey("20240102", "s", "sub/a.bin")
    incoming, processing = layout.incoming_path(key), layout.processing_path(key)
    incoming.parent.mkdir(parents=True)
    incoming.write_bytes(b"data")
    processing.parent.mkdir(parents=True)
    os.link(incoming, processing)
    return layout, incoming, processing


def test_recovery_finishes_a_claim_a_crash_interrupted(tmp_path: Path) -> None:
    layout, incoming, processing = interrupted_claim(tmp_path)
    unfinished, _ = find_unfinished(layout)
    assert unfinished == [FileKey("20240102", "s", "sub/a.bin")]
    assert not incoming.exists() and processing.read_bytes() == b"data"


def test_recovery_deletes_nothing_behind_a_folder_replaced_by_a_symlink(tmp_path: Path) -> None:
    layout, incoming, _ = interrupted_claim(tmp_path)
    moved = tmp_path / "elsewhere"
    incoming.parent.rename(moved)  # the user's folder, moved out, a link left in its place
    incoming.parent.symlink_to(moved)
    unfinished, _ = find_unfinished(layout)
    assert unfinished == [FileKey("20240102", "s", "sub/a.bin")]
    assert (moved / "a.bin").read_bytes() == b"data"  # outside incoming: never touched
