"""Self-tests for the faultfs test filesystem: real FUSE mounts, no mocks."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.faults.faultfs import FaultFS, FaultFSError, fuse_available, is_mounted

pytestmark = pytest.mark.fuse

# Generous next to the milliseconds these calls take, short enough that a bug
# that wedges a call fails the test instead of the suite.
BLOCKED_S = 0.3
TIMEOUT_S = 5.0


class Background:
    """A call running in a daemon thread, so a hang cannot keep pytest from exiting."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc

    def still_blocked(self, after_s: float = BLOCKED_S) -> bool:
        self._thread.join(after_s)
        return self._thread.is_alive()

    def result(self, timeout_s: float = TIMEOUT_S) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"call still blocked after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._value

    def error(self, timeout_s: float = TIMEOUT_S) -> BaseException | None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"call still blocked after {timeout_s} s")
        return self._error


def errno_of(fn: Callable[[], object]) -> int | None:
    """The errno a call fails with, or None if it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


@contextmanager
def child(fs: FaultFS, code: str) -> Iterator[subprocess.Popen[str]]:
    """A Python child running code; released and reaped at the end whatever happens.

    A child stuck in a hung request can only be reaped once the hang ends, so
    release everything before killing it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with suppress(FaultFSError):
                fs.release_all()
            proc.kill()
        proc.communicate(timeout=TIMEOUT_S)


def hang_rule(fs: FaultFS, rule_id: int) -> dict[str, Any]:
    """The hang rule as stats() describes it (it must still be there)."""
    [rule] = [r for r in fs.stats()["rules"] if r["id"] == rule_id]
    return rule


@pytest.fixture
def fs(faultfs: FaultFS) -> FaultFS:
    return faultfs


# -- passthrough --------------------------------------------------------------


def test_writes_through_the_mount_land_in_the_backing_folder_and_back(fs: FaultFS) -> None:
    mnt, src = fs.mountpoint, fs.source
    (mnt / "out.bin").write_bytes(b"x" * 300_000)
    with open(mnt / "out.bin", "ab") as f:
        f.write(b"tail")
    (src / "in.txt").write_text("from the server side")

    assert (src / "out.bin").read_bytes() == b"x" * 300_000 + b"tail"
    assert (mnt / "in.txt").read_text() == "from the server side"
    assert (mnt / "out.bin").stat().st_size == 300_004


def test_setattr_truncates_chmods_and_sets_times(fs: FaultFS) -> None:
    path = fs.mountpoint / "f"
    path.write_bytes(b"0123456789")
    os.truncate(path, 4)
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))

    st = os.stat(fs.source / "f")
    assert (st.st_size, st.st_mode & 0o777, st.st_mtime_ns) == (4, 0o640, 2_000_000_000)
    assert path.read_bytes() == b"0123"


def test_rename_replaces_an_existing_target(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "a").mkdir()
    (mnt / "a" / "new").write_text("new")
    (mnt / "old").write_text("old")
    os.rename(mnt / "a" / "new", mnt / "old")

    assert (mnt / "old").read_text() == "new"
    assert os.listdir(mnt / "a") == []
    assert (fs.source / "old").read_text() == "new"


def test_renamed_directory_keeps_serving_its_contents(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "d" / "sub").mkdir(parents=True)
    (mnt / "d" / "sub" / "f").write_text("deep")
    os.rename(mnt / "d", mnt / "e")

    assert (mnt / "e" / "sub" / "f").read_text() == "deep"
    assert not (mnt / "d").exists()


def test_link_makes_a_hard_link_and_refuses_an_existing_target(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "src").write_text("payload")
    (mnt / "taken").write_text("keep me")
    os.link(mnt / "src", mnt / "dst")

    assert errno_of(lambda: os.link(mnt / "src", mnt / "taken")) == errno.EEXIST
    assert (mnt / "taken").read_text() == "keep me"
    assert (mnt / "dst").read_text() == "payload"
    assert os.stat(mnt / "src").st_nlink == 2
    assert os.stat(fs.source / "dst").st_ino == os.stat(fs.source / "src").st_ino


def test_unlink_mkdir_rmdir_and_readdir(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "dir").mkdir()
    for name in ("b", "a", "c"):
        (mnt / "dir" / name).write_text(name)
    os.unlink(mnt / "dir" / "b")

    assert sorted(os.listdir(mnt / "dir")) == ["a", "c"]
    assert errno_of(lambda: os.rmdir(mnt / "dir")) == errno.ENOTEMPTY
    for name in ("a", "c"):
        os.unlink(mnt / "dir" / name)
    os.rmdir(mnt / "dir")
    assert os.listdir(mnt) == []
    assert os.listdir(fs.source) == []


