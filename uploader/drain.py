"""Drains: the files a stopped session had queued, on record on NFS until they are claimed.

Stopping a session stops its watcher; the workers drain what it had queued. The queue is in
memory: a restart before it drained (a crash, a rolling update right after a stop) would
leave those files in incoming for good, the session being stopped. So a stop that leaves
offers unclaimed (or files whose claim failed, which its watcher would have offered again)
writes their names, sizes and mtimes to ``.processing/.drains/<YYYYMMDD>/<session>.json``,
removed once every one of them is claimed. At start-up each drain file left there is caught up: the files it names that are
still in the session's folder, unchanged, are offered again. So are, while the service runs,
those that a claim left there (it failed, NFS said ESTALE, an older file of the name was
still in flight), with a growing delay, until none is left or a watcher of the session lists
the folder again. A file that arrived after the stop is in no drain file: it stays in
incoming, as the stop promised. No clock is compared.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from uploader import fileops
from uploader.errors import describe
from uploader.lanes import ThreadLane
from uploader.layout import FileKey, Layout, is_date_prefix, is_session_name
from uploader.progress import Progress, utc_now_iso
from uploader.telemetry import untraced
from uploader.worker import WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")

# (date_prefix, session)
SessionKey = tuple[str, str]
# (rel, size, mtime_ns): a file as it was when offered.
Offered = tuple[str, int, int]
MAX_RETRY_DELAY_S = 60.0


class SessionNames:
    """What all the offers of one session name share, whatever their dates (a session
    stopped and started again across midnight): they list one folder, and a file of it must
    be offered by one of them at a time."""

    def __init__(self) -> None:
        self.offered: collections.Counter[str] = collections.Counter()
        # Told of each settled offer: a watcher's listing made meanwhile may show the file
        # from before its claim moved it, and must not offer it again.
        self.listeners: list[Callable[[str], None]] = []


class Offers:
    """The files offered to the workers from one session's folder whose claims have not
    settled yet, whichever of the session's watchers (or catch-up) offered them. One per
    (date prefix, session), sharing ``SessionNames`` with the others of that name."""

    def __init__(self, names: SessionNames | None = None) -> None:
        # rel -> ((size, mtime_ns), how many offers of it are out)
        self._pending: dict[str, tuple[tuple[int, int], int]] = {}
        # rel -> (size, mtime_ns): files whose last claim failed (still in incoming) and that
        # are not offered again yet. As good as queued: a stop puts them in its drain too.
        self._failing: dict[str, tuple[int, int]] = {}
        self._names = names if names is not None else SessionNames()
        self.outstanding = 0
        self._settled = trio.Event()
        self._settled.set()

    @contextlib.contextmanager
    def listened(self, listener: Callable[[str], None]) -> Iterator[None]:
        """Tell ``listener`` the name of each file whose offer settles, by any offer of the
        session's name, while in the block."""
        self._names.listeners.append(listener)
        try:
            yield
        finally:
            self._names.listeners.remove(listener)

    def add(self, rel: str, expected: tuple[int, int]) -> None:
        count = self._pending.get(rel, (expected, 0))[1]
        self._pending[rel] = (expected, count + 1)
        self._failing.pop(rel, None)
        self._names.offered[rel] += 1
        self.outstanding += 1
        if self._settled.is_set():
            self._settled = trio.Event()

    def settle(self, rel: str, failed: bool = False) -> None:
        """``failed``: the claim failed, the file is still in incoming (the watcher waits
        before it offers it again; a drain checks what is left anyway)."""
        expected, count = self._pending.get(rel, ((0, 0), 1))
        if count <= 1:
            self._pending.pop(rel, None)
        else:
            self._pending[rel] = (expected, count - 1)
        if failed:
            self._failing[rel] = expected
        else:
            self._failing.pop(rel, None)
        offered = self._names.offered
        offered[rel] -= 1
        if offered[rel] <= 0:
            del offered[rel]
        self.outstanding -= 1
        if self.outstanding == 0:
            self._settled.set()
        for listener in self._names.listeners:
            listener(rel)

    @property
    def is_listened(self) -> bool:
        """Whether someone (a watcher, a drain offering) is told of settled offers now."""
        return bool(self._names.listeners)

    def is_pending(self, rel: str) -> bool:
        """Whether a file of that name is offered and not settled (by another watcher of the
        session, of this date or another, or a catch-up): offered again, it would only be
        found gone, or claimed twice."""
        return rel in self._names.offered

    @property
    def to_record(self) -> bool:
        """Whether a stop now leaves files to drain: offers out, or claims that failed."""
        return bool(self.outstanding or self._failing)

    def snapshot(self) -> list[Offered]:
        """What a stop now leaves to drain: the offers out and the files whose claim failed."""
        files = {rel: expected for rel, (expected, _) in self._pending.items()}
        files.update((rel, expected) for rel, expected in self._failing.items() if rel not in files)
        return [(rel, size, mtime_ns) for rel, (size, mtime_ns) in sorted(files.items())]

    def forget_failing(self, keep: Callable[[str], bool]) -> None:
        """Forget the failed claims of files for which ``keep`` is false (they left incoming)."""
        if self._failing:
            self._failing = {rel: found for rel, found in self._failing.items() if keep(rel)}

    async def wait_settled(self) -> None:
        while self.outstanding:
            await self._settled.wait()


