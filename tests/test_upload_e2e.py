"""End to end: the real process, a real Azurite, files dropped into incoming like users do."""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import UTC, datetime

import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.support.azurite import blob_contents
from tests.support.service import Folders, random_bytes, wait_for, write_file

MiB = 1024 * 1024


def today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")


def wait_for_blobs(container: ContainerClient, names: set[str], timeout: float = 60) -> dict[str, bytes]:
    def arrived() -> dict[str, bytes] | None:
        blobs = blob_contents(container)
        return blobs if names <= set(blobs) else None

    return wait_for(arrived, timeout=timeout, interval=0.2, what=f"blobs {sorted(names)}")


def wait_until_clean(folders: Folders, timeout: float = 30) -> None:
    wait_for(lambda: not folders.files_on_nfs() and not folders.files_in_staging(),
             timeout=timeout, what="NFS and staging to be empty")


def test_named_session_uploads_every_size_byte_identical(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    session = service.start_session("run-1")
    assert session == {**session, "session_name": "run-1", "active": True, "date_prefix": today()}
    sizes = {"empty.bin": 0, "one.bin": 1, "small.txt": 1000, "exactly-8MiB.bin": 8 * MiB,
             "8MiB-plus-one.bin": 8 * MiB + 1, "large.bin": 37 * MiB + 123}
    expected = {
        f"{today()}/run-1/{name}": write_file(folders.session("run-1") / name, size, seed=i)
        for i, (name, size) in enumerate(sizes.items())
    }
    blobs = wait_for_blobs(container, set(expected))
    assert blobs == expected
    wait_until_clean(folders)
    status = service.status()
    assert status["files_processed"] == len(sizes)
    assert status["bytes_uploaded"] == sum(sizes.values())
    assert status["files_failed"] == 0


def test_unnamed_session_gets_a_uuid7_name(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    session = service.start_session()
    name = session["session_name"]
    assert re.fullmatch(r"00-session-[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", name)
    data = write_file(folders.session(name) / "a.dat", 4096)
    assert wait_for_blobs(container, {f"{today()}/{name}/a.dat"}) == {f"{today()}/{name}/a.dat": data}


def test_any_file_name_arrives_under_its_own_name(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    service.start_session("names")
    folder = folders.session("names")
    names = [
        "with space.txt", "percent%20.txt", "hash#.txt", "question?.txt", "plus+and&amp.txt",
        "ünïcødé-ファイル.txt", ".hidden", "semi;colon=eq.txt",
        "x.completed", "session.json", "deep/er/nested.txt",
    ]
    expected = {}
    for i, name in enumerate(names):
        expected[f"{today()}/names/{name}"] = write_file(folder / name, 100 + i, seed=i)
    # What Azure would change in a blob name is escaped, so each file keeps a blob of its
    # own: a backslash (Azure reads it as '/'), a dot ending a path segment (Azure drops
    # it), a control character.
    (folder / "back").mkdir()
    for i, (name, shown) in enumerate(
        [("back/slash", "back/slash"), ("back\\slash", "back%5Cslash"), ("trailing-dot", "trailing-dot"),
         ("trailing-dot.", "trailing-dot%2E"), ("tab\tname", "tab%09name")]
    ):
        expected[f"{today()}/names/{shown}"] = write_file(folder / name, 50 + i, seed=100 + i)
    # A name that is not valid UTF-8: the undecodable byte becomes %FF in the blob name.
    raw = os.fsencode(folder) + b"/bad-\xff-byte.txt"
    with open(raw, "wb") as f:
        f.write(b"raw bytes")
    expected[f"{today()}/names/bad-%FF-byte.txt"] = b"raw bytes"
    # A valid name spelled like that escape keeps a blob of its own: '%' becomes %25.
    expected[f"{today()}/names/bad-%25FF-byte.txt"] = write_file(folder / "bad-%FF-byte.txt", 7)
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)


def test_symlinks_are_never_followed(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient, tmp_path
) -> None:
    service = service_factory()
    service.start_session("links")
    secret = tmp_path / "outside.txt"
    secret.write_text("must never be uploaded")
    os.symlink(secret, folders.session("links") / "link.txt")
    write_file(folders.session("links") / "real.txt", 10)
    wait_for_blobs(container, {f"{today()}/links/real.txt"})
    time.sleep(1)  # several more scans
    assert set(blob_contents(container)) == {f"{today()}/links/real.txt"}
    assert secret.read_text() == "must never be uploaded"


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 12 * 1024 * 1024 + 1], ids=["one put", "blocks"])
def test_hard_links_of_one_file_all_go_up_without_failing_each_other(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient, tmp_path, size: int
) -> None:
    """Each name's claim and completion moves the shared inode's ctime under the others."""
    service = service_factory()
    service.start_session("hard")
    scratch = folders.session("hard").parent / "scratch"  # same file system, outside the session
    scratch.mkdir()
    data = write_file(scratch / "original", size)
    for n in range(12):
        os.link(scratch / "original", scratch / f"name-{n}")
    (scratch / "original").unlink()
    os.rename(scratch, folders.session("hard") / "linked")
    expected = {f"{today()}/hard/linked/name-{n}": data for n in range(12)}
    assert wait_for_blobs(container, set(expected), timeout=90) == expected
    wait_until_clean(folders)
    status = service.status()
    assert (status["files_failed"], status["files_quarantined"]) == (0, 0)


