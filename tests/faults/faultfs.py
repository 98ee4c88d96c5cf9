"""A fault-injecting FUSE passthrough filesystem for tests.

The server half mirrors a source folder through pyfuse3 and runs in its own
process, because pyfuse3 keeps process-global state and because the test
process must stay free to make blocking calls on the mount (a call that the
server is told to hang would otherwise hang the server too):

    python -m tests.faults.faultfs SOURCE MOUNTPOINT --control SOCKET_PATH

The client half, `FaultFS`, starts that process, waits for the mount, and steers
it at runtime over the control socket (JSON lines) while a test runs:

    with FaultFS.mount(backing, mnt) as fs:
        fs.fail("open", "incoming/*.bin", errno="ESTALE", times=2)
        rule = fs.hang("read", "incoming/big.bin")
        ...
        fs.release(rule)

Globs are `fnmatch` patterns on the path relative to the mount root; the root
itself is ".". As in fnmatch, "*" also matches "/", so "incoming/*" matches
everything below incoming/. When several fail/hang rules match a request, the
oldest one applies.

Kernel behaviour worth knowing when writing tests against this:
- The VFS retries a path walk or stat that ends in ESTALE once, so one ESTALE
  on lookup/getattr/open is invisible to the caller; use times=2 to see it.
- glibc's readdir() reads ENOENT from getdents as end of directory, so ENOENT
  on readdir looks like an empty folder, not an error.
- Files are opened with direct I/O (every read(2)/write(2) reaches the server,
  so "fail once" on read is seen by the caller), which makes mmap() fail with
  ENODEV. page_cache=True restores caching, and with it the kernel retries a
  failed readahead by itself.
- While a request that holds a directory's lock is hung (create, unlink,
  rename, mkdir, readdir...), other calls needing that directory block in the
  kernel too, as on a hard-mounted NFS share; other directories are unaffected.
- After the server dies the mount stays, and every access fails with ENOTCONN
  (os.path.ismount() then says False); FaultFS.unmount() clears it.
- The kernel waits for a FUSE request the server has read *uninterruptibly*, so
  a process with a thread in a hung request could not even die of SIGKILL. A
  hard NFS mount waits killably, so hung requests mimic that: every
  _HANG_POLL_S the server checks whether the calling process is dying (its
  thread-group leader is a zombie or gone, or a thread of it has SIGKILL
  pending, as after kill -9 or exit_group/os._exit) and if so answers the
  request with EINTR at once, counted as "abandoned" in stats(). A live
  caller's request stays hung until released. read/write/readdir/flush/fsync
  carry no caller, so for those the process that opened the handle counts (a
  process that inherited the handle from a dead opener gets EINTR too).
"""

from __future__ import annotations

import argparse
import ctypes
import errno as errno_mod
import functools
import json
import logging
import os
import shutil
import signal
import socket
import stat as stat_mod
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

try:
    import pyfuse3
except ImportError as _exc:  # the client half and fuse_available() must still import
    pyfuse3 = None  # type: ignore[assignment]
    _PYFUSE3_IMPORT_ERROR: str | None = str(_exc)
else:
    _PYFUSE3_IMPORT_ERROR = None

log = logging.getLogger("faultfs")

REPO_ROOT = Path(__file__).resolve().parents[2]

# Operations that requests are counted under in stats().
OPS: tuple[str, ...] = (
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir",
    "symlink", "rename", "link", "open", "create", "read", "write", "flush", "fsync",
    "release", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "forget",
)
# The kernel ignores errors from release/releasedir and forget has no reply, so
# faults there would test nothing; "*" means all of the rest.
FAULTABLE_OPS: frozenset[str] = frozenset(OPS) - {"release", "releasedir", "forget"}

_AT_FDCWD = -100
_DEFAULT_MAX_TASKS = 512
# How often a hung request checks whether its caller is dying.
_HANG_POLL_S = 0.05
_SIGKILL_MASK = 1 << (signal.SIGKILL - 1)  # in the SigPnd/ShdPnd bitmaps of /proc/*/status


def parse_errno(value: str | int) -> int:
    """An errno number from a number or a name of the errno module ("ESTALE")."""
    if isinstance(value, int):
        return value
    code = getattr(errno_mod, value.upper(), None)
    if not isinstance(code, int) or not value.upper().startswith("E"):
        raise ValueError(f"unknown errno name {value!r}")
    return code


# ---------------------------------------------------------------------------
# Callers of FUSE requests (server side)
# ---------------------------------------------------------------------------