async def offer(
    send: trio.MemorySendChannel[WorkItem],
    offers: Offers,
    key: FileKey,
    expected: tuple[int, int],
    on_settled: Callable[[bool], None] = lambda failed: None,
) -> None:
    """Queue ``key``'s file for a claim that expects it as ``expected`` (size, mtime_ns)."""

    def settled(failed: bool) -> None:
        offers.settle(key.rel, failed)
        on_settled(failed)

    offers.add(key.rel, expected)
    try:
        await send.send(WorkItem(key, claimed=False, expected=expected, on_claim_settled=settled))
    except BaseException:
        offers.settle(key.rel)  # never handed over
        raise


def below_a_file_in_flight(progress: Progress, key: FileKey) -> bool:
    folders = key.rel.split("/")[:-1]
    return any(
        progress.is_claimed(FileKey(key.date_prefix, key.session, "/".join(folders[: depth + 1])))
        for depth in range(len(folders))
    )


def encode_drain(date_prefix: str, session: str, files: list[Offered]) -> bytes:
    # ASCII JSON: a name that is no UTF-8 (lone surrogates) survives the round trip.
    record = {"date_prefix": date_prefix, "session_name": session, "stopped_at": utc_now_iso(),
              "files": [list(entry) for entry in files]}
    return json.dumps(record, ensure_ascii=True).encode()