def test_a_session_folder_swapped_for_a_symlink_is_not_read(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient, tmp_path
) -> None:
    service = service_factory()
    service.start_session("swap")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.txt").write_text("must never be uploaded")
    def swap() -> bool:
        try:  # the watcher makes a missing folder again: it may win the race
            folders.session("swap").rmdir()
            folders.session("swap").symlink_to(outside, target_is_directory=True)
        except (FileExistsError, FileNotFoundError):
            return False
        return True

    wait_for(swap, timeout=10, what="the folder swapped for a symlink")
    wait_for(lambda: "symbolic link" in (service.status()["last_error"] or ""), timeout=10,
             what="the watcher to refuse the symlink")
    time.sleep(1)  # several more scans
    assert blob_contents(container) == {}
    assert (outside / "private.txt").read_text() == "must never be uploaded"


def test_file_still_being_written_goes_up_once_complete(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_MIN_FILE_AGE_S="1.0")
    service.start_session("slow")
    data = random_bytes(3 * MiB, seed=7)
    path = folders.session("slow") / "growing.bin"
    done = threading.Event()

    def writer() -> None:
        with open(path, "wb") as f:
            for start in range(0, len(data), 128 * 1024):
                f.write(data[start : start + 128 * 1024])
                f.flush()
                time.sleep(0.15)  # pauses longer than the poll interval
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    blobs = wait_for_blobs(container, {f"{today()}/slow/growing.bin"}, timeout=90)
    thread.join()
    assert done.is_set()
    assert blobs[f"{today()}/slow/growing.bin"] == data
    wait_until_clean(folders)
    status = service.status()
    assert status["files_processed"] == 1
    assert status["files_failed"] == 0


def test_stop_ends_watching_but_queued_files_still_upload(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    # One worker and a slow-to-drain queue, so that files are queued when stop comes.
    service = service_factory(APP_WORKER_CONCURRENCY="1", APP_AZURE_MAX_SINGLE_PUT_SIZE=str(MiB))
    service.start_session("drain")
    folder = folders.session("drain")
    first = {f"f{i:02d}.bin": write_file(folder / f"f{i:02d}.bin", 3 * MiB, seed=i) for i in range(12)}
    # Several queued, so that the one worker cannot have claimed them all between the
    # stop and the listing below.
    wait_for(lambda: service.status()["queue_depth"] >= 4, timeout=30, interval=0.01,
             what="files to be queued")
    stopped = service.stop_session()
    assert stopped["active"] is False and stopped["session_name"] == "drain"
    claimed_before_stop = set(first) - {p.name for p in folder.iterdir()}
    later = write_file(folder / "after-stop.bin", 1000, seed=99)
    wait_for(lambda: service.status()["queue_depth"] == 0 and service.status()["in_flight"] == 0,
             timeout=60, what="the queue to drain")
    gone = set(first) - {p.name for p in folder.iterdir()}
    # Files still queued when stop came were claimed afterwards, and went up too.
    assert gone - claimed_before_stop
    blobs = blob_contents(container)
    for name in gone:
        assert blobs[f"{today()}/drain/{name}"] == first[name]
    time.sleep(1)  # several poll intervals: nobody watches any more
    assert (folder / "after-stop.bin").read_bytes() == later
    assert f"{today()}/drain/after-stop.bin" not in blob_contents(container)
    assert service.status()["active"] is False


def test_stop_then_start_watches_again(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    service.start_session("again")
    service.stop_session()
    write_file(folders.session("again") / "waiting.txt", 10)
    time.sleep(0.5)
    assert (folders.session("again") / "waiting.txt").exists()
    service.start_session("again")
    wait_for_blobs(container, {f"{today()}/again/waiting.txt"})


def test_only_the_active_session_folder_is_read(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    write_file(folders.incoming / "loose.txt", 10)
    write_file(folders.session("other") / "other.txt", 10)
    service.start_session("mine")
    write_file(folders.session("mine") / "mine.txt", 10)
    wait_for_blobs(container, {f"{today()}/mine/mine.txt"})
    time.sleep(0.5)
    assert set(blob_contents(container)) == {f"{today()}/mine/mine.txt"}
    assert (folders.incoming / "loose.txt").exists()
    assert (folders.session("other") / "other.txt").exists()


def test_extension_filter_leaves_other_files_alone(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_FILE_EXTENSIONS=".csv, TIF")
    service.start_session("ext")
    for name in ("a.csv", "b.TIF", "c.txt"):
        write_file(folders.session("ext") / name, 10)
    wait_for_blobs(container, {f"{today()}/ext/a.csv", f"{today()}/ext/b.TIF"})
    time.sleep(0.5)
    assert (folders.session("ext") / "c.txt").exists()
    assert f"{today()}/ext/c.txt" not in blob_contents(container)
