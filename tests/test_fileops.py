"""Unit tests for uploader/fileops.py, on temporary folders only."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.service import REPO_ROOT
from uploader import fileops
from uploader.errors import Disposition, NotARegularFile, SourceChanged, SourceVanished, classify
from uploader.fileops import (
    MAX_BLOCKS_PER_BLOB,
    Claim,
    StagedFile,
    claim,
    in_folder,
    list_files,
    mark_completed,
    quarantine,
    read_block,
    stage_copy,
    write_atomically,
)
from uploader.layout import FileKey, Layout

BLOCK = 64 * 1024


def make_file(path: Path, data: bytes = b"hello") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def expected_of(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_size, info.st_mtime_ns


def pattern(size: int) -> bytes:
    """Bytes that differ from block to block, so a misplaced block changes its MD5."""
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


# --- claim -------------------------------------------------------------------------------


def test_claim_moves_file_keeping_inode(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    target.parent.mkdir()
    inode = os.lstat(source).st_ino

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED

    assert not source.exists()
    assert target.read_bytes() == b"data"
    assert os.lstat(target).st_ino == inode
    assert os.lstat(target).st_nlink == 1


def test_claim_without_expected_attributes(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "a.csv")
    target = tmp_path / "proc" / "a.csv"
    assert claim(source, target, None, tmp_path / "in") is Claim.CLAIMED
    assert target.exists() and not source.exists()


def test_claim_creates_missing_target_folders(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "a.csv")
    target = tmp_path / "proc" / "20240102" / "s" / "deep" / "er" / "a.csv"
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED
    assert target.read_bytes() == b"hello"


def test_claim_missing_source_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "proc" / "a.csv"
    assert claim(tmp_path / "in" / "a.csv", target, None, tmp_path / "in") is Claim.GONE
    assert not target.exists()


def test_claim_symlink_source_is_gone_and_not_followed(tmp_path: Path) -> None:
    outside = make_file(tmp_path / "outside" / "secret.txt", b"secret")
    source = tmp_path / "in" / "link.txt"
    source.parent.mkdir()
    source.symlink_to(outside)
    target = tmp_path / "proc" / "link.txt"

    assert claim(source, target, None, tmp_path / "in") is Claim.GONE

    assert not os.path.lexists(target)
    assert source.is_symlink()
    assert outside.read_bytes() == b"secret"


def test_claim_folder_source_is_gone(tmp_path: Path) -> None:
    source = tmp_path / "in" / "folder"
    source.mkdir(parents=True)
    target = tmp_path / "proc" / "folder"
    assert claim(source, target, None, tmp_path / "in") is Claim.GONE
    assert source.is_dir()
    assert not os.path.lexists(target)


def test_claim_busy_when_target_is_another_file(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"new")
    target = make_file(tmp_path / "proc" / "a.csv", b"older, in flight")

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.BUSY

    assert source.read_bytes() == b"new"
    assert target.read_bytes() == b"older, in flight"
    assert os.lstat(source).st_ino != os.lstat(target).st_ino
    assert os.lstat(source).st_nlink == 1


@pytest.mark.parametrize("what", ["size", "mtime"])
def test_claim_changed_when_attributes_differ(tmp_path: Path, what: str) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    size, mtime_ns = expected_of(source)
    expected = (size + 1, mtime_ns) if what == "size" else (size, mtime_ns - 1_000_000_000)
    target = tmp_path / "proc" / "a.csv"

    assert claim(source, target, expected, tmp_path / "in") is Claim.CHANGED

    assert source.read_bytes() == b"data"
    assert not target.exists()


@pytest.mark.parametrize("how", ["rewritten", "replaced"])
def test_claim_changed_when_the_file_changes_between_its_check_and_its_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    """A writer back at the file (truncated and written again, or a new file renamed over
    it) at the moment of the claim: what was found stable is no longer there."""
    source = make_file(tmp_path / "in" / "a.csv", b"complete content")
    expected = expected_of(source)
    target = tmp_path / "proc" / "a.csv"
    real_link = os.link

    def writer_first(*args: Any, **kwargs: Any) -> None:
        if how == "rewritten":
            source.write_bytes(b"partial")
        else:
            make_file(tmp_path / "in" / ".a.tmp", b"partial").rename(source)
        real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", writer_first)
    assert claim(source, target, expected, tmp_path / "in") is Claim.CHANGED
    assert source.read_bytes() == b"partial" and os.lstat(source).st_nlink == 1
    assert not os.path.lexists(target)


def test_claim_leaves_a_new_version_renamed_onto_the_name_after_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instrument's atomic rewrite (a .tmp renamed onto the name) while the claim checks
    its link: the claimed version goes up, the new one stays in incoming for its turn."""
    source = make_file(tmp_path / "in" / "a.csv", b"version 1")
    expected = expected_of(source)
    target = tmp_path / "proc" / "a.csv"
    real_as_found = fileops._as_found

    def rewritten_meanwhile(*args: Any) -> bool:
        found = real_as_found(*args)
        make_file(tmp_path / "in" / ".a.tmp", b"version 2").rename(source)
        return found

    monkeypatch.setattr(fileops, "_as_found", rewritten_meanwhile)
    assert claim(source, target, expected, tmp_path / "in") is Claim.CLAIMED
    assert target.read_bytes() == b"version 1"
    assert source.read_bytes() == b"version 2"