def decode_drain(raw: bytes) -> tuple[SessionKey, list[Offered]]:
    """ValueError for anything this service did not write."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    date, session, files = record.get("date_prefix"), record.get("session_name"), record.get("files")
    if not (isinstance(date, str) and is_date_prefix(date)):
        raise ValueError(f"date_prefix {date!r} is not YYYYMMDD")
    if not (isinstance(session, str) and is_session_name(session)):
        raise ValueError(f"session_name {session!r} is not a session name")
    if not isinstance(files, list):
        raise ValueError("files is not a list")
    found: list[Offered] = []
    for entry in files:
        if not (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in entry[1:])
        ):
            raise ValueError(f"{entry!r} is not [name, size, mtime_ns]")
        if not _is_relative_path(entry[0]):  # nothing outside the session's folder, ever
            raise ValueError(f"{entry[0]!r} is not a path inside a session's folder")
        found.append((entry[0], entry[1], entry[2]))
    return (date, session), found


def _is_relative_path(rel: str) -> bool:
    try:
        os.fsencode(rel)  # a name read from the share: lone surrogates only as bytes escaped
    except UnicodeEncodeError:
        return False
    return bool(rel) and "\0" not in rel and all(part not in ("", ".", "..") for part in rel.split("/"))


def read_drains(
    layout: Layout, say: Callable[[str], None] = lambda problem: None
) -> list[tuple[Path, SessionKey, list[Offered]]]:
    """Blocking: every drain file left under the processing root; one that cannot be read is
    said (logged, and told to ``say``) and, unless the share failed, removed: it is only
    bookkeeping, its files are still in incoming."""
    def problem(message: str) -> None:
        log.error("%s", message)
        say(message)

    def failed(exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError):  # none there yet: no drain
            return
        if exc.filename is not None and Path(exc.filename) == layout.drains_root:
            raise exc  # the share, failing: read them all again later
        # Kept for the next start; the other drains go on.
        problem(f"cannot read drain folder {exc.filename}: {describe(exc)}")

    found = []
    for folder, _, names in os.walk(layout.drains_root, onerror=failed):
        for name in sorted(names):
            path = Path(folder) / name
            try:
                if not name.endswith(".json"):
                    fileops.remove_quietly(path)  # a write that a crash interrupted (.tmp)
                    continue
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    problem(f"removing drain file {path}, which is not a regular file")
                    fileops.remove_quietly(path)
                    continue
                raw = path.read_bytes()
            except OSError as exc:
                # Kept for the next start; the other drains go on.
                problem(f"cannot read drain file {path}: {describe(exc)}")
                continue
            try:
                key, files = decode_drain(raw)
            except (ValueError, RecursionError) as exc:
                problem(f"removing drain file {path}, which this service did not write: {exc}")
                try:
                    fileops.remove_quietly(path)
                except OSError as refused:
                    problem(f"cannot remove drain file {path}: {describe(refused)}")
                continue
            found.append((path, key, files))
    return found


def still_there(layout: Layout, session: str, files: list[Offered]) -> list[Offered]:
    """Blocking: the files of ``files`` still in the session's folder as they were offered."""
    folder = layout.incoming_dir(session)
    left = []
    for rel, size, mtime_ns in files:
        try:
            info = os.lstat(folder / rel)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                continue
            raise
        if stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (size, mtime_ns):
            left.append((rel, size, mtime_ns))
    return left


def _not_in(names: frozenset[str], rel: str) -> bool:
    return rel not in names


