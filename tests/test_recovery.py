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
from uploader.lanes import ThreadLane
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

    found = find_quarantined(layout, keep=3)

    assert found.count == 5
    assert [record["file"] for record in found.recent] == ["f2", "f3", "f4"]


def test_files_no_longer_in_the_failed_folder_and_broken_records_are_left_out(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    kept = quarantined_file(layout, "kept", "2024-01-02T00:00:01+00:00")
    quarantined_file(layout, "moved-back", "2024-01-02T00:00:02+00:00").unlink()
    reasons = layout.failed_reasons_root / "20240102" / "s"
    (reasons / "broken.json").write_text("{not json")
    (reasons / "kept.json.tmp").write_text("{}")  # a write that a crash interrupted

    found = find_quarantined(layout)

    assert found.count == 1
    assert [record["path"] for record in found.recent] == [str(kept)]


def test_a_record_written_before_records_named_their_file_is_found_by_its_place(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    failed = quarantined_file(layout, "old", "2024-01-02T00:00:01+00:00")
    reason = layout.failed_reason_path(failed)
    record = json.loads(reason.read_bytes())
    del record["path"]
    reason.write_text(json.dumps(record))

    found = find_quarantined(layout)

    assert found.count == 1 and found.recent[0]["path"] == str(failed)


def test_the_files_quarantined_since_a_time_are_named_apart(tmp_path: Path) -> None:
    """So that a running service does not count twice what it quarantined itself."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    quarantined_file(layout, "before", "2024-01-02T00:00:01+00:00")
    during = quarantined_file(layout, "during", "2024-01-02T00:00:05+00:00")

    found = find_quarantined(layout, since="2024-01-02T00:00:05+00:00")

    assert found.count == 2 and found.since == {str(during)}


def interrupted_quarantine(layout: Layout, rel: str, *, with_reason: bool) -> tuple[Path, Path]:
    """A crash after quarantine's link into the failed folder, before its unlink of the
    claimed name: (processing path, failed path), one file under both."""
    key = FileKey("20240102", "s", rel)
    processing = layout.processing_path(key)
    processing.parent.mkdir(parents=True, exist_ok=True)
    processing.write_bytes(b"claimed")
    failed = layout.failed_path(key)
    failed.parent.mkdir(parents=True, exist_ok=True)
    if failed.exists():  # an earlier file of that name: the quarantine took a numbered name
        failed = failed.with_name(failed.name + ".1")
    os.link(processing, failed)
    if with_reason:
        reason = layout.failed_reason_path(failed)
        reason.parent.mkdir(parents=True, exist_ok=True)
        reason.write_text(json.dumps({"file": rel, "path": str(failed), "quarantined_at": "2024-01-02T00:00:09+00:00"}))
    return processing, failed


@pytest.mark.parametrize("with_reason", [False, True])
def test_recovery_takes_back_a_quarantine_a_crash_interrupted(tmp_path: Path, with_reason: bool) -> None:
    """The file is claimed still: it is tried again, and not also listed as quarantined."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    processing, failed = interrupted_quarantine(layout, "sub/x.bin", with_reason=with_reason)

    unfinished, _ = find_unfinished(layout)

    assert unfinished == [FileKey("20240102", "s", "sub/x.bin")]
    assert processing.read_bytes() == b"claimed" and os.lstat(processing).st_nlink == 1
    assert not failed.exists() and not layout.failed_reason_path(failed).exists()
    assert find_quarantined(layout).count == 0


def test_taking_back_an_interrupted_quarantine_leaves_an_earlier_file_of_its_name(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    earlier = quarantined_file(layout, "x.bin", "2024-01-02T00:00:01+00:00")
    _, failed = interrupted_quarantine(layout, "x.bin", with_reason=True)
    assert failed != earlier

    find_unfinished(layout)

    assert not failed.exists() and earlier.read_bytes() == b"bad"
    assert find_quarantined(layout).count == 1


def test_recovery_takes_back_a_quarantine_apart_that_a_crash_interrupted(tmp_path: Path) -> None:
    """'a' was quarantined before, so 'a/b' went to a folder apart, where the crash left it."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    earlier = quarantined_file(layout, "a", "2024-01-02T00:00:01+00:00")
    key = FileKey("20240102", "s", "a/b")
    processing = layout.processing_path(key)
    processing.parent.mkdir(parents=True)
    processing.write_bytes(b"claimed")
    apart, reason = layout.failed_apart(key, os.lstat(processing))
    apart.parent.mkdir(parents=True)
    os.link(processing, apart)
    reason.parent.mkdir(parents=True)
    reason.write_text(json.dumps({"file": "a/b", "path": str(apart)}))

    unfinished, _ = find_unfinished(layout)

    assert key in unfinished and os.lstat(processing).st_nlink == 1
    assert not apart.exists() and not reason.exists() and earlier.exists()
    assert find_quarantined(layout).count == 1


def test_an_interrupted_quarantine_under_a_number_is_taken_back_though_a_lower_one_is_free(
    tmp_path: Path,
) -> None:
    """x.bin was in the failed folder, so the quarantine took x.bin.1; x.bin has been sent
    again since (moved out, as the README says), which leaves a gap before x.bin.1."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    earlier = quarantined_file(layout, "x.bin", "2024-01-02T00:00:01+00:00")
    _, failed = interrupted_quarantine(layout, "x.bin", with_reason=True)
    earlier.unlink()

    find_unfinished(layout)

    assert not failed.exists() and find_quarantined(layout).count == 0


def test_a_claimed_file_with_another_hard_link_is_not_taken_for_a_quarantine(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    kept = quarantined_file(layout, "x.bin", "2024-01-02T00:00:01+00:00")
    key = FileKey("20240102", "s", "y.bin")
    layout.processing_path(key).parent.mkdir(parents=True, exist_ok=True)
    os.link(kept, layout.processing_path(key))  # someone's link to a quarantined file

    unfinished, _ = find_unfinished(layout)

    assert unfinished == [key] and kept.exists() and find_quarantined(layout).count == 1


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


async def test_recovery_makes_the_service_s_own_folders_under_the_processing_root(tmp_path: Path) -> None:
    """Made now, a completion or quarantine later only looks them up: a mkdir in the
    processing root would wait behind a listing of it that a hung share holds."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "stage")
    layout.processing_root.mkdir()
    await recovery.recover(layout, ThreadLane("nfs", 1))
    for folder in (layout.completed_root, layout.failed_files_root, layout.failed_reasons_root,
                   layout.drains_root):
        assert folder.is_dir()