def _proc_status(path: str) -> dict[str, str] | None:
    """The fields of a /proc/.../status file; None when the process or thread is gone."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _start_time(pid: int) -> int | None:
    """When pid started (clock ticks after boot), to tell a reused pid apart; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (in parentheses) may hold spaces; starttime is field 22, state field 3.
    try:
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _sigkill_pending(status: dict[str, str]) -> bool:
    for key in ("SigPnd", "ShdPnd"):
        with suppress(ValueError):
            if int(status.get(key, "0"), 16) & _SIGKILL_MASK:
                return True
    return False


@dataclass(frozen=True)
class Caller:
    """The process (thread group) a FUSE request came from."""

    tgid: int
    tid: int
    start: int | None  # the tgid's start time, to notice pid reuse

    @classmethod
    def of_thread(cls, tid: int) -> Caller | None:
        """The process of thread tid (a FUSE ctx.pid is a thread id); None if unknown."""
        if tid <= 0:
            return None  # a request the kernel made on its own behalf
        status = _proc_status(f"/proc/{tid}/status")
        if status is None:
            return None
        try:
            tgid = int(status["Tgid"])
        except (KeyError, ValueError):
            return None
        return cls(tgid, tid, _start_time(tgid))

    def dying(self) -> bool:
        """Whether the process has begun exiting (or is gone), as exit_group/SIGKILL do.

        exit_group (and a fatal SIGKILL) queues SIGKILL for every thread, and a
        thread stuck in a FUSE request cannot dequeue it; the leader, once out,
        stays a zombie while other threads live.
        """
        if self.start is not None and _start_time(self.tgid) != self.start:
            return True  # gone, or the pid now belongs to another process
        leader = _proc_status(f"/proc/{self.tgid}/status")
        if leader is None:
            return True
        if leader.get("State", "").startswith(("Z", "X")) or _sigkill_pending(leader):
            return True
        try:
            tids = os.listdir(f"/proc/{self.tgid}/task")
        except (FileNotFoundError, ProcessLookupError):
            return True
        for tid in tids:
            if tid == str(self.tgid):
                continue
            status = _proc_status(f"/proc/{self.tgid}/task/{tid}/status")
            if status is not None and _sigkill_pending(status):
                return True
        return False


def _no_caller() -> Caller | None:
    return None


# ---------------------------------------------------------------------------
# Fault rules (server side)
# ---------------------------------------------------------------------------


@dataclass
class Rule:
    id: int
    kind: str  # "fail" | "hang" | "slow"
    op: str
    glob: str
    errno: int = 0
    remaining: int | None = None  # fail: None means always
    delay_s: float = 0.0
    event: trio.Event = field(default_factory=trio.Event)
    hung: int = 0

    def matches(self, op: str, rel_paths: list[str]) -> bool:
        if self.op != op and not (self.op == "*" and op in FAULTABLE_OPS):
            return False
        return any(fnmatchcase(rel, self.glob) for rel in rel_paths)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "op": self.op, "glob": self.glob}
        if self.kind == "fail":
            out["errno"] = errno_mod.errorcode.get(self.errno, str(self.errno))
            out["remaining"] = self.remaining
        elif self.kind == "hang":
            out["hung"] = self.hung
        else:
            out["delay_s"] = self.delay_s
        return out


