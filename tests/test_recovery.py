"""Unit tests for what recovery reads back from the processing root (uploader/recovery.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from uploader import recovery
from uploader.config import load_settings
from uploader.fileops import quarantine
from uploader.layout import FileKey, Layout
from uploader.recovery import find_quarantined, find_unfinished
from uploader.service import STATE_REFUSED_GIVE_UP_S, Service
from uploader.session import SessionState


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


# --- Service._recover: a state file this user may not read ----------------------------------


async def test_a_state_file_refused_for_long_costs_the_session_not_the_claimed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    settings = load_settings(
        azure_container="abc", azure_auth="key", azure_connection_string="UseDevelopmentStorage=true",
        nfs_incoming_dir=tmp_path / "in", nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "staging",
    )
    claimed = tmp_path / "proc" / "20240102" / "run-1" / "a.csv"
    claimed.parent.mkdir(parents=True)
    claimed.write_bytes(b"a")

    def refused(path: Path) -> SessionState:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(recovery, "read_state", refused)
    service = Service(settings)
    started = trio.current_time()
    recovered = await service._recover()
    assert trio.current_time() - started >= STATE_REFUSED_GIVE_UP_S  # it was given time first
    assert recovered.unfinished == [FileKey("20240102", "run-1", "a.csv")]
    assert recovered.state == SessionState()
    assert recovered.state_problem is not None
    assert recovered.state_problem.startswith(
        f"session state {tmp_path / 'proc' / 'session.json'} cannot be read (EACCES"
    )