class Drains:
    """Every session's offers, and the drains on record until those are claimed."""

    def __init__(
        self,
        layout: Layout,
        nfs: ThreadLane,
        send: trio.MemorySendChannel[WorkItem],
        progress: Progress,
    ) -> None:
        self.layout = layout
        self.nfs = nfs
        self._send = send
        self.progress = progress
        # Kept while a watcher, a drain or an offer out may use them (see _forget_if_idle).
        self._offers: dict[SessionKey, Offers] = {}
        self._names: dict[str, SessionNames] = {}
        self._files: dict[SessionKey, fileops.OrderedWrites] = {}
        self._waiting: set[SessionKey] = set()  # drains on record, waiting for their claims
        self._forgetting: set[SessionKey] = set()  # those whose claims are being waited for
        self._removing: set[SessionKey] = set()  # those whose files are being removed
        self._recorded: dict[SessionKey, list[Offered]] = {}  # what each drain on record names
        self._stops: collections.Counter[SessionKey] = collections.Counter()  # drains recorded
        self._watched: collections.Counter[str] = collections.Counter()  # names with a watcher
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[Drains] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._send, trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    @contextlib.contextmanager
    def watching(self, date_prefix: str, session: str) -> Iterator[Offers]:
        """While a watcher of the session runs: its offers. The watcher lists the session's
        folder, so a drain of that name offers nothing meanwhile; it goes once what it names
        has left the folder (or is in the hands of an offer)."""
        key = (date_prefix, session)
        offers = self._offers_of(key)
        self._watched[session] += 1
        try:
            if key in self._waiting:
                self._forget_when_claimed_soon(key, offers)
            yield offers
        finally:
            self._watched[session] -= 1
            if not self._watched[session]:
                del self._watched[session]
            self._forget_if_idle(key)

    def _forget_if_idle(self, key: SessionKey) -> None:
        """Drop what is kept for the session once nothing can use it: a service that runs for
        months starts many thousands of sessions. An offer out, a failed claim (a stop would
        drain it), a drain on record, a watcher of the name or a write of its drain file not
        done yet keeps it."""
        offers = self._offers.get(key)
        files = self._files.get(key)
        if (
            (offers is not None and (offers.to_record or offers.is_listened))
            or key in self._waiting
            or key in self._forgetting
            or self._watched[key[1]]
            or (files is not None and not files.settled)
        ):
            return
        self._offers.pop(key, None)
        self._files.pop(key, None)
        self._stops.pop(key, None)
        if not any(session == key[1] for _, session in self._offers):
            self._names.pop(key[1], None)

    def _offers_of(self, key: SessionKey) -> Offers:
        offers = self._offers.get(key)
        if offers is None:
            offers = self._offers[key] = Offers(self._names.setdefault(key[1], SessionNames()))
        return offers

    def names(self) -> list[str]:
        """The sessions whose drains are on record."""
        return sorted({session for _, session in self._waiting})

    def record(self, date_prefix: str, session: str) -> trio.Event:
        """At a stop: put the session's offers that are not claimed yet on record. Returns
        what is set once the drain file is written (or at once, for nothing to record); the
        write goes on in the background until it is."""
        key = (date_prefix, session)
        written = trio.Event()
        offers = self._offers.get(key)
        if offers is None or not offers.to_record:
            written.set()
            return written
        # With what an earlier drain of it named and may not have been claimed yet (a
        # catch-up waiting for an older file of a name): each is checked before it is offered.
        files = {rel: (rel, size, mtime_ns) for rel, size, mtime_ns in self._recorded.get(key, [])}
        files.update((entry[0], entry) for entry in offers.snapshot())
        self._recorded[key] = sorted(files.values())
        self._stops[key] += 1
        # Numbered now, before the removal that the claims may ask for next: in that order.
        write = self._ordered(key).writer(encode_drain(*key, self._recorded[key]))
        assert self._nursery is not None
        self._nursery.start_soon(self._write, key, write, written)
        self._waiting.add(key)
        self._forget_when_claimed_soon(key, offers)
        return written

    def record_again(self) -> None:
        """Write every drain on record again (in the background, until it is): the files
        that held them were lost with their folder."""
        assert self._nursery is not None
        for key in sorted(self._waiting - self._removing):  # (nothing left to drain there)
            write = self._ordered(key).writer(encode_drain(*key, self._recorded.get(key, [])))
            self._nursery.start_soon(self._write, key, write, trio.Event())

    def _ordered(self, key: SessionKey) -> fileops.OrderedWrites:
        return self._files.setdefault(key, fileops.OrderedWrites(self.layout.drain_file(*key)))

    @untraced  # (retried for as long as the share fails: past the request that wrote it)
    async def _write(self, key: SessionKey, write: Callable[[], None], written: trio.Event) -> None:
        await self._until_done(f"record the drain of {key[1]}", write)
        written.set()

    def _forget_when_claimed_soon(self, key: SessionKey, offers: Offers) -> None:
        if key not in self._forgetting:
            self._forgetting.add(key)
            assert self._nursery is not None
            self._nursery.start_soon(self._forget_when_claimed, key, offers)

    @untraced
    async def _forget_when_claimed(self, key: SessionKey, offers: Offers) -> None:
        """Wait until what the drain names has left the session's folder, offering again what
        a claim left there (a claim that failed, or found an older file of that name still
        in flight, or NFS answering ESTALE), then remove the drain file. While a watcher of
        the session runs, it offers them; the drain goes all the same once they are claimed."""
        delay = 1.0
        try:
            while True:
                stops = self._stops[key]
                await offers.wait_settled()
                left = await self._left_in_incoming(key, offers)
                if self._stops[key] != stops:
                    continue  # a stop meanwhile: what it recorded is checked too
                if left:
                    log.warning("%d files offered before session %s stopped are still in its folder (not claimed yet); "
                                "offering them again in %.0f s", len(left), key[1], delay,
                                extra={"session": key[1]})
                    await trio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY_S)
                    if not self._watched[key[1]]:  # (its watcher offers them)
                        await self._offer_what_is_left(key, offers)
                    continue
                # None of the files it names is left: no failed claim of theirs is either.
                named = frozenset(rel for rel, _, _ in self._recorded.get(key, []))
                offers.forget_failing(partial(_not_in, named))
                self._removing.add(key)
                try:
                    await self._until_done(f"remove the drain file of {key[1]}", self._ordered(key).remover())
                finally:
                    self._removing.discard(key)
                if self._stops[key] == stops:
                    break  # (else a stop recorded another drain meanwhile: written after this)
            self._waiting.discard(key)
            self._recorded.pop(key, None)
        finally:
            self._forgetting.discard(key)
        self._forget_if_idle(key)

    async def _left_in_incoming(self, key: SessionKey, offers: Offers) -> list[Offered]:
        """What the drain names that is still in the session's folder as it was, and offered
        by no one now."""
        recorded = self._recorded.get(key)
        if not recorded:
            return []
        left = await self._reading(still_there, self.layout, key[1], recorded)
        return [entry for entry in left if not offers.is_pending(entry[0])]

    async def _offer_what_is_left(self, key: SessionKey, offers: Offers) -> tuple[int, int]:
        """Offer what the drain names that is still in incoming, oldest first, but not one
        whose name (or a folder on its path) is a file in flight: the newer version goes after
        the older, at a next round. Returns (files found left, files offered)."""
        date_prefix, session = key
        offered = 0
        # Claimed by another offer (its session's watcher) since the folder was read, maybe
        # while an offer here waited for room in the queue: offered again, only found gone.
        settled: set[str] = set()
        with offers.listened(settled.add):
            left = await self._left_in_incoming(key, offers)
            for rel, size, mtime_ns in sorted(left, key=lambda entry: (entry[2], entry[0])):
                file_key = FileKey(date_prefix, session, rel)
                if self.progress.is_claimed(file_key) or below_a_file_in_flight(self.progress, file_key):
                    continue
                if not offers.is_pending(rel) and rel not in settled:
                    await offer(self._send, offers, file_key, (size, mtime_ns))
                    offered += 1
        return len(left), offered

    async def _until_done(self, what: str, blocking: Callable[[], None]) -> None:
        delay, noted = 1.0, None
        while True:
            try:
                await self.nfs.run(blocking)
                if noted is not None:
                    self.progress.resolve_error(noted)  # no longer true
                return
            except OSError as exc:
                log.error("cannot %s (%s); retrying in %.0f s", what, describe(exc), delay)
                noted = f"cannot {what}: {describe(exc)}"
                self.progress.note_error(noted)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)

    async def catch_up(self) -> None:
        """At start-up: offer again what the drains on record name and incoming still holds
        unchanged (the active session's watcher, if it has the name, offers the same files:
        each is offered once at a time), and keep each drain until they are claimed."""
        said: list[str] = []  # (appended in the thread; read once it is back)
        found = await self._reading(read_drains, self.layout, said.append)
        if said:
            self.progress.note_error(said[-1])
        assert self._nursery is not None
        for _, key, files in found:
            self._nursery.start_soon(self._catch_up, key, files)

    @untraced
    async def _catch_up(self, key: SessionKey, files: list[Offered]) -> None:
        session = key[1]
        offers = self._offers_of(key)
        merged = {entry[0]: entry for entry in files}
        if key in self._recorded:
            # A stop recorded a drain of it while the drains were read: that file no longer
            # names these files; it is written again with both.
            merged.update((entry[0], entry) for entry in self._recorded[key])
            self._recorded[key] = sorted(merged.values())
            self._stops[key] += 1
            write = self._ordered(key).writer(encode_drain(*key, self._recorded[key]))
            assert self._nursery is not None
            self._nursery.start_soon(self._write, key, write, trio.Event())
        else:
            self._recorded[key] = sorted(merged.values())
        self._waiting.add(key)
        left, offered = await self._offer_what_is_left(key, offers)
        if left:
            log.info("offered %d files that stopped session %s had queued before the restart",
                     offered, session, extra={"session": session})
        self._forget_when_claimed_soon(key, offers)

    async def _reading(self, blocking: Callable[..., list[T]], *args: object) -> list[T]:
        delay = 1.0
        while True:
            try:
                return await self.nfs.run(blocking, *args)
            except OSError as exc:
                log.error("cannot read the drains (%s); retrying in %.0f s", describe(exc), delay)
                self.progress.note_error(f"cannot read the drains: {describe(exc)}")
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