class FaultInjector:
    """The rule table and counters; everything runs in the one Trio thread, so no locks."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []  # fail and hang, first match wins
        self.slow: list[Rule] = []
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.hung = 0
        self.abandoned = 0  # hung requests answered with EINTR because the caller died
        self.closing = False
        self._next_id = 1

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    @staticmethod
    def _check_op(op: str) -> None:
        if op != "*" and op not in FAULTABLE_OPS:
            raise ValueError(f"unknown op {op!r}; expected '*' or one of {sorted(FAULTABLE_OPS)}")

    def add_fail(self, op: str, glob: str, errno: str | int, times: int | None) -> int:
        self._check_op(op)
        if times is not None and times < 1:
            raise ValueError("times must be None (always) or >= 1")
        rule = Rule(self._new_id(), "fail", op, glob, errno=parse_errno(errno), remaining=times)
        self.rules.append(rule)
        return rule.id

    def add_hang(self, op: str, glob: str) -> int:
        self._check_op(op)
        if self.closing:
            raise RuntimeError("shutting down")
        rule = Rule(self._new_id(), "hang", op, glob)
        self.rules.append(rule)
        return rule.id

    def add_slow_reads(self, glob: str, delay_s: float) -> int:
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        rule = Rule(self._new_id(), "slow", "read", glob, delay_s=delay_s)
        self.slow.append(rule)
        return rule.id

    def remove(self, rule_id: int) -> int:
        """Drop a rule; for a hang rule, wake its blocked requests and return how many."""
        for table in (self.rules, self.slow):
            for rule in table:
                if rule.id == rule_id:
                    table.remove(rule)
                    rule.event.set()
                    return rule.hung
        raise KeyError(f"no rule {rule_id}")

    def release(self, rule_id: int) -> int:
        for rule in self.rules:
            if rule.id == rule_id and rule.kind != "hang":
                raise ValueError(f"rule {rule_id} is a {rule.kind} rule, not a hang")
        return self.remove(rule_id)

    def release_all(self) -> int:
        woken = 0
        for rule in [r for r in self.rules if r.kind == "hang"]:
            woken += self.remove(rule.id)
        return woken

    def clear(self) -> int:
        woken = self.release_all()
        self.rules.clear()
        self.slow.clear()
        return woken

    def stats(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "faults": dict(self.faults),
            "hung": self.hung,
            "abandoned": self.abandoned,
            "rules": [r.describe() for r in (*self.rules, *self.slow)],
        }

    async def gate(
        self,
        op: str,
        rel_paths: Callable[[], list[str]],
        caller: Callable[[], Caller | None] = _no_caller,
    ) -> None:
        """Count a request and apply the first matching fail/hang rule to it.

        rel_paths is a thunk so a rule-free mount never pays for building paths;
        caller likewise, and is only asked when the request hangs. A hung request
        whose caller is dying is answered with EINTR, like a killable NFS wait.
        """
        self.calls[op] += 1
        if not self.rules:
            return
        rels = rel_paths()
        for rule in self.rules:
            if not rule.matches(op, rels):
                continue
            self.faults[op] += 1
            if rule.kind == "fail":
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self.rules.remove(rule)
                log.info("fail %s %s -> %s", op, rels, errno_mod.errorcode.get(rule.errno))
                raise pyfuse3.FUSEError(rule.errno)
            log.info("hang %s %s (rule %d)", op, rels, rule.id)
            rule.hung += 1
            self.hung += 1
            try:
                await self._hang(rule, caller())
            finally:
                rule.hung -= 1
                self.hung -= 1
            return

    async def _hang(self, rule: Rule, caller: Caller | None) -> None:
        """Wait for the rule's release, or raise EINTR once the caller is dying."""
        if caller is None:  # nobody to watch (a kernel-internal request)
            await rule.event.wait()
            return
        while not rule.event.is_set():
            with trio.move_on_after(_HANG_POLL_S):
                await rule.event.wait()
            if not rule.event.is_set() and caller.dying():
                self.abandoned += 1
                log.info("caller %s of a hung request is dying: EINTR", caller)
                raise pyfuse3.FUSEError(errno_mod.EINTR)

    def read_delay(self, rel_paths: Callable[[], list[str]]) -> float:
        if not self.slow:
            return 0.0
        rels = rel_paths()
        delay = max((r.delay_s for r in self.slow if r.matches("read", rels)), default=0.0)
        if delay:
            self.faults["read"] += 1
        return delay