def test_claim_finishes_interrupted_claim(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    target.parent.mkdir()
    os.link(source, target)  # a crash between link() and unlink()

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.FINISHED

    assert not source.exists()
    assert target.read_bytes() == b"data"
    assert os.lstat(target).st_nlink == 1


def test_claim_within_the_incoming_root_takes_a_file_in_sub_folders(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "s" / "sub" / "deeper" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED
    assert target.read_bytes() == b"data" and not source.exists()


@pytest.mark.parametrize("swapped", ["s", "s/sub"])
def test_claim_never_follows_a_folder_replaced_by_a_symlink(tmp_path: Path, swapped: str) -> None:
    """Between the scan and the claim, someone moves a folder away and leaves a symbolic
    link in its place: the file behind the link is outside incoming, never to be taken."""
    incoming = tmp_path / "in"
    source = make_file(incoming / "s" / "sub" / "a.csv", b"inside")
    expected = expected_of(source)
    moved = tmp_path / "elsewhere"
    (incoming / swapped).rename(moved)
    (incoming / swapped).symlink_to(moved)
    assert source.read_bytes() == b"inside"  # through the link, as a path would go
    target = tmp_path / "proc" / "a.csv"

    assert claim(source, target, expected, incoming) is Claim.GONE
    assert source.read_bytes() == b"inside"
    assert not target.exists()


def test_claim_waits_while_a_file_in_flight_has_the_name_of_one_of_its_folders(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "s" / "a" / "b", b"newer")
    make_file(tmp_path / "proc" / "s" / "a", b"in flight")
    target = tmp_path / "proc" / "s" / "a" / "b"
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.BUSY
    assert source.read_bytes() == b"newer"


def test_claim_replaces_an_empty_folder_of_its_name_left_in_processing(tmp_path: Path) -> None:
    """'a/b' done, its folder not yet swept by GC: the file 'a' need not wait for the sweep."""
    source = make_file(tmp_path / "in" / "s" / "a", b"data")
    target = tmp_path / "proc" / "s" / "a"
    target.mkdir(parents=True)
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED
    assert target.read_bytes() == b"data"


def test_claim_waits_for_a_folder_of_its_name_still_in_use(tmp_path: Path) -> None:
    source = make_file(tmp_path / "in" / "s" / "a", b"data")
    make_file(tmp_path / "proc" / "s" / "a" / "b", b"in flight")
    target = tmp_path / "proc" / "s" / "a"
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.BUSY
    assert (target / "b").read_bytes() == b"in flight" and source.exists()


def test_claim_racing_a_file_that_took_its_folders_name_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'a/b' is claimed while the claim of the file 'a' removes the empty folder 'a' and
    takes its name: 'a/b' waits for 'a', it has not failed."""
    source = make_file(tmp_path / "in" / "s" / "a" / "b", b"data")
    target = tmp_path / "proc" / "s" / "a" / "b"
    target.parent.mkdir(parents=True)
    real_makedirs = os.makedirs

    def folder_gone(*args: Any, **kwargs: Any) -> None:
        target.parent.rmdir()  # the claim of "a" removed the empty folder...
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(target))

    def file_a_there_first(path: Any, *args: Any, **kwargs: Any) -> None:
        make_file(target.parent, b"the file a")  # ...and linked its file there first
        real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "link", folder_gone)
    monkeypatch.setattr(os, "makedirs", file_a_there_first)
    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.BUSY
    assert source.read_bytes() == b"data"


def refuse_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel answers under fs.protected_hardlinks when the file is another user's."""

    def link(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def test_claim_renames_a_file_the_kernel_will_not_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    inode = os.lstat(source).st_ino
    refuse_links(monkeypatch)

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED

    assert not source.exists()
    assert os.lstat(target).st_ino == inode


def test_claim_by_rename_never_replaces_a_file_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"new")
    target = make_file(tmp_path / "proc" / "a.csv", b"older, in flight")
    refuse_links(monkeypatch)

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.BUSY

    assert source.read_bytes() == b"new"
    assert target.read_bytes() == b"older, in flight"


def test_claim_stands_when_the_unlink_failed_but_may_have_been_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS can apply an unlink and still answer EIO: the processing copy is then the only one."""
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    unlink = os.unlink

    def done_but_failed(path: object, *args: object, **kwargs: object) -> None:
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("dir_fd") is not None:  # the name in incoming, in its open folder
            raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(os, "unlink", done_but_failed)

    with pytest.raises(OSError):
        claim(source, target, expected_of(source), tmp_path / "in")

    assert target.read_bytes() == b"data"


def test_an_interrupted_claim_is_not_taken_back_when_incoming_refuses_the_unlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processing copy from before a crash belongs to recovery: it is never removed."""
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    target.parent.mkdir()
    os.link(source, target)  # a crash between link() and unlink()
    refuse_unlink_in(monkeypatch, source.parent)

    with pytest.raises(PermissionError):
        claim(source, target, expected_of(source), tmp_path / "in")

    assert target.read_bytes() == b"data"


def test_claim_by_rename_done_already_is_a_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename retransmitted after it was done answers ENOENT on NFS."""
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    target.parent.mkdir()
    refuse_links(monkeypatch)
    rename = os.rename

    def done_then_enoent(src: object, dst: object, **dir_fds: object) -> None:
        rename(src, dst, **dir_fds)  # type: ignore[arg-type]
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(src))

    monkeypatch.setattr(os, "rename", done_then_enoent)

    assert claim(source, target, expected_of(source), tmp_path / "in") is Claim.CLAIMED
    assert target.read_bytes() == b"data"


def test_quarantine_moves_a_file_the_kernel_will_not_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = layout_in(tmp_path)
    processing = make_file(layout.processing_path(LAYOUT_KEY), b"bad")
    failed = layout.failed_path(LAYOUT_KEY)
    reason_path = layout.failed_reason_path(failed)
    refuse_links(monkeypatch)

    assert quarantine(processing, failed, reason_path, {"n": 1}) == failed

    assert not processing.exists()
    assert failed.read_bytes() == b"bad"
    assert reason_at(reason_path) == {"n": 1}


def refuse_unlink_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Refuse unlinks in ``folder``: by path, or by name in an open folder (claims open
    incoming's folders, and nothing else here does)."""
    unlink = os.unlink

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        if kwargs.get("dir_fd") is not None or Path(os.fsdecode(path)).parent == folder:  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", refuse)


def test_claim_is_taken_back_when_the_file_cannot_leave_incoming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_file(tmp_path / "in" / "a.csv", b"data")
    target = tmp_path / "proc" / "a.csv"
    refuse_unlink_in(monkeypatch, source.parent)

    with pytest.raises(PermissionError):
        claim(source, target, expected_of(source), tmp_path / "in")

    assert source.read_bytes() == b"data"
    assert not os.path.lexists(target)  # nothing left for recovery to upload a second time
    assert os.lstat(source).st_nlink == 1


# --- stage_copy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5],
    ids=["0", "1", "block-1", "block", "block+1", "3block+5"],
)
def test_stage_copy_content_and_hashes(tmp_path: Path, size: int) -> None:
    data = pattern(size)
    source = make_file(tmp_path / "proc" / "a.bin", data)
    target = tmp_path / "staging" / "a.bin"

    staged = stage_copy(source, target, BLOCK)

    assert target.read_bytes() == data
    assert staged.path == target
    assert staged.size == size
    assert staged.mtime_ns == os.lstat(source).st_mtime_ns
    assert staged.md5 == md5(data)
    assert staged.block_size == BLOCK
    assert staged.block_md5s == tuple(
        md5(data[offset : offset + BLOCK]) for offset in range(0, size, BLOCK)
    )
    assert [staged.block_length(i) for i in range(len(staged.block_md5s))] == [
        len(data[offset : offset + BLOCK]) for offset in range(0, size, BLOCK)
    ]


def test_a_copy_that_fails_leaves_nothing_in_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", pattern(3 * 1024 * 1024))
    target = tmp_path / "staging" / "a.bin"
    read, reads = os.read, []

    def fails_second_time(fd: int, n: int) -> bytes:
        reads.append(n)
        if len(reads) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return read(fd, n)

    monkeypatch.setattr(os, "read", fails_second_time)

    with pytest.raises(OSError):
        stage_copy(source, target, BLOCK)

    assert not target.exists()


def test_a_copy_that_fails_late_leaves_a_newer_attempts_copy_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt given up on (its thread still copying) must not delete the next one's copy."""
    source = make_file(tmp_path / "proc" / "a.bin", pattern(3 * 1024 * 1024))
    target = tmp_path / "staging" / "a.bin"
    read, reads = os.read, []

    def newer_attempt_then_failure(fd: int, n: int) -> bytes:
        reads.append(n)
        if len(reads) == 2:
            target.unlink()
            target.write_bytes(b"the next attempt's copy")
            raise OSError(errno.EIO, "Input/output error")
        return read(fd, n)

    monkeypatch.setattr(os, "read", newer_attempt_then_failure)

    with pytest.raises(OSError):
        stage_copy(source, target, BLOCK)

    assert target.read_bytes() == b"the next attempt's copy"


def test_stage_copy_leaves_source_in_place(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", b"abc")
    stage_copy(source, tmp_path / "staging" / "a.bin", BLOCK)
    assert source.read_bytes() == b"abc"


def test_stage_copy_sees_a_change_whose_mtime_was_set_back(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", os.urandom(3 * BLOCK))
    before = os.lstat(source)
    target = tmp_path / "staging" / "a.bin"

    def rewrite_first_block(index: int, offset: int, length: int, md5: bytes) -> None:
        if index == 0:  # already copied: the copy would keep the old bytes
            time.sleep(0.01)
            with source.open("r+b") as f:
                f.write(b"\0" * 16)
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))

    with pytest.raises(SourceChanged):
        stage_copy(source, target, BLOCK, rewrite_first_block)
    assert not target.exists()


def test_stage_copy_overwrites_longer_stale_copy(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", b"short")
    target = make_file(tmp_path / "staging" / "a.bin", b"a much longer stale staging copy")
    staged = stage_copy(source, target, BLOCK)
    assert target.read_bytes() == b"short"
    assert staged.md5 == md5(b"short")


def test_stage_copy_makes_a_new_file_where_an_earlier_copy_was(tmp_path: Path) -> None:
    """The earlier attempt's copy may still run in an abandoned thread, which removes its
    own file when it fails: by inode, so this one must have another."""
    source = make_file(tmp_path / "proc" / "a.bin", b"data")
    target = make_file(tmp_path / "staging" / "a.bin", b"data")
    with open(target, "rb") as earlier:  # (held open, so its inode stays allocated)
        staged = stage_copy(source, target, BLOCK)
        assert os.fstat(earlier.fileno()).st_ino != os.lstat(target).st_ino
        fileops._remove_if_still(target, os.fstat(earlier.fileno()))  # the earlier copy's cleanup
    assert target.read_bytes() == b"data" and staged.path == target


@pytest.mark.parametrize("size", [BLOCK * 3, 10])
def test_stage_copy_stops_at_the_room_made_for_it(tmp_path: Path, size: int) -> None:
    """A file that grew since it was measured: nothing beyond its room is written."""
    source = make_file(tmp_path / "proc" / "a.bin", os.urandom(size))
    target = tmp_path / "staging" / "a.bin"
    with pytest.raises(SourceChanged, match=f"has grown to .* bytes since it was measured \\({size - 1} for its copy\\)"):
        stage_copy(source, target, BLOCK, at_most=size - 1)
    assert not target.exists()
    assert stage_copy(source, target, BLOCK, at_most=size).size == size


def test_stage_copy_of_a_file_growing_under_it_writes_at_most_one_byte_beyond_its_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", os.urandom(100 * 1024))
    target = tmp_path / "staging" / "a.bin"
    real_read, real_write, written = os.read, os.write, 0

    def read_while_it_grows(fd: int, n: int) -> bytes:
        with open(source, "ab") as writer:
            writer.write(os.urandom(1024 * 1024))  # its writer, going on
        return real_read(fd, n)

    def counted_write(fd: int, data: Any) -> int:
        nonlocal written
        n = real_write(fd, data)
        written += n
        return n

    monkeypatch.setattr(os, "read", read_while_it_grows)
    monkeypatch.setattr(os, "write", counted_write)
    with pytest.raises(SourceChanged, match="has grown to"):
        stage_copy(source, target, BLOCK, at_most=100 * 1024)
    assert written <= 100 * 1024 + 1 and not target.exists()


def test_stage_copy_creates_missing_folders(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", b"x")
    target = tmp_path / "staging" / "20240102" / "s" / "sub" / "a.bin"
    stage_copy(source, target, BLOCK)
    assert target.read_bytes() == b"x"


def test_stage_copy_refuses_symlink(tmp_path: Path) -> None:
    outside = make_file(tmp_path / "outside.bin", b"secret")
    source = tmp_path / "proc" / "link.bin"
    source.parent.mkdir()
    source.symlink_to(outside)
    target = tmp_path / "staging" / "link.bin"

    with pytest.raises(NotARegularFile):
        stage_copy(source, target, BLOCK)
    assert not target.exists()


def test_stage_copy_refuses_folder(tmp_path: Path) -> None:
    source = tmp_path / "proc" / "folder"
    source.mkdir(parents=True)
    with pytest.raises(NotARegularFile):
        stage_copy(source, tmp_path / "staging" / "folder", BLOCK)


def test_stage_copy_missing_source_vanished(tmp_path: Path) -> None:
    with pytest.raises(SourceVanished):
        stage_copy(tmp_path / "proc" / "gone.bin", tmp_path / "staging" / "gone.bin", BLOCK)


def test_stage_copy_huge_file_gets_bigger_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Azure's 50,000 blocks, scaled down 100 times with the file: a copy costs a few calls
    # per block, and the rule is the same.
    limit = MAX_BLOCKS_PER_BLOB // 100
    monkeypatch.setattr(fileops, "MAX_BLOCKS_PER_BLOB", limit)
    size = 64 * 1024 * 1024 // 100  # 655 blocks of 1 KiB: too many for one blob
    source = tmp_path / "proc" / "sparse.bin"
    source.parent.mkdir()
    source.touch()
    os.truncate(source, size)

    staged = stage_copy(source, tmp_path / "staging" / "sparse.bin", 1024)

    assert staged.size == size
    assert staged.block_size > 1024
    assert staged.block_size * limit >= size
    assert len(staged.block_md5s) <= limit
    assert len(staged.block_md5s) == -(-size // staged.block_size)
    whole = hashlib.md5(usedforsecurity=False)
    whole.update(bytes(size))
    assert staged.md5 == whole.digest()
    assert staged.block_md5s[0] == md5(bytes(staged.block_size))
    assert staged.block_md5s[-1] == md5(bytes(staged.block_length(len(staged.block_md5s) - 1)))


def test_stage_copy_small_file_keeps_configured_block_size(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", pattern(5000))
    assert stage_copy(source, tmp_path / "staging" / "a.bin", 1024).block_size == 1024


def resident_bytes(path: Path) -> int:
    """How much of a file is in the page cache: mincore(2) on a mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    )
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(byte & 1 for byte in vector.raw) * mmap.PAGESIZE


@pytest.fixture
def page_cache_obeys(tmp_path: Path) -> None:
    """Skip where the filesystem keeps a written, synced file cached whatever it is told."""
    if not sys.platform.startswith("linux"):
        pytest.skip("page cache hints are Linux calls")
    probe = make_file(tmp_path / "probe.bin", os.urandom(256 * 1024))
    with open(probe, "rb+") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_bytes(probe) > 0:
        pytest.skip(f"the filesystem of {tmp_path} keeps dropped pages cached")


@pytest.mark.usefixtures("page_cache_obeys")
def test_a_large_staging_copy_leaves_the_page_cache_as_it_is_written(tmp_path: Path) -> None:
    block, blocks = 256 * 1024, 16
    data = os.urandom(block * blocks)
    source = make_file(tmp_path / "proc" / "a.bin", data)
    target = tmp_path / "staging" / "a.bin"

    stage_copy(source, target, block)

    # Only the last blocks, whose write-back was started but not waited for, may stay.
    assert resident_bytes(target) <= 3 * block
    assert target.read_bytes() == data


@pytest.mark.parametrize("when", [1, 3], ids=["starting write-back", "waiting for it"])
def test_a_write_error_seen_by_the_write_behind_fails_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: int
) -> None:
    # The kernel reports a write-back error once: if the write-behind passed over it, the
    # final fsync would succeed on a copy with a block missing.
    calls = []

    def failing_sync_file_range(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append(flags)
        if len(calls) == when:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(fileops, "_sync_file_range", failing_sync_file_range)
    source = make_file(tmp_path / "proc" / "a.bin", pattern(8 * BLOCK))
    target = tmp_path / "staging" / "a.bin"
    with pytest.raises(OSError) as failed:
        stage_copy(source, target, BLOCK)
    assert failed.value.errno == errno.EIO
    assert not target.exists()


def test_a_file_system_without_write_behind_gets_a_plain_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int, flags: int) -> int:
        ctypes.set_errno(errno.ESPIPE)
        return -1

    monkeypatch.setattr(fileops, "_sync_file_range", unsupported)
    data = pattern(8 * BLOCK)
    source = make_file(tmp_path / "proc" / "a.bin", data)
    assert stage_copy(source, tmp_path / "staging" / "a.bin", BLOCK).size == len(data)
    assert (tmp_path / "staging" / "a.bin").read_bytes() == data


@pytest.mark.usefixtures("page_cache_obeys")
def test_read_block_leaves_no_page_cache_behind(tmp_path: Path) -> None:
    path = make_file(tmp_path / "staged.bin", pattern(4 * BLOCK))
    with open(path, "rb+") as file:
        os.fsync(file.fileno())

    read_block(path, 0, 4 * BLOCK)

    assert resident_bytes(path) == 0


# --- in_folder ---------------------------------------------------------------------------


def test_in_folder_makes_the_folder_again_when_gc_removes_a_parent_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "staging" / "20240102" / "s" / "a.bin"
    real_makedirs = os.makedirs
    rounds = []

    def makedirs_raced_by_gc(path: Path, exist_ok: bool = False) -> None:
        rounds.append(path)
        if len(rounds) == 1:
            # GC's rmdir of the empty date folder wins the race with the session folder.
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        real_makedirs(path, exist_ok=exist_ok)

    monkeypatch.setattr(os, "makedirs", makedirs_raced_by_gc)
    in_folder(target, lambda: target.write_bytes(b"x"))
    assert target.read_bytes() == b"x"


# --- read_block --------------------------------------------------------------------------


def test_read_block_returns_requested_bytes(tmp_path: Path) -> None:
    data = pattern(3 * BLOCK + 5)
    path = make_file(tmp_path / "staged.bin", data)
    assert read_block(path, BLOCK, BLOCK) == data[BLOCK : 2 * BLOCK]
    assert read_block(path, 3 * BLOCK, 5) == data[3 * BLOCK :]


def test_read_block_matches_staged_block_md5s(tmp_path: Path) -> None:
    source = make_file(tmp_path / "proc" / "a.bin", pattern(2 * BLOCK + 17))
    staged = stage_copy(source, tmp_path / "staging" / "a.bin", BLOCK)
    for index, digest in enumerate(staged.block_md5s):
        block = read_block(staged.path, index * staged.block_size, staged.block_length(index))
        assert md5(block) == digest


def test_read_block_short_file_is_source_changed(tmp_path: Path) -> None:
    path = make_file(tmp_path / "staged.bin", b"0123456789")
    with pytest.raises(SourceChanged):
        read_block(path, 5, 10)


# --- mark_completed ----------------------------------------------------------------------


def staged_for(tmp_path: Path, data: bytes = b"payload") -> tuple[Path, StagedFile]:
    processing = make_file(tmp_path / "proc" / "20240102" / "s" / "a.bin", data)
    staged = stage_copy(processing, tmp_path / "staging" / "a.bin", BLOCK)
    return processing, staged


def test_an_empty_folder_left_where_a_copy_or_a_completed_file_goes_is_replaced(tmp_path: Path) -> None:
    """'a/b' done and gone, its folders not yet swept by GC: now the file 'a'."""
    processing = make_file(tmp_path / "proc" / "20240102" / "s" / "a", b"payload")
    (tmp_path / "staging" / "a").mkdir(parents=True)
    completed = tmp_path / "done" / "a"
    completed.mkdir(parents=True)
    staged = stage_copy(processing, tmp_path / "staging" / "a", BLOCK)
    mark_completed(processing, completed, staged)
    assert staged.path.read_bytes() == completed.read_bytes() == b"payload"


def test_a_folder_in_use_where_a_copy_goes_is_left_alone(tmp_path: Path) -> None:
    processing = make_file(tmp_path / "proc" / "a", b"payload")
    make_file(tmp_path / "staging" / "a" / "b", b"someone's copy")
    with pytest.raises(OSError) as failed:
        stage_copy(processing, tmp_path / "staging" / "a", BLOCK)
    # Not the file's fault: its turn comes once that copy is cleaned up.
    assert failed.value.errno == errno.EBUSY
    assert classify(failed.value) is Disposition.RETRYABLE
    assert (tmp_path / "staging" / "a" / "b").read_bytes() == b"someone's copy"


def test_mark_completed_moves_file(tmp_path: Path) -> None:
    processing, staged = staged_for(tmp_path)
    inode = os.lstat(processing).st_ino
    completed = tmp_path / "proc" / ".completed" / "20240102" / "s" / "a.bin"

    mark_completed(processing, completed, staged)

    assert not processing.exists()
    assert completed.read_bytes() == b"payload"
    assert os.lstat(completed).st_ino == inode


def test_mark_completed_size_changed(tmp_path: Path) -> None:
    processing, staged = staged_for(tmp_path)
    with processing.open("ab") as f:
        f.write(b"more")
    os.utime(processing, ns=(staged.mtime_ns, staged.mtime_ns))  # only the size differs
    completed = tmp_path / "done" / "a.bin"

    with pytest.raises(SourceChanged):
        mark_completed(processing, completed, staged)
    assert processing.exists()
    assert not completed.exists()


def test_mark_completed_mtime_changed(tmp_path: Path) -> None:
    processing, staged = staged_for(tmp_path)
    later = staged.mtime_ns + 5_000_000_000
    os.utime(processing, ns=(later, later))
    completed = tmp_path / "done" / "a.bin"

    with pytest.raises(SourceChanged):
        mark_completed(processing, completed, staged)
    assert processing.exists()
    assert not completed.exists()


def test_mark_completed_content_changed_with_its_mtime_set_back(tmp_path: Path) -> None:
    """A writer that rewrites the file and restores its mtime (touch -r, rsync -t) cannot
    hide the change: the ctime moved."""
    processing, staged = staged_for(tmp_path)
    time.sleep(0.01)  # a ctime tick later, on coarse clocks too
    with processing.open("r+b") as f:
        f.write(b"PAYLOAD")
    os.utime(processing, ns=(staged.mtime_ns, staged.mtime_ns))
    assert (os.lstat(processing).st_size, os.lstat(processing).st_mtime_ns) == (staged.size, staged.mtime_ns)
    completed = tmp_path / "done" / "a.bin"

    with pytest.raises(SourceChanged):
        mark_completed(processing, completed, staged)
    assert processing.exists()
    assert not completed.exists()


@pytest.mark.parametrize("change", ["chmod", "another name of the inode"])
def test_mark_completed_reads_the_file_again_where_only_its_ctime_moved(
    tmp_path: Path, change: str
) -> None:
    """Hard links of one file in a session: each one's claim and completion moves the shared
    inode's ctime. Same bytes: completed, not sent again."""
    processing, staged = staged_for(tmp_path)
    time.sleep(0.01)  # a ctime tick later, on coarse clocks too
    if change == "chmod":
        processing.chmod(0o600)
    else:
        os.link(processing, tmp_path / "sibling")
    assert os.lstat(processing).st_ctime_ns != staged.ctime_ns
    completed = tmp_path / "done" / "a.bin"

    mark_completed(processing, completed, staged)
    assert completed.read_bytes() == b"payload"


def test_a_verified_file_the_completed_folder_cannot_take_is_removed_where_it_is(tmp_path: Path) -> None:
    """The completed file "a", its removal failed and GC not yet by, where "a/b" goes."""
    processing = make_file(tmp_path / "proc" / "20240102" / "s" / "a" / "b", b"payload")
    staged = stage_copy(processing, tmp_path / "staging" / "a" / "b", BLOCK)
    make_file(tmp_path / "done" / "a", b"the file a, completed")

    mark_completed(processing, tmp_path / "done" / "a" / "b", staged)
    assert not processing.exists()
    assert (tmp_path / "done" / "a").read_bytes() == b"the file a, completed"


def test_a_write_while_the_file_is_read_again_at_completion_counts_as_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the ctime moved, so the file is read again; a writer behind that read changes it
    after the bytes were read: the bytes read match the blob, the file no longer does."""
    processing, staged = staged_for(tmp_path)
    time.sleep(0.01)
    processing.chmod(0o600)  # the ctime moves alone
    real_read = os.read
    wrote: list[bool] = []

    def read_then_a_writer_writes(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if not wrote:
            wrote.append(True)
            time.sleep(0.01)  # an mtime tick later, on coarse clocks too
            with processing.open("r+b") as writer:
                writer.write(b"PAYLOAD")
        return data

    monkeypatch.setattr(os, "read", read_then_a_writer_writes)
    with pytest.raises(SourceChanged):
        mark_completed(processing, tmp_path / "done" / "a.bin", staged)
    assert processing.read_bytes() == b"PAYLOAD"


needs_another_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running as another user needs setpriv (util-linux) and root",
)


def as_another_user(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python, given ``folder``) as uid 10001, the Deployment's user."""
    return subprocess.run(
        ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", sys.executable, "-c", script, str(folder)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


MARK_COMPLETED_AFTER_A_CHMOD = r"""
import os, sys
from pathlib import Path
from uploader.fileops import stage_copy, mark_completed
from uploader.errors import SourceChanged
root = Path(sys.argv[1])
processing = root / "proc" / "a.bin"
processing.parent.mkdir(parents=True)
processing.write_bytes(b"payload")
staged = stage_copy(processing, root / "staging" / "a.bin", 4 * 1024 * 1024)
os.chmod(processing, 0o200)  # its owner makes it unreadable: the ctime moves alone
try:
    mark_completed(processing, root / "done" / "a.bin", staged)
except SourceChanged:
    print("SourceChanged")
except OSError as exc:
    print(type(exc).__name__)
else:
    print("completed")
"""


@needs_another_user
def test_a_file_made_unreadable_after_its_upload_counts_as_changed(tmp_path: Path) -> None:
    """It cannot be read again to prove its bytes unchanged: a change (copied again, and
    quarantined if it stays unreadable), not an NFS failure retried for ever."""
    shared = Path(tempfile.mkdtemp(prefix="uploader-chmod-"))
    try:
        shared.chmod(0o777)
        done = as_another_user(MARK_COMPLETED_AFTER_A_CHMOD, shared)
    finally:
        shutil.rmtree(shared)
    assert done.stdout.strip() == "SourceChanged", done.stdout + done.stderr


PROBE_A_FOLDER_ANOTHER_USER_LEFT = """
import sys
from pathlib import Path
from uploader.fileops import probe_writable
root = Path(sys.argv[1])
probe_writable(root)
for failed in (root / "20240101" / "s" / "a.bin", root / "20240101" / "new" / "a.bin"):
    try:
        probe_writable(root, failed)
    except PermissionError as exc:
        print(exc.filename)
"""


@needs_another_user
def test_a_probe_of_staging_fails_where_a_folder_of_the_failed_copy_is_not_writable() -> None:
    """An earlier run as root left a session's staging folder: every copy of the session
    fails there, and the probe must say so, though the top of staging takes files."""
    root = Path(tempfile.mkdtemp(prefix="uploader-staging-"))
    try:
        root.chmod(0o777)
        (root / "20240101" / "s").mkdir(parents=True)  # root's, 0755
        done = as_another_user(PROBE_A_FOLDER_ANOTHER_USER_LEFT, root)
    finally:
        shutil.rmtree(root)
    assert done.stdout.split() == [str(root / "20240101" / "s"), str(root / "20240101")], done.stderr


CLAIM_FILES_ANOTHER_USER_OWNS = """
import sys
from pathlib import Path
from uploader.fileops import claim
root = Path(sys.argv[1])
for name in ("closed", "sticky"):
    try:
        claim(root / "in" / name / "a.bin", root / "proc" / name / "a.bin", None, root / "in")
    except PermissionError as exc:
        print(f"{exc.filename}|{exc.strerror}")
"""


@needs_another_user
def test_a_claim_refused_by_permissions_names_the_folder_its_owner_and_mode() -> None:
    root = Path(tempfile.mkdtemp(prefix="uploader-perm-"))
    try:
        root.chmod(0o755)
        for name, mode in (("closed", 0o755), ("sticky", 0o1777)):
            make_file(root / "in" / name / "a.bin").chmod(0o644)  # root's, as an instrument's
            (root / "in" / name).chmod(mode)
            (root / "proc" / name).mkdir(parents=True)
            os.chown(root / "proc" / name, 10001, 10001)
        done = as_another_user(CLAIM_FILES_ANOTHER_USER_OWNS, root)
    finally:
        shutil.rmtree(root)
    closed, sticky = done.stdout.splitlines()
    assert closed == (f"{root}/in/closed|this folder is not writable by this service "
                      "(owner uid 0, mode 0755; this service runs as uid 10001)"), done.stderr
    assert sticky.startswith(f"{root}/in/sticky/a.bin|its folder is sticky (owner uid 0, mode 1777;")
    assert sticky.endswith("the file belongs to uid 0: only its owner or the folder's may move it")


def test_mark_completed_refuses_a_symlink_put_in_the_file_s_place(tmp_path: Path) -> None:
    processing, staged = staged_for(tmp_path)
    twin = make_file(tmp_path / "elsewhere" / "a.bin", b"payload")
    processing.unlink()
    processing.symlink_to(twin)
    completed = tmp_path / "done" / "a.bin"

    with pytest.raises(SourceChanged):
        mark_completed(processing, completed, staged)
    assert processing.is_symlink()
    assert not completed.exists()


def test_mark_completed_missing_file_vanished(tmp_path: Path) -> None:
    processing, staged = staged_for(tmp_path)
    processing.unlink()
    with pytest.raises(SourceVanished):
        mark_completed(processing, tmp_path / "done" / "a.bin", staged)


def test_mark_completed_twice_is_done_once(tmp_path: Path) -> None:
    """A retry after a rename whose answer was lost finds the file already completed."""
    processing, staged = staged_for(tmp_path)
    completed = tmp_path / "done" / "a.bin"
    mark_completed(processing, completed, staged)
    mark_completed(processing, completed, staged)
    assert completed.read_bytes() == b"payload"


# --- quarantine --------------------------------------------------------------------------


LAYOUT_KEY = FileKey("20240102", "s", "sub/a.bin")


def layout_in(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")


def reason_at(path: Path) -> dict[str, object]:
    """A reason file's record, less where the file went (checked on its own)."""
    record = json.loads(path.read_bytes())
    assert isinstance(record.pop("path"), str)
    return dict(record)


def test_quarantine_moves_file_and_writes_reason(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    processing = make_file(layout.processing_path(LAYOUT_KEY), b"bad")
    failed = layout.failed_path(LAYOUT_KEY)
    reason_path = layout.failed_reason_path(failed)

    where = quarantine(processing, failed, reason_path, {"reason": "EACCES", "attempts": 1})

    assert where == failed
    assert not processing.exists()
    assert failed.read_bytes() == b"bad"
    assert reason_at(reason_path) == {"reason": "EACCES", "attempts": 1}
    assert json.loads(reason_path.read_bytes())["path"] == str(failed)


def test_quarantine_same_name_twice_keeps_both(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    failed = layout.failed_path(LAYOUT_KEY)
    reason_path = layout.failed_reason_path(failed)

    first = make_file(layout.processing_path(LAYOUT_KEY), b"first")
    where_first = quarantine(first, failed, reason_path, {"n": 1})
    second = make_file(layout.processing_path(LAYOUT_KEY), b"second")
    where_second = quarantine(second, failed, reason_path, {"n": 2})

    numbered = failed.with_name(failed.name + ".1")
    assert where_first == failed
    assert where_second == numbered
    assert failed.read_bytes() == b"first"
    assert numbered.read_bytes() == b"second"
    assert reason_at(reason_path) == {"n": 1}
    assert reason_at(layout.failed_reason_path(numbered)) == {"n": 2}
    assert not second.exists()


def test_quarantine_of_a_longest_name_writes_its_reason_twice_over(tmp_path: Path) -> None:
    """A 255-byte name leaves no room for '.json', '.tmp' or '.1': those names are shortened."""
    layout = layout_in(tmp_path)
    key = FileKey("20240102", "s", "U" * 255)
    failed = layout.failed_path(key)
    reason_path = layout.failed_reason_path(failed)

    first = make_file(layout.processing_path(key), b"first")
    assert quarantine(first, failed, reason_path, {"n": 1}) == failed
    second = make_file(layout.processing_path(key), b"second")
    numbered = quarantine(second, failed, reason_path, {"n": 2})

    assert numbered != failed and numbered.read_bytes() == b"second"
    assert reason_at(reason_path) == {"n": 1}
    assert reason_at(layout.failed_reason_path(numbered)) == {"n": 2}
    assert reason_path != layout.failed_reason_path(numbered)


def quarantine_in(layout: Layout, rel: str, data: bytes) -> Path:
    key = FileKey("20240102", "s", rel)
    if layout.processing_path(key).is_dir():
        layout.processing_path(key).rmdir()  # emptied by an earlier quarantine; GC's job
    processing = make_file(layout.processing_path(key), data)
    failed = layout.failed_path(key)
    where = quarantine(processing, failed, layout.failed_reason_path(failed), {"file": rel},
                       partial(layout.failed_apart, key))
    assert not processing.exists()
    assert where.read_bytes() == data
    return where


def reasons_in(layout: Layout) -> dict[str, str]:
    """file -> where its reason says it went, for every reason file."""
    found = {}
    for folder, _, names in os.walk(layout.failed_reasons_root):
        for name in names:
            record = json.loads((Path(folder) / name).read_bytes())
            found[record["file"]] = record["path"]
    return found


@pytest.mark.parametrize("first, then", [("a", "a/b"), ("a/b", "a"), ("a", "a.json/b"), ("a.json/b", "a"),
                                         ("a.json.tmp/b", "a")])
def test_quarantine_where_a_file_and_a_folder_of_one_name_meet(
    tmp_path: Path, first: str, then: str
) -> None:
    """In the failed folder (a file 'a' there, now 'a/b'), or among the reasons (the reason
    of 'a' is 'a.json', beside a user's folder 'a.json'): both files and reasons are kept."""
    layout = layout_in(tmp_path)
    where_first = quarantine_in(layout, first, b"first")
    where_then = quarantine_in(layout, then, b"then")
    assert reasons_in(layout) == {first: str(where_first), then: str(where_then)}
    if first.startswith(f"{then}/"):  # a folder of the name: apart, not a numbered look-alike
        assert where_then.parent.name.startswith(".apart-")
    assert not [name for _, _, names in os.walk(layout.failed_reasons_root) for name in names
                if name.endswith(".tmp")]


def test_quarantine_of_a_path_too_long_for_the_failed_folder_goes_apart(tmp_path: Path) -> None:
    """Its processing path fits in PATH_MAX; with '.failed/files/' in front it would not."""
    layout = layout_in(tmp_path)
    room = 4090 - len(os.fsencode(layout.processing_dir("20240102", "s"))) - 1
    folders = []
    while room > 251:
        folders.append("d" * 250)
        room -= 251
    rel = "/".join([*folders, "f" * room])
    where = quarantine_in(layout, rel, b"long")
    assert where.parent.name.startswith(".apart-") and where.name == "f" * room
    assert reasons_in(layout) == {rel: str(where)}


def test_two_hard_links_of_one_file_quarantined_apart_keep_both_reasons(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    quarantine_in(layout, "p", b"in the way")
    first, second = FileKey("20240102", "s", "p/q/n"), FileKey("20240102", "s", "p/r/n")
    make_file(layout.processing_path(first), b"one file")
    layout.processing_path(second).parent.mkdir(parents=True)
    os.link(layout.processing_path(first), layout.processing_path(second))
    for key in (first, second):
        failed = layout.failed_path(key)
        quarantine(layout.processing_path(key), failed, layout.failed_reason_path(failed),
                   {"file": key.rel}, partial(layout.failed_apart, key))
    reasons = reasons_in(layout)
    assert set(reasons) == {"p", "p/q/n", "p/r/n"} and reasons["p/q/n"] != reasons["p/r/n"]


def test_quarantine_apart_finishes_an_interrupted_quarantine(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    quarantine_in(layout, "a", b"first")
    key = FileKey("20240102", "s", "a/b")
    processing = make_file(layout.processing_path(key), b"then")
    info = os.lstat(processing)
    apart, _ = layout.failed_apart(key, info)
    apart.parent.mkdir(parents=True)
    os.link(processing, apart)  # a crash after the link, before the reason and the unlink

    where = quarantine_in(layout, "a/b", b"then")

    assert where == apart
    assert sorted(p.name for p in apart.parent.iterdir()) == ["b"]  # no second copy
    assert reasons_in(layout)["a/b"] == str(apart)


def test_quarantine_finishes_interrupted_quarantine(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    processing = make_file(layout.processing_path(LAYOUT_KEY), b"bad")
    failed = layout.failed_path(LAYOUT_KEY)
    failed.parent.mkdir(parents=True)
    os.link(processing, failed)  # a crash after link(), before the reason and unlink()

    where = quarantine(processing, failed, layout.failed_reason_path(failed), {"n": 1})

    assert where == failed
    assert not processing.exists()
    assert not failed.with_name(failed.name + ".1").exists()
    assert reason_at(layout.failed_reason_path(failed)) == {"n": 1}


# --- list_files --------------------------------------------------------------------------


def rels(root: Path, extensions: tuple[str, ...] = ()) -> list[str]:
    return sorted(entry.rel for entry in list_files(root, extensions).entries)


def test_list_files_recursive_with_slash_separated_rel_paths(tmp_path: Path) -> None:
    root = tmp_path / "session"
    make_file(root / "top.csv")
    make_file(root / "a" / "b" / "deep.csv")
    make_file(root / "a" / "mid.csv")
    (root / "empty").mkdir()
    assert rels(root) == ["a/b/deep.csv", "a/mid.csv", "top.csv"]


def test_list_files_leaves_out_a_file_system_mounted_inside_and_says_so(tmp_path: Path) -> None:
    """A claim is a link() within one file system: files of a mount inside could never be
    claimed (EXDEV), so they are counted as left out instead of failing claim after claim."""
    from tests.test_local_faults_e2e import small_disk

    root = tmp_path / "session"
    make_file(root / "here.bin", b"x")
    with small_disk(root / "mounted", "1m") as mounted:
        make_file(mounted / "there.bin", b"y")
        scan = list_files(root)
    assert [entry.rel for entry in scan.entries] == ["here.bin"]
    assert scan.skipped == [f"{root / 'mounted'} is another file system mounted in the session "
                            "folder, whose files cannot be claimed"]


def test_list_files_reports_size_and_mtime(tmp_path: Path) -> None:
    root = tmp_path / "session"
    path = make_file(root / "a.csv", b"12345")
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    (entry,) = list_files(root).entries
    assert (entry.rel, entry.size, entry.mtime_ns) == ("a.csv", 5, os.lstat(path).st_mtime_ns)


def test_list_files_skips_symlink_to_file(tmp_path: Path) -> None:
    root = tmp_path / "session"
    make_file(root / "real.csv")
    outside = make_file(tmp_path / "outside.csv")
    (root / "link.csv").symlink_to(outside)
    assert rels(root) == ["real.csv"]


def test_list_files_does_not_follow_symlink_to_folder(tmp_path: Path) -> None:
    root = tmp_path / "session"
    make_file(root / "real.csv")
    make_file(tmp_path / "outside" / "secret.csv")
    (root / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert rels(root) == ["real.csv"]


def test_list_files_does_not_enter_a_folder_replaced_by_a_symlink_while_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "session"
    make_file(root / "sub" / "inside.csv")
    make_file(tmp_path / "outside" / "secret.csv")
    real_open = os.open

    def swap_then_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == "sub":  # listed as a folder; replaced by a link before it is entered
            (root / "sub").rename(tmp_path / "moved")
            (root / "sub").symlink_to(tmp_path / "outside")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swap_then_open)
    scan = list_files(root)
    assert scan.entries == [] and scan.skipped == []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_list_files_leaves_no_descriptor_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "session"
    for rel in ("a/b/c/1.csv", "a/b/2.csv", "a/d/3.csv", "e/4.csv", "5.csv"):
        make_file(root / rel)
    before = open_fds()
    assert len(list_files(root).entries) == 5
    assert open_fds() == before
    real_scandir = os.scandir
    calls = 0

    def fails_in_a_sub_folder(fd: int) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise MemoryError  # not an OSError: it goes through, every descriptor closed
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", fails_in_a_sub_folder)
    with pytest.raises(MemoryError):
        list_files(root)
    assert open_fds() == before


def test_a_session_folder_that_cannot_be_read_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the descriptor it was read through ("EIO on 13")."""
    root = tmp_path / "session"
    make_file(root / "1.csv")

    def fails(fd: int) -> object:
        raise OSError(errno.EIO, os.strerror(errno.EIO), fd)

    monkeypatch.setattr(os, "scandir", fails)
    with pytest.raises(OSError) as failed:
        list_files(root)
    assert failed.value.filename == str(root)


def test_list_files_skips_dangling_symlink(tmp_path: Path) -> None:
    root = tmp_path / "session"
    root.mkdir()
    (root / "dangling.csv").symlink_to(tmp_path / "nowhere")
    scan = list_files(root)
    assert scan.entries == []
    assert scan.skipped == []


def test_list_files_reports_a_fifo_and_never_opens_it(tmp_path: Path) -> None:
    root = tmp_path / "session"
    make_file(root / "a.csv")
    os.mkfifo(root / "pipe.csv")  # an open() of it would wait for a writer
    scan = list_files(root)
    assert [e.rel for e in scan.entries] == ["a.csv"]
    assert scan.skipped == [f"{root / 'pipe.csv'} is a FIFO, socket or device, never uploaded"]


def test_list_files_says_nothing_of_a_fifo_the_extension_filter_leaves_out(tmp_path: Path) -> None:
    root = tmp_path / "session"
    root.mkdir()
    os.mkfifo(root / "app.sock")
    assert list_files(root, (".csv",)).skipped == []


def test_list_files_applies_extensions_case_insensitively(tmp_path: Path) -> None:
    root = tmp_path / "session"
    for name in ("a.csv", "B.CSV", "c.Tif", "d.txt", "e.tar.gz", "csv", "f.csv.bak"):
        make_file(root / name)
    assert rels(root, (".csv", ".tif", ".tar.gz")) == ["B.CSV", "a.csv", "c.Tif", "e.tar.gz"]


def test_list_files_extensions_apply_in_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "session"
    make_file(root / "x.csv" / "inner.txt")  # a folder named like a match is still walked
    make_file(root / "x.csv" / "inner.csv")
    assert rels(root, (".csv",)) == ["x.csv/inner.csv"]


def test_list_files_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "session"
    root.mkdir()
    scan = list_files(root)
    assert scan.entries == [] and scan.skipped == []


def test_list_files_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_files(tmp_path / "missing")


def test_list_files_handles_undecodable_names(tmp_path: Path) -> None:
    root = tmp_path / "session"
    root.mkdir()
    (Path(os.fsdecode(os.fsencode(root) + b"/x\xff.csv"))).write_bytes(b"1")
    assert rels(root) == [os.fsdecode(b"x\xff.csv")]


# --- write_atomically --------------------------------------------------------------------


def test_write_atomically_creates_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "session.json"
    write_atomically(path, b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}'


def test_write_atomically_replaces_content_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = make_file(tmp_path / "session.json", b"old content that is longer")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json"]


def test_write_atomically_never_writes_through_a_symlink_at_its_tmp_name(tmp_path: Path) -> None:
    outside = make_file(tmp_path / "outside.txt", b"not the service's")
    (tmp_path / "nfs").mkdir()
    (tmp_path / "nfs" / "session.json.tmp").symlink_to(outside)
    write_atomically(tmp_path / "nfs" / "session.json", b"state")
    assert outside.read_bytes() == b"not the service's"
    assert not (tmp_path / "nfs" / "session.json").is_symlink()
    assert (tmp_path / "nfs" / "session.json").read_bytes() == b"state"


def test_write_atomically_removes_an_empty_folder_at_its_tmp_name(tmp_path: Path) -> None:
    (tmp_path / "session.json.tmp").mkdir()
    write_atomically(tmp_path / "session.json", b"state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json"]


def test_write_atomically_overwrites_leftover_tmp(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    make_file(tmp_path / "session.json.tmp", b"half-written garbage from a crash")
    write_atomically(path, b"fresh")
    assert path.read_bytes() == b"fresh"
    assert not (tmp_path / "session.json.tmp").exists()