def test_symlink_readlink_and_statfs(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "target").write_text("t")
    os.symlink("target", mnt / "link")

    assert os.readlink(mnt / "link") == "target"
    assert (mnt / "link").read_text() == "t"
    assert os.statvfs(mnt).f_bsize > 0


def test_a_large_directory_lists_completely(fs: FaultFS) -> None:
    names = {f"file-{i:04d}-with-a-longish-name" for i in range(600)}
    for name in names:
        (fs.source / name).touch()
    assert set(os.listdir(fs.mountpoint)) == names


# -- fail ---------------------------------------------------------------------


def test_fail_once_fails_one_read_then_reads_succeed(fs: FaultFS) -> None:
    (fs.source / "f.bin").write_bytes(b"data")
    fs.fail("read", "*.bin", errno="EIO", times=1)
    path = fs.mountpoint / "f.bin"

    assert errno_of(path.read_bytes) == errno.EIO
    assert path.read_bytes() == b"data"
    assert fs.stats()["faults"] == {"read": 1}


def test_fail_n_times_fails_exactly_n_reads(fs: FaultFS) -> None:
    (fs.source / "f.bin").write_bytes(b"data")
    fs.fail("read", "f.bin", errno="EIO", times=3)
    path = fs.mountpoint / "f.bin"

    assert [errno_of(path.read_bytes) for _ in range(4)] == [errno.EIO] * 3 + [None]


def test_estale_once_on_open_is_retried_away_by_the_kernel(fs: FaultFS) -> None:
    # The VFS retries a path walk that ends in ESTALE once (as it does for
    # NFS), so one ESTALE is invisible and two are what a caller sees.
    (fs.source / "s1").mkdir()
    (fs.source / "s1" / "f.bin").write_bytes(b"data")
    path = fs.mountpoint / "s1" / "f.bin"
    fs.fail("open", "s1/*.bin", errno="ESTALE", times=1)
    assert path.read_bytes() == b"data"
    assert fs.stats()["faults"] == {"open": 1}

    fs.fail("open", "s1/*.bin", errno="ESTALE", times=2)
    assert errno_of(path.read_bytes) == errno.ESTALE
    assert path.read_bytes() == b"data"


def test_fail_always_fails_until_the_rule_is_removed(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "incoming").mkdir()
    (mnt / "done").mkdir()
    (mnt / "incoming" / "f").write_text("x")
    # Matches the target only: rename rules look at both names.
    rule = fs.fail("rename", "done/*", errno="EACCES", times=None)

    for _ in range(3):
        assert errno_of(lambda: os.rename(mnt / "incoming" / "f", mnt / "done" / "f")) == (
            errno.EACCES
        )
    assert os.listdir(fs.source / "incoming") == ["f"]
    fs.remove(rule)
    os.rename(mnt / "incoming" / "f", mnt / "done" / "f")
    assert os.listdir(fs.source / "done") == ["f"]


def test_fail_only_hits_matching_paths(fs: FaultFS) -> None:
    (fs.source / "a.bin").write_bytes(b"a")
    (fs.source / "a.txt").write_bytes(b"t")
    fs.fail("open", "*.bin", errno="EACCES", times=None)

    assert errno_of((fs.mountpoint / "a.bin").read_bytes) == errno.EACCES
    assert (fs.mountpoint / "a.txt").read_bytes() == b"t"


def test_enoent_on_readdir_looks_like_an_empty_folder(fs: FaultFS) -> None:
    # glibc's readdir() turns ENOENT from getdents into end-of-directory
    # (POSIX: a removed directory reads as empty), so callers cannot tell.
    (fs.source / "s1").mkdir()
    (fs.source / "s1" / "f").touch()
    fs.fail("readdir", "s1", errno="ENOENT", times=1)
    assert os.listdir(fs.mountpoint / "s1") == []
    assert os.listdir(fs.mountpoint / "s1") == ["f"]


def test_eio_on_readdir_raises(fs: FaultFS) -> None:
    (fs.source / "s1").mkdir()
    fs.fail("readdir", "s1", errno="EIO", times=1)
    assert errno_of(lambda: os.listdir(fs.mountpoint / "s1")) == errno.EIO