# ---------------------------------------------------------------------------
# The passthrough filesystem (server side)
# ---------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _handler(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn OS errors into FUSE errors with the same errno.

    pyfuse3 lets any other exception escape its main loop, which would take the
    whole mount down in the middle of a test; a bug here should be an EIO instead.
    """

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno_mod.EIO) from None
        except Exception:
            log.exception("faultfs bug in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno_mod.EIO) from None

    return wrapper


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@dataclass
class _DirHandle:
    inode: int
    path: str
    caller: Caller | None = None  # who opened it (readdir has no caller of its own)
    names: list[str] | None = None


_OperationsBase: Any = pyfuse3.Operations if pyfuse3 is not None else object


class FaultOperations(_OperationsBase):  # type: ignore[misc]
    """Passthrough over `source`, using the source's inode numbers as FUSE inodes.

    One inode can have several paths (hard links), so each maps to a set of them.
    """

    # Without writeback caching a write(2) reaches the server before it returns,
    # so an injected write fault shows up at the call that caused it.
    enable_writeback_cache = False

    def __init__(
        self,
        source: str,
        injector: FaultInjector,
        *,
        entry_timeout: float = 0.0,
        attr_timeout: float = 0.0,
        direct_io: bool = True,
    ) -> None:
        super().__init__()
        self.source = os.path.realpath(source)
        self.faults = injector
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.direct_io = direct_io
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {self.source}}
        self._lookups: Counter[int] = Counter()
        self._fd_inode: dict[int, int] = {}
        self._inode_fds: dict[int, set[int]] = {}
        # Who opened each file handle: read/write/flush/fsync have no ctx.
        self._fd_caller: dict[int, Caller | None] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1

    # -- inode/path bookkeeping ---------------------------------------------

    def _rel(self, path: str) -> str:
        if path == self.source:
            return "."
        return path[len(self.source) + 1 :]

    def _rels(self, paths: Iterable[str]) -> Callable[[], list[str]]:
        return lambda: [self._rel(p) for p in paths]

    def _inode_rels(self, inode: int) -> Callable[[], list[str]]:
        return lambda: [self._rel(p) for p in self._paths.get(inode, ())]

    def _path(self, inode: int) -> str:
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno_mod.ENOENT)
        if len(paths) == 1 or inode == pyfuse3.ROOT_INODE:
            return next(iter(paths))
        # Names can go stale when the backing folder is changed behind our
        # back; prefer one that still leads to this inode.
        for path in sorted(paths):
            try:
                if os.lstat(path).st_ino == inode:
                    return path
            except OSError:
                pass
        return min(paths)

    def _child(self, parent_inode: int, name: bytes) -> str:
        return os.path.join(self._path(parent_inode), os.fsdecode(name))

    def _remember(self, inode: int, path: str) -> None:
        """Record a path the kernel now knows the inode by (one lookup count)."""
        self._lookups[inode] += 1
        if inode != pyfuse3.ROOT_INODE:
            self._paths.setdefault(inode, set()).add(path)

    def _drop_path(self, path: str, inode: int | None = None) -> None:
        inodes = [inode] if inode is not None else list(self._paths)
        for ino in inodes:
            paths = self._paths.get(ino)
            if paths is not None and path in paths and ino != pyfuse3.ROOT_INODE:
                paths.discard(path)
                if not paths:
                    del self._paths[ino]

    def _moved(
        self, old: str, new: str, moved: os.stat_result, replaced: os.stat_result | None,
        *, exchange: bool,
    ) -> None:
        """Update the map after old was renamed to new (or swapped with it)."""
        is_dir = stat_mod.S_ISDIR(moved.st_mode) or (
            replaced is not None and stat_mod.S_ISDIR(replaced.st_mode)
        )
        if not is_dir:
            # No descendants, so only the two inodes involved change names.
            if replaced is not None and replaced.st_ino == moved.st_ino:
                return  # two links to one file: rename(2) does nothing
            if replaced is not None:
                self._drop_path(new, replaced.st_ino)
                if exchange:
                    self._paths.setdefault(replaced.st_ino, set()).add(old)
            self._drop_path(old, moved.st_ino)
            self._paths.setdefault(moved.st_ino, set()).add(new)
            return
        for ino, paths in list(self._paths.items()):
            if ino == pyfuse3.ROOT_INODE:
                continue
            updated: set[str] = set()
            for p in paths:
                if _under(p, old):
                    updated.add(new + p[len(old) :])
                elif _under(p, new):
                    if exchange:
                        updated.add(old + p[len(new) :])
                else:
                    updated.add(p)
            if updated:
                self._paths[ino] = updated
            else:
                del self._paths[ino]

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = st.st_ino
        entry.generation = 0
        entry.entry_timeout = self.entry_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _stat_inode(self, inode: int) -> os.stat_result:
        # An open file may have lost all its names (unlinked while open).
        fds = self._inode_fds.get(inode)
        if fds:
            return os.fstat(next(iter(fds)))
        return os.lstat(self._path(inode))

    def _track_fd(self, fd: int, inode: int, ctx: Any) -> None:
        self._fd_inode[fd] = inode
        self._inode_fds.setdefault(inode, set()).add(fd)
        # Resolved now: the opening thread may be gone by the time a read hangs.
        self._fd_caller[fd] = self._opener(ctx)

    @staticmethod
    def _opener(ctx: Any) -> Caller | None:
        return Caller.of_thread(int(getattr(ctx, "pid", 0) or 0))

    @staticmethod
    def _caller(ctx: Any) -> Callable[[], Caller | None]:
        """The caller of a request with a ctx, resolved only if the request hangs."""
        pid = int(getattr(ctx, "pid", 0) or 0)
        return functools.partial(Caller.of_thread, pid) if pid > 0 else _no_caller

    def _fh_caller(self, fh: int) -> Callable[[], Caller | None]:
        return lambda: self._fd_caller.get(fh)

    def _dir_caller(self, handle: _DirHandle) -> Callable[[], Caller | None]:
        return lambda: handle.caller

    def _file_info(self, fd: int) -> pyfuse3.FileInfo:
        # direct_io: every read(2)/write(2) reaches us, so a fault injected "once"
        # is seen by the caller instead of being hidden by the page cache or by
        # the kernel retrying a failed readahead.
        return pyfuse3.FileInfo(fh=fd, direct_io=self.direct_io, keep_cache=False)

    # -- request handlers ---------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            path = parent
        elif text == "..":
            path = parent if parent == self.source else os.path.dirname(parent)
        else:
            path = os.path.join(parent, text)
        await self.faults.gate("lookup", self._rels([path]), self._caller(ctx))
        st = os.lstat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.faults.calls["forget"] += 1
        for inode, nlookup in inode_list:
            self._lookups[inode] -= nlookup
            if self._lookups[inode] > 0:
                continue
            del self._lookups[inode]
            if inode != pyfuse3.ROOT_INODE and inode not in self._inode_fds:
                self._paths.pop(inode, None)

    @_handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        await self.faults.gate("getattr", self._inode_rels(inode), self._caller(ctx))
        return self._attrs(self._stat_inode(inode))

    @_handler
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        await self.faults.gate("setattr", self._inode_rels(inode), self._caller(ctx))
        target: int | str = fh if fh is not None else self._path(inode)
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat_mod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if isinstance(target, int):
                os.chown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            current = os.stat(target) if isinstance(target, int) else os.lstat(target)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            if isinstance(target, int):
                os.utime(target, ns=(atime, mtime))
            else:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(self._stat_inode(inode))

    @_handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        await self.faults.gate("readlink", self._inode_rels(inode), self._caller(ctx))
        return os.fsencode(os.readlink(self._path(inode)))

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        await self.faults.gate("mknod", self._rels([path]), self._caller(ctx))
        os.mknod(path, mode & ~ctx.umask, rdev)
        st = os.lstat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        await self.faults.gate("mkdir", self._rels([path]), self._caller(ctx))
        os.mkdir(path, mode & ~ctx.umask)
        st = os.lstat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await self.faults.gate("unlink", self._rels([path]), self._caller(ctx))
        inode = os.lstat(path).st_ino
        os.unlink(path)
        self._drop_path(path, inode)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await self.faults.gate("rmdir", self._rels([path]), self._caller(ctx))
        inode = os.lstat(path).st_ino
        os.rmdir(path)
        self._drop_path(path, inode)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        await self.faults.gate("symlink", self._rels([path]), self._caller(ctx))
        os.symlink(os.fsdecode(target), path)
        st = os.lstat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self.faults.gate("rename", self._rels([old, new]), self._caller(ctx))
        moved = os.lstat(old)
        try:
            replaced: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            replaced = None
        if flags:
            _renameat2(old, new, flags)
        else:
            os.rename(old, new)
        self._moved(old, new, moved, replaced, exchange=bool(flags & pyfuse3.RENAME_EXCHANGE))

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        new = self._child(new_parent_inode, new_name)
        await self.faults.gate(
            "link", lambda: [*self._inode_rels(inode)(), self._rel(new)], self._caller(ctx)
        )
        # os.link refuses to replace an existing name (EEXIST), which is the
        # no-clobber guarantee the service builds on.
        os.link(self._path(inode), new, follow_symlinks=False)
        st = os.lstat(new)
        self._remember(st.st_ino, new)
        return self._attrs(st)

    @_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        await self.faults.gate("open", self._inode_rels(inode), self._caller(ctx))
        fd = os.open(self._path(inode), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
        self._track_fd(fd, inode, ctx)
        return self._file_info(fd)

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        await self.faults.gate("create", self._rels([path]), self._caller(ctx))
        fd = os.open(path, (flags | os.O_CREAT) & ~os.O_NOCTTY, mode & ~ctx.umask)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._remember(st.st_ino, path)
        self._track_fd(fd, st.st_ino, ctx)
        return self._file_info(fd), self._attrs(st)

    def _fh_rels(self, fh: int) -> Callable[[], list[str]]:
        return self._inode_rels(self._fd_inode.get(fh, -1))

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        rels = self._fh_rels(fh)
        await self.faults.gate("read", rels, self._fh_caller(fh))
        delay = self.faults.read_delay(rels)
        if delay:
            await trio.sleep(delay)
        return os.pread(fh, size, off)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self.faults.gate("write", self._fh_rels(fh), self._fh_caller(fh))
        if self.direct_io:
            return os.pwrite(fh, buf, off)
        # Through the page cache the kernel requires all of buf to be written.
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            done += os.pwrite(fh, view[done:], off + done)
        return done

    @_handler
    async def flush(self, fh: int) -> None:
        await self.faults.gate("flush", self._fh_rels(fh), self._fh_caller(fh))
        # Closing a duplicate reports deferred write errors (as NFS does on
        # close) without closing the handle itself.
        os.close(os.dup(fh))

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.faults.gate("fsync", self._fh_rels(fh), self._fh_caller(fh))
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @_handler
    async def release(self, fh: int) -> None:
        self.faults.calls["release"] += 1
        self._fd_caller.pop(fh, None)
        inode = self._fd_inode.pop(fh, None)
        if inode is not None:
            fds = self._inode_fds.get(inode, set())
            fds.discard(fh)
            if not fds:
                self._inode_fds.pop(inode, None)
                if self._lookups[inode] <= 0:
                    self._lookups.pop(inode, None)
                    if inode != pyfuse3.ROOT_INODE:
                        self._paths.pop(inode, None)
        os.close(fh)

    @_handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.faults.gate("opendir", self._inode_rels(inode), self._caller(ctx))
        path = self._path(inode)
        if not stat_mod.S_ISDIR(os.lstat(path).st_mode):
            raise pyfuse3.FUSEError(errno_mod.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(inode, path, self._opener(ctx))
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs[fh]
        rels, caller = self._inode_rels(handle.inode), self._dir_caller(handle)
        await self.faults.gate("readdir", rels, caller)
        # A listing is a snapshot taken at offset 0, so offsets (indexes into
        # it) stay stable while entries come and go, and rewinddir refreshes it.
        if start_id == 0 or handle.names is None:
            handle.path = self._path(handle.inode)
            handle.names = sorted(os.listdir(handle.path))
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            path = os.path.join(handle.path, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(st), index + 1):
                return
            self._remember(st.st_ino, path)

    @_handler
    async def releasedir(self, fh: int) -> None:
        self.faults.calls["releasedir"] += 1
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs[fh]
        rels, caller = self._inode_rels(handle.inode), self._dir_caller(handle)
        await self.faults.gate("fsyncdir", rels, caller)
        fd = os.open(self._path(handle.inode), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        await self.faults.gate("statfs", lambda: ["."], self._caller(ctx))
        st = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out


def _renameat2(old: str, new: str, flags: int) -> None:
    # os.rename has no flags; RENAME_NOREPLACE/RENAME_EXCHANGE need the syscall.
    libc = ctypes.CDLL(None, use_errno=True)
    res = libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


# ---------------------------------------------------------------------------
# Control channel and process lifecycle (server side)
# ---------------------------------------------------------------------------


def _dispatch(faults: FaultInjector, request: dict[str, Any]) -> Any:
    cmd = request.get("cmd")
    if cmd == "ping":
        return "pong"
    if cmd == "fail":
        return faults.add_fail(
            request["op"], request["glob"], request.get("errno", "EIO"), request.get("times", 1)
        )
    if cmd == "hang":
        return faults.add_hang(request["op"], request["glob"])
    if cmd == "release":
        return faults.release(int(request["rule_id"]))
    if cmd == "release_all":
        return faults.release_all()
    if cmd == "slow_reads":
        return faults.add_slow_reads(request["glob"], float(request["delay_s"]))
    if cmd == "remove":
        return faults.remove(int(request["rule_id"]))
    if cmd == "clear":
        return faults.clear()
    if cmd == "stats":
        return faults.stats()
    raise ValueError(f"unknown command {cmd!r}")


async def _serve_control_client(stream: trio.SocketStream, faults: FaultInjector) -> None:
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    reply: dict[str, Any] = {"ok": True, "result": _dispatch(faults, request)}
                except Exception as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _serve_control(path: str, faults: FaultInjector) -> None:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        with suppress(FileNotFoundError):
            os.unlink(path)
        await sock.bind(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        await trio.serve_listeners(
            functools.partial(_serve_control_client, faults=faults), [listener]
        )


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got signal %d, shutting down", signum)
            shutdown.set()


async def _watch_parent(parent_pid: int, shutdown: trio.Event) -> None:
    # The server runs in its own session (so Ctrl-C goes to pytest, which
    # unmounts cleanly); this makes sure a crashed test run still takes the
    # mount down with it instead of leaving an orphan.
    while True:
        await trio.sleep(0.5)
        if os.getppid() != parent_pid:
            break
    log.warning("parent %d went away, shutting down", parent_pid)
    shutdown.set()


async def _serve(control_path: str, faults: FaultInjector, max_tasks: int) -> None:
    shutdown = trio.Event()
    parent_pid = os.getppid()

    async def stop_when_asked() -> None:
        await shutdown.wait()
        # Release hung requests first: pyfuse3.main() only returns once every
        # in-flight handler has finished.
        faults.closing = True
        faults.clear()
        pyfuse3.terminate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, shutdown)
        nursery.start_soon(_watch_parent, parent_pid, shutdown)
        nursery.start_soon(stop_when_asked)
        nursery.start_soon(_serve_control, control_path, faults)
        # Each FUSE request is handled by one of a pool of pyfuse3 worker tasks;
        # a hung request pins one, so leave plenty.
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


def server_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.faultfs", description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", required=True, help="Unix socket path for the control channel")
    parser.add_argument("--entry-timeout", type=float, default=0.0)
    parser.add_argument("--attr-timeout", type=float, default=0.0)
    parser.add_argument(
        "--page-cache",
        action="store_true",
        help="let reads and writes go through the kernel page cache (default: direct I/O)",
    )
    parser.add_argument("--max-tasks", type=int, default=_DEFAULT_MAX_TASKS)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s faultfs[%(process)d] %(levelname)s %(message)s",
    )
    if pyfuse3 is None:
        print(f"faultfs: pyfuse3 is not importable: {_PYFUSE3_IMPORT_ERROR}", file=sys.stderr)
        return 2
    if not args.source.is_dir():
        print(f"faultfs: source {args.source} is not a directory", file=sys.stderr)
        return 2

    faults = FaultInjector()
    ops = FaultOperations(
        str(args.source),
        faults,
        entry_timeout=args.entry_timeout,
        attr_timeout=args.attr_timeout,
        direct_io=not args.page_cache,
    )
    options = set(pyfuse3.default_options)
    options.add("fsname=faultfs")
    try:
        pyfuse3.init(ops, str(args.mountpoint), options)
    except Exception as exc:
        print(f"faultfs: mounting {args.mountpoint} failed: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, args.control, faults, args.max_tasks)
    finally:
        pyfuse3.close(unmount=True)
    return 0


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


class FaultFSError(RuntimeError):
    pass


def _unescape_mountinfo(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def is_mounted(path: Path | str) -> bool:
    """Whether anything is mounted at path, dead FUSE mounts included.

    os.path.ismount() stats the mount point, which blocks on a hung server and
    returns False for a dead one ("Transport endpoint is not connected"), so
    read the kernel's mount table instead.
    """
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                return True
    return False


def _force_unmount(mountpoint: Path) -> None:
    commands: list[list[str]] = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", "-z", str(mountpoint)])
    if os.geteuid() == 0 and shutil.which("umount"):
        commands.append(["umount", "-l", str(mountpoint)])
    for command in commands:
        if not is_mounted(mountpoint):
            return
        subprocess.run(command, capture_output=True, timeout=10, check=False)


class FaultFS:
    """A running faultfs server and its mount, steered over the control socket.

    Control calls never touch the mount, so they answer even while requests
    are hung, and are quick enough to call from async tests.
    """

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        process: subprocess.Popen[bytes],
        control_path: Path,
        workdir: Path,
    ) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.process = process
        self.control_path = control_path
        self._workdir = workdir
        self._unmounted = False

    @classmethod
    def mount(
        cls,
        source: Path,
        mountpoint: Path,
        *,
        timeout_s: float = 15.0,
        entry_timeout: float = 0.0,
        attr_timeout: float = 0.0,
        page_cache: bool = False,
        debug: bool = False,
    ) -> FaultFS:
        """Start a server mirroring source at mountpoint; return once the mount answers."""
        source = Path(source).resolve()
        mountpoint = Path(mountpoint).resolve()
        # A short, private folder: Unix socket paths are limited to 107 bytes
        # and pytest's tmp_path can be longer than that.
        workdir = Path(tempfile.mkdtemp(prefix="faultfs-"))
        control_path = workdir / "control.sock"
        log_path = workdir / "server.log"
        command = [
            sys.executable, "-m", "tests.faults.faultfs", str(source), str(mountpoint),
            "--control", str(control_path),
            "--entry-timeout", str(entry_timeout),
            "--attr-timeout", str(attr_timeout),
        ]
        if page_cache:
            command.append("--page-cache")
        if debug:
            command.append("--debug")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        fs = cls(source, mountpoint, process, control_path, workdir)
        try:
            fs._wait_ready(timeout_s)
        except BaseException:
            fs.unmount()
            raise
        return fs

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FaultFSError(
                    f"faultfs server exited with {self.process.returncode} before mounting "
                    f"{self.mountpoint}: {self.server_log().strip() or '(no output)'}"
                )
            if is_mounted(self.mountpoint) and self.control_path.exists():
                try:
                    # Answered from the same Trio loop as the FUSE requests,
                    # so the mount is being served by now.
                    self._request({"cmd": "ping"}, timeout_s=1.0)
                    return
                except FaultFSError:
                    pass
            time.sleep(0.02)
        raise FaultFSError(
            f"faultfs did not mount {self.mountpoint} within {timeout_s} s: "
            f"{self.server_log().strip() or '(no output)'}"
        )

    def server_log(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        try:
            return (self._workdir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def _request(self, request: dict[str, Any], timeout_s: float = 10.0) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(str(self.control_path))
                sock.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise FaultFSError(f"faultfs control channel failed: {exc}") from exc
        if not data:
            raise FaultFSError("faultfs control channel closed without a reply")
        reply = json.loads(data)
        if not reply.get("ok"):
            raise FaultFSError(f"faultfs rejected {request}: {reply.get('error')}")
        return reply.get("result")

    # -- steering -------------------------------------------------------------

    def fail(
        self, op: str, glob: str, errno: str | int = "EIO", times: int | None = 1
    ) -> int:
        """Make op on paths matching glob fail with errno, times times (None: always).

        For rename and link the glob may match either the source or the target.
        Returns the rule id (for remove()).
        """
        return int(self._request(
            {"cmd": "fail", "op": op, "glob": glob, "errno": errno, "times": times}
        ))

    def hang(self, op: str, glob: str) -> int:
        """Block op on matching paths until release(rule_id); returns rule_id.

        As on a hard NFS mount, a blocked caller can still be killed: a request
        whose process is dying is answered with EINTR (see stats()["abandoned"]).
        """
        return int(self._request({"cmd": "hang", "op": op, "glob": glob}))

    def release(self, rule_id: int) -> int:
        """Wake the requests hung by a rule and drop it; returns how many were hung."""
        return int(self._request({"cmd": "release", "rule_id": rule_id}))

    def release_all(self) -> int:
        return int(self._request({"cmd": "release_all"}))

    def slow_reads(self, glob: str, delay_s: float) -> int:
        """Delay each read request on matching paths by delay_s; returns the rule id."""
        return int(self._request({"cmd": "slow_reads", "glob": glob, "delay_s": delay_s}))

    def remove(self, rule_id: int) -> None:
        """Drop any rule (releasing it first if it is a hang)."""
        self._request({"cmd": "remove", "rule_id": rule_id})

    def clear(self) -> None:
        """Drop every rule and release every hung request."""
        self._request({"cmd": "clear"})

    def stats(self) -> dict[str, Any]:
        """{"calls": {op: n}, "faults": {op: n}, "hung": n, "abandoned": n, "rules": [...]}.

        abandoned counts hung requests answered with EINTR because their caller died.
        """
        result: dict[str, Any] = self._request({"cmd": "stats"})
        return result

    def wait_hung(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Wait until at least count requests are hung (i.e. have reached the server)."""
        deadline = time.monotonic() + timeout_s
        while True:
            hung = int(self.stats()["hung"])
            if hung >= count:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{hung} requests hung after {timeout_s} s, wanted {count}")
            time.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server (SIGKILL: the NFS server dies; the mount goes dead)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            if sig == signal.SIGKILL:
                self.process.wait(timeout=10)

    # -- teardown -------------------------------------------------------------

    def unmount(self) -> None:
        """Release everything, stop the server, and make sure nothing stays mounted."""
        if self._unmounted:
            return
        self._unmounted = True
        try:
            if self.process.poll() is None:
                with suppress(FaultFSError):
                    self._request({"cmd": "clear"}, timeout_s=2.0)
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            # After SIGKILL (or a crash) the kernel keeps a dead mount whose
            # every access fails with ENOTCONN until someone unmounts it.
            if is_mounted(self.mountpoint):
                _force_unmount(self.mountpoint)
            if is_mounted(self.mountpoint):
                raise FaultFSError(
                    f"{self.mountpoint} is still mounted after stopping faultfs: "
                    f"{self.server_log().strip()}"
                )
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> FaultFS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()


@functools.cache
def fuse_available() -> str | None:
    """None when faultfs can be mounted here, else a one-sentence reason why not."""
    if not os.path.exists("/dev/fuse"):
        return "FUSE is unavailable: /dev/fuse does not exist."
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"FUSE is unavailable: cannot open /dev/fuse ({exc.strerror})."
    if shutil.which("fusermount3") is None:
        return "FUSE is unavailable: fusermount3 is not installed (apt-get install fuse3)."
    if pyfuse3 is None:
        return f"FUSE is unavailable: pyfuse3 is not importable ({_PYFUSE3_IMPORT_ERROR})."
    with tempfile.TemporaryDirectory(prefix="faultfs-probe-") as tmp:
        source, mnt = Path(tmp, "src"), Path(tmp, "mnt")
        source.mkdir()
        mnt.mkdir()
        try:
            with FaultFS.mount(source, mnt, timeout_s=10.0):
                pass
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            return f"FUSE is unavailable: a trial faultfs mount failed ({first_line})."
    return None


if __name__ == "__main__":
    sys.exit(server_main())
