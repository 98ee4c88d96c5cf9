"""GC: remove_empty_folders, and what a sweep removes and what it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from uploader.gc import Sweep, empty_staging, foreign_in_staging, remove_empty_folders, sweep
from uploader.layout import FileKey, Layout
from uploader.progress import Progress

KEY = FileKey("20240102", "s", "sub/a.bin")


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")


def put(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


async def sweep_once(layout: Layout, progress: Progress) -> Sweep:
    # As the service runs it: in a thread, asking the Trio thread about each file.
    return await trio.to_thread.run_sync(sweep, layout, progress)


async def test_sweep_removes_a_staging_copy_no_file_owns(layout: Layout) -> None:
    copy = put(layout.staging_path(KEY))
    result = await sweep_once(layout, Progress())
    assert not copy.exists()
    assert result.counts["staging"] == 1


async def test_sweep_keeps_the_staging_copy_of_a_claimed_file(layout: Layout) -> None:
    copy = put(layout.staging_path(KEY))
    progress = Progress()
    progress.claimed.add(KEY)
    await sweep_once(layout, progress)
    assert copy.exists()


async def test_sweep_keeps_the_staging_copy_of_a_file_being_claimed(layout: Layout) -> None:
    # claim_and_stage makes the copy before its claim is recorded as done.
    copy = put(layout.staging_path(KEY))
    progress = Progress()
    progress.claim_started(KEY)
    progress.claim_started(KEY)
    progress.claim_ended(KEY)  # another worker's claim of the same name ended meanwhile
    await sweep_once(layout, progress)
    assert copy.exists()
    progress.claim_ended(KEY)
    await sweep_once(layout, progress)
    assert not copy.exists()


async def test_sweep_keeps_the_completed_file_of_a_file_in_flight_until_it_is_done(layout: Layout) -> None:
    """A completion whose move's answer was lost finds there, at its retry, that the move was done."""
    completed = put(layout.completed_path(KEY))
    progress = Progress()
    progress.claimed.add(KEY)
    assert (await sweep_once(layout, progress)).counts["completed"] == 0
    assert completed.exists()
    progress.claimed.discard(KEY)
    assert (await sweep_once(layout, progress)).counts["completed"] == 1
    assert not completed.exists()


async def test_sweep_reports_a_claimed_file_no_worker_owns(layout: Layout) -> None:
    put(layout.processing_path(KEY))
    assert (await sweep_once(layout, Progress())).unowned == {KEY}


async def test_sweep_keeps_drains_and_removes_their_empty_folders(layout: Layout) -> None:
    drain = put(layout.drain_file("20240102", "s"))
    (layout.drains_root / "20240101").mkdir()  # a day whose drains were all claimed
    await sweep_once(layout, Progress())
    assert drain.exists() and sorted(p.name for p in layout.drains_root.iterdir()) == ["20240102"]
    assert (await sweep_once(layout, Progress())).unowned == set()


async def test_sweep_leaves_files_in_a_folder_that_is_no_session(layout: Layout) -> None:
    # Recovery ignores it too: its name was never a session's, so it is not the service's.
    put(layout.processing_root / "20240102" / "bad name" / "a.bin")
    assert (await sweep_once(layout, Progress())).unowned == set()


def test_emptying_staging_removes_only_the_service_s_own(layout: Layout) -> None:
    """A staging root set to a folder in use (a mistyped setting) loses none of its files."""
    root = layout.staging_root
    ours = [put(layout.staging_path(KEY)), put(layout.staging_path(FileKey("20240103", "t", "b"))),
            put(root / ".uploader-probe")]
    theirs = [put(root / "important.txt"), put(root / "app" / "db.sqlite"),
              put(root / "20240102" / "not a session" / "x")]
    (root / "lost+found").mkdir()
    (root / "empty").mkdir()
    assert empty_staging(root) == 2
    assert not any(path.exists() for path in ours) and not (root / "20240103").exists()
    assert all(path.exists() for path in theirs)
    assert (root / "lost+found").is_dir() and (root / "empty").is_dir()
    assert foreign_in_staging(root) == ["app", "empty", "important.txt"]


async def test_sweep_removes_empty_folders_in_staging_only_below_dates(layout: Layout) -> None:
    (layout.staging_root / "lost+found").mkdir(parents=True)
    (layout.staging_root / "20240102" / "s" / "sub").mkdir(parents=True)
    await sweep_once(layout, Progress())
    assert (layout.staging_root / "lost+found").is_dir()
    assert not (layout.staging_root / "20240102").exists()


def test_removes_nested_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    assert remove_empty_folders(tmp_path) == 4
    assert list(tmp_path.iterdir()) == []


def test_keeps_top_by_default(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "empty").mkdir(parents=True)
    remove_empty_folders(top)
    assert top.is_dir()
    assert list(top.iterdir()) == []


def test_empty_top_alone_is_kept_and_counts_nothing(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    assert remove_empty_folders(top) == 0
    assert top.is_dir()


def test_keeps_folders_that_hold_files(tmp_path: Path) -> None:
    (tmp_path / "full" / "deeper").mkdir(parents=True)
    (tmp_path / "full" / "deeper" / "file.csv").write_bytes(b"x")
    (tmp_path / "full" / "empty").mkdir()
    assert remove_empty_folders(tmp_path) == 1
    assert (tmp_path / "full" / "deeper" / "file.csv").read_bytes() == b"x"
    assert not (tmp_path / "full" / "empty").exists()


def test_keeps_folder_whose_only_entry_is_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    top = tmp_path / "top"
    (top / "holder").mkdir(parents=True)
    (top / "holder" / "link").symlink_to(outside, target_is_directory=True)
    assert remove_empty_folders(top) == 0
    assert (top / "holder" / "link").is_symlink()


def test_does_not_follow_symlink_to_empty_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    top = tmp_path / "top"
    top.mkdir()
    (top / "link").symlink_to(outside, target_is_directory=True)
    remove_empty_folders(top, keep_top=False)
    assert (outside / "empty").is_dir()
    assert (top / "link").is_symlink()


def test_keep_top_false_removes_empty_top(tmp_path: Path) -> None:
    top = tmp_path / "20240102"
    (top / "session" / "sub").mkdir(parents=True)
    assert remove_empty_folders(top, keep_top=False) == 3
    assert not top.exists()


def test_keep_top_false_keeps_non_empty_top(tmp_path: Path) -> None:
    top = tmp_path / "20240102"
    (top / "session").mkdir(parents=True)
    (top / "session" / "file.csv").write_bytes(b"x")
    (top / "other").mkdir()
    assert remove_empty_folders(top, keep_top=False) == 1
    assert (top / "session" / "file.csv").exists()


def test_missing_top_removes_nothing(tmp_path: Path) -> None:
    assert remove_empty_folders(tmp_path / "missing") == 0
    assert remove_empty_folders(tmp_path / "missing", keep_top=False) == 0