def test_fail_on_write_fsync_and_link(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    fs.fail("write", "w", errno="ENOSPC")
    fs.fail("fsync", "w", errno="EIO")
    fs.fail("link", "w.lnk", errno="EDQUOT")
    with open(mnt / "w", "wb", buffering=0) as f:
        assert errno_of(lambda: f.write(b"abc")) == errno.ENOSPC
        assert f.write(b"abc") == 3
        assert errno_of(lambda: os.fsync(f.fileno())) == errno.EIO
        os.fsync(f.fileno())
    assert errno_of(lambda: os.link(mnt / "w", mnt / "w.lnk")) == errno.EDQUOT
    assert (fs.source / "w").read_bytes() == b"abc"


def test_bad_rules_are_rejected(fs: FaultFS) -> None:
    with pytest.raises(FaultFSError, match="unknown op"):
        fs.fail("frobnicate", "*")
    with pytest.raises(FaultFSError, match="unknown errno"):
        fs.fail("read", "*", errno="ENOTANERRNO")
    assert fs.stats()["rules"] == []


def test_clear_removes_every_rule(fs: FaultFS) -> None:
    (fs.source / "f").write_text("x")
    fs.fail("*", "*", errno="EIO", times=None)
    assert errno_of((fs.mountpoint / "f").read_text) == errno.EIO
    fs.clear()
    assert (fs.mountpoint / "f").read_text() == "x"
    assert fs.stats()["rules"] == []


# -- hang ---------------------------------------------------------------------


def test_hung_read_blocks_only_itself_until_released(fs: FaultFS) -> None:
    (fs.source / "s1").mkdir()
    (fs.source / "s2").mkdir()
    (fs.source / "s1" / "big.bin").write_bytes(b"B" * 100_000)
    (fs.source / "s2" / "other").touch()
    rule = fs.hang("read", "s1/big.bin")

    reader = Background((fs.mountpoint / "s1" / "big.bin").read_bytes)
    fs.wait_hung(1)
    assert reader.still_blocked()
    # Other requests are served meanwhile: each runs as its own Trio task.
    assert os.listdir(fs.mountpoint / "s2") == ["other"]
    assert os.stat(fs.mountpoint / "s1" / "big.bin").st_size == 100_000
    assert fs.stats()["hung"] == 1

    assert fs.release(rule) == 1
    assert reader.result() == b"B" * 100_000
    assert fs.stats()["hung"] == 0
    assert fs.stats()["rules"] == []


def test_release_all_wakes_every_hung_request(fs: FaultFS) -> None:
    for name in ("a", "b"):
        (fs.source / name).write_text(name)
    fs.hang("open", "a")
    fs.hang("read", "b")
    readers = [Background((fs.mountpoint / name).read_text) for name in ("a", "b")]
    fs.wait_hung(2)

    assert fs.release_all() == 2
    assert [r.result() for r in readers] == ["a", "b"]


async def test_hung_lookup_from_trio_with_a_deadline(fs: FaultFS) -> None:
    (fs.source / "f").write_text("x")
    fs.hang("lookup", "f")
    async with trio.open_nursery() as nursery:
        result: list[bool] = []

        async def probe() -> None:
            # abandon_on_cancel: the thread stays stuck in the kernel, but the
            # test can still give up on it.
            exists = await trio.to_thread.run_sync(
                (fs.mountpoint / "f").exists, abandon_on_cancel=True
            )
            result.append(exists)

        nursery.start_soon(probe)
        await trio.to_thread.run_sync(fs.wait_hung, 1, TIMEOUT_S)
        assert result == []
        fs.release_all()
    assert result == [True]


# -- hang: callers that die (hard NFS mounts wait killably) --------------------


@pytest.mark.parametrize(
    ("op", "glob", "code"),
    [
        ("read", "f", "open({path!r}, 'rb').read()"),
        ("open", "f", "open({path!r}, 'rb')"),
        ("readdir", "d", "import os; os.listdir({dir!r})"),
    ],
    ids=["read", "open", "readdir"],
)
def test_sigkill_ends_a_process_in_a_hung_request(
    fs: FaultFS, op: str, glob: str, code: str
) -> None:
    (fs.source / "d").mkdir()
    (fs.source / "d" / "x").touch()
    (fs.source / "f").write_bytes(b"payload")
    rule = fs.hang(op, glob)
    path, folder = str(fs.mountpoint / "f"), str(fs.mountpoint / "d")

    with child(fs, code.format(path=path, dir=folder)) as proc:
        fs.wait_hung(1)
        proc.send_signal(signal.SIGKILL)
        # Without the caller check the kernel would keep the child, a zombie
        # with a thread in D state, until the hang is released.
        assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL

    stats = fs.stats()
    assert (stats["hung"], stats["abandoned"]) == (0, 1)
    assert hang_rule(fs, rule)["hung"] == 0
    # The rule still holds for everyone else.
    blocked = Background(
        lambda: (
            (fs.mountpoint / "f").read_bytes()
            + b"".join(n.encode() for n in os.listdir(fs.mountpoint / "d"))
        )
    )
    fs.wait_hung(1)
    assert blocked.still_blocked()
    fs.release(rule)
    assert blocked.result() == b"payloadx"


def test_exit_from_the_main_thread_ends_a_process_with_a_thread_in_a_hung_read(
    fs: FaultFS,
) -> None:
    (fs.source / "f").write_bytes(b"payload")
    rule = fs.hang("read", "f")
    code = (
        "import os, sys, threading\n"
        f"threading.Thread(target=lambda: open({str(fs.mountpoint / 'f')!r}, 'rb').read()).start()\n"
        "sys.stdin.readline()\n"
        "os._exit(3)\n"
    )
    with child(fs, code) as proc:
        fs.wait_hung(1)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=TIMEOUT_S) == 3

    assert fs.stats()["abandoned"] == 1
    assert hang_rule(fs, rule)["hung"] == 0


def test_a_hung_request_of_a_live_process_stays_hung(fs: FaultFS) -> None:
    (fs.source / "f").write_bytes(b"payload")
    rule = fs.hang("read", "f")
    # The file is opened by the main thread and read by another one, which
    # then ends: the hang must follow the process, not the thread.
    code = (
        "import sys, threading\n"
        f"f = open({str(fs.mountpoint / 'f')!r}, 'rb')\n"
        "t = threading.Thread(target=lambda: sys.stdout.write(f.read().decode()))\n"
        "t.start()\n"
        "t.join()\n"
    )
    with child(fs, code) as proc:
        fs.wait_hung(1)
        time.sleep(1.0)
        assert proc.poll() is None
        stats = fs.stats()
        assert (stats["hung"], stats["abandoned"]) == (1, 0)

        assert fs.release(rule) == 1
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        assert (proc.returncode, out) == (0, "payload")
    assert fs.stats()["abandoned"] == 0


# -- slow reads -----------------------------------------------------------------


def test_slow_reads_delay_each_read_of_matching_files(fs: FaultFS) -> None:
    (fs.source / "slow.bin").write_bytes(b"s" * 10)
    (fs.source / "fast.bin").write_bytes(b"f" * 10)
    fs.slow_reads("slow.*", 0.25)

    start = time.monotonic()
    with open(fs.mountpoint / "slow.bin", "rb", buffering=0) as f:
        assert f.read(10) == b"s" * 10
    slow_s = time.monotonic() - start
    start = time.monotonic()
    assert (fs.mountpoint / "fast.bin").read_bytes() == b"f" * 10
    fast_s = time.monotonic() - start

    assert slow_s >= 0.25
    assert fast_s < 0.2
    assert fs.stats()["faults"] == {"read": 1}


# -- server lifecycle -------------------------------------------------------------


def test_sigkilled_server_leaves_a_dead_mount_that_unmount_removes(fs: FaultFS) -> None:
    (fs.source / "f").write_text("x")
    fs.hang("read", "f")
    reader = Background((fs.mountpoint / "f").read_text)
    fs.wait_hung(1)

    fs.kill()
    err = reader.error()
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOTCONN
    # The kernel keeps the mount, dead: os.path.ismount() says False here.
    assert is_mounted(fs.mountpoint)
    assert errno_of(lambda: os.listdir(fs.mountpoint)) == errno.ENOTCONN

    fs.unmount()
    assert not is_mounted(fs.mountpoint)
    assert os.listdir(fs.mountpoint) == []


def test_sigterm_answers_hung_requests_and_unmounts(fs: FaultFS) -> None:
    (fs.source / "f").write_text("payload")
    fd = os.open(fs.mountpoint / "f", os.O_RDONLY)
    try:
        fs.hang("read", "f")
        reader = Background(lambda: os.pread(fd, 100, 0))
        fs.wait_hung(1)
        fs.process.terminate()

        assert reader.result() == b"payload"
        assert fs.process.wait(timeout=TIMEOUT_S) == 0
        assert not is_mounted(fs.mountpoint)
    finally:
        # The server is gone, so the close itself may report ENOTCONN.
        with suppress(OSError):
            os.close(fd)


def test_mount_failure_reports_the_server_error(tmp_path: Path) -> None:
    reason = fuse_available()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(FaultFSError, match="is not a directory"):
        FaultFS.mount(tmp_path / "missing", tmp_path)
    assert not is_mounted(tmp_path)
