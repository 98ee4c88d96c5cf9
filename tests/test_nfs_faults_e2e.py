"""NFS faults, injected by a real FUSE filesystem mounted as the share, against the real process.

The service sees the share through the faultfs mount; the test drops and inspects files in
the backing folder, as another NFS client would, so the faults only hit the service.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.faultfs import FaultFS
from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite, blob_contents
from tests.support.otlp import OtlpReceiver, SpanRecord
from tests.support.service import Folders, ServiceProcess, wait_for, write_file
from tests.test_local_faults_e2e import small_disk
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean

pytestmark = pytest.mark.fuse
MiB = 1024 * 1024


@pytest.fixture
def folders(fuse_folders: Folders) -> Folders:
    """Every test here runs on the fault-injecting share."""
    return fuse_folders


@pytest.fixture
def service(service_factory: ServiceFactory) -> Iterator[ServiceProcess]:
    service = service_factory(APP_NFS_CALL_STUCK_S="1", APP_NFS_OP_TIMEOUT_S="2")
    yield service


def drop(folders: Folders, session: str, sizes: dict[str, int]) -> dict[str, bytes]:
    return {
        f"{today()}/{session}/{name}": write_file(folders.session(session) / name, size, seed=i)
        for i, (name, size) in enumerate(sizes.items())
    }


def processing_glob(session: str, name: str) -> str:
    return f".processing/*/{session}/{name}"


@pytest.mark.parametrize(
    ("op", "where", "error", "times"),
    [
        ("open", "processing", "ESTALE", 4),  # the kernel retries one ESTALE by itself
        ("read", "processing", "EIO", 3),
        ("readdir", "incoming", "EIO", 3),
        ("link", "processing", "EACCES", 2),
        ("unlink", "incoming", "EIO", 2),
        ("rename", "processing", "ESTALE", 4),
        ("getattr", "processing", "EIO", 3),
    ],
)
def test_a_transient_nfs_error_ends_with_every_file_intact(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient,
    op: str, where: str, error: str, times: int,
) -> None:
    service.start_session("nfs")
    glob = "incoming/nfs" if op == "readdir" else (
        "incoming/nfs/*" if where == "incoming" else processing_glob("nfs", "*")
    )
    faultfs.fail(op, glob, error, times=times)
    expected = drop(folders, "nfs", {"a.bin": 3 * MiB, "b.bin": 12 * MiB + 5, "c.txt": 10})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert faultfs.stats()["faults"].get(op, 0) == times
    status = service.status()
    assert status["files_processed"] == 3
    assert status["files_quarantined"] == 0
    assert status["last_error"] is not None
    assert error in service.log()  # each failure was logged, naming its cause


def test_an_outage_of_the_moves_to_the_completed_folder_quarantines_nothing(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """The blobs are up and verified; only the share's renames fail (its listings work, so the
    probe of "is it the file or the share?" cannot tell): no file is quarantined for that."""
    service = service_factory(APP_MAX_ATTEMPTS="2", APP_RETRY_BACKOFF_MAX_S="0.5", APP_NFS_OP_TIMEOUT_S="2")
    service.start_session("done")
    outage = faultfs.fail("rename", processing_glob("done", "*"), "EIO", times=None)
    expected = drop(folders, "done", {"a.bin": 1000, "b.bin": 2 * MiB})
    wait_for(lambda: service.status()["files_failed"] >= 6, timeout=60, what="several failed completions")
    faultfs.remove(outage)
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    # Counted once the completion's call has returned, a moment after NFS is clean.
    wait_for(lambda: service.status()["files_processed"] == 2, timeout=10, what="both files counted")
    assert service.status()["files_quarantined"] == 0


def test_a_file_whose_completion_failed_is_completed_without_being_sent_again(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_RETRY_BACKOFF_MAX_S="0.5")
    service.start_session("again")
    faultfs.fail("rename", processing_glob("again", "*"), "EIO", times=4)
    expected = drop(folders, "again", {"small.bin": 1000, "large.bin": 12 * MiB + 3})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    wait_for(lambda: service.status()["files_processed"] == 2, timeout=10, what="both files counted")
    status = service.status()
    total = sum(len(data) for data in expected.values())
    assert status["files_failed"] >= 2
    assert (status["bytes_sent"], status["bytes_resumed"]) == (total, total)


def test_a_blob_deleted_while_its_completion_failed_is_uploaded_again(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_RETRY_BACKOFF_MAX_S="0.5")
    service.start_session("gone")
    outage = faultfs.fail("rename", processing_glob("gone", "*"), "EIO", times=None)
    expected = drop(folders, "gone", {"a.bin": 5000})
    wait_for(lambda: service.status()["files_failed"] >= 1, timeout=30, what="a failed completion")
    container.delete_blob(next(iter(expected)))
    faultfs.remove(outage)
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    wait_for(lambda: service.status()["files_processed"] == 1, timeout=10, what="the file counted")
    assert service.status()["bytes_sent"] == 2 * 5000
    assert "changed since it was verified; uploading again" in service.log()


def test_a_file_the_kernel_will_not_link_is_claimed_by_rename(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """fs.protected_hardlinks refuses to link another user's file (EPERM): such files, the
    usual case on a shared drop folder, still go up."""
    service.start_session("owners")
    faultfs.fail("link", processing_glob("owners", "*"), "EPERM", times=None)
    expected = drop(folders, "owners", {"a.bin": 3 * MiB, "b.txt": 10})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    status = service.status()
    assert status["files_processed"] == 2 and status["files_failed"] == 0


def test_a_file_that_cannot_leave_incoming_is_not_uploaded_again_and_again(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """A session folder the service may not write to: the claim is taken back (else the copy
    left in incoming would go up once more after every upload), and tried less and less often."""
    service.start_session("readonly")
    refused = faultfs.fail("unlink", "incoming/readonly/*", "EACCES", times=None)
    data = write_file(folders.session("readonly") / "a.bin", 1000)
    wait_for(lambda: faultfs.stats()["faults"].get("unlink", 0) >= 3, timeout=30,
             what="three refused claims")
    time.sleep(3)
    refusals = faultfs.stats()["faults"]["unlink"]
    status = service.status()
    # Polled every 0.1 s, but tried again after 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s: a handful of tries.
    assert refusals <= 7, f"{refusals} claims refused"
    assert status["files_processed"] == 0 and status["files_failed"] == refusals
    assert status["claims_failing"] == 1
    assert "EACCES" in status["last_error"]
    assert blob_contents(container) == {}
    assert not list(folders.processing.glob(processing_glob("readonly", "*")))
    faultfs.remove(refused)
    blob = f"{today()}/readonly/a.bin"
    assert wait_for_blobs(container, {blob}, timeout=90) == {blob: data}
    wait_until_clean(folders)
    assert service.status()["files_processed"] == 1
    assert service.status()["claims_failing"] == 0


def test_a_file_the_service_may_not_read_stays_in_incoming_until_it_can(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """An instrument writing 0600 files as its own user: claimed, the file could only be
    quarantined; left in incoming, it goes up once its mode is fixed."""
    service.start_session("private")
    refused = faultfs.fail("open", "incoming/private/secret.bin", "EACCES", times=None)
    secret = write_file(folders.session("private") / "secret.bin", 1000, seed=1)
    other = write_file(folders.session("private") / "other.bin", 2000, seed=2)
    assert wait_for_blobs(container, {f"{today()}/private/other.bin"}) == {
        f"{today()}/private/other.bin": other
    }
    wait_for(lambda: service.status()["claims_failing"] == 1, timeout=30, what="the claim failing")
    status = service.status()
    assert "EACCES" in status["last_error"]
    assert status["files_quarantined"] == 0
    assert (folders.session("private") / "secret.bin").exists()
    faultfs.remove(refused)
    blob = f"{today()}/private/secret.bin"
    assert wait_for_blobs(container, {blob}, timeout=90)[blob] == secret
    wait_until_clean(folders)
    assert service.status()["claims_failing"] == 0


def test_a_failed_claim_is_traced_as_a_failed_attempt(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """Not as a file someone else took: the file is still there, and its next try goes up."""
    receiver = OtlpReceiver().start()
    try:
        service = service_factory(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
        service.start_session("traced")
        faultfs.fail("open", "incoming/traced/secret.bin", "EACCES", times=1)
        write_file(folders.session("traced") / "secret.bin", 1000, seed=1)
        wait_for_blobs(container, {f"{today()}/traced/secret.bin"})

        def attempts() -> list[SpanRecord]:
            with receiver.lock:
                return [s for s in receiver.spans if s.name == "file" and s.attributes.get("file") == "secret.bin"]

        wait_for(lambda: len(attempts()) == 2, timeout=20, what="the spans of both attempts")
        failed, uploaded = sorted(attempts(), key=lambda s: str(s.attributes["outcome"]))
        assert failed.attributes["outcome"] == "failed" and failed.error
        assert failed.attributes["disposition"] == "retryable"
        assert uploaded.attributes["outcome"] == "uploaded" and not uploaded.error
    finally:
        receiver.stop()


def test_a_sub_folder_the_service_may_not_read_is_counted_until_it_can(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service.start_session("locked")
    refused = faultfs.fail("opendir", "incoming/locked/private", "EACCES", times=None)
    hidden = write_file(folders.session("locked") / "private" / "in.bin", 100, seed=1)
    seen = drop(folders, "locked", {"out.bin": 100})
    assert wait_for_blobs(container, set(seen)) == seen
    wait_for(lambda: service.status()["entries_skipped"] == 1, timeout=10, what="the count")
    assert "EACCES" in service.status()["last_error"]
    faultfs.remove(refused)
    blob = f"{today()}/locked/private/in.bin"
    assert wait_for_blobs(container, {*seen, blob}) == {**seen, blob: hidden}
    assert service.status()["entries_skipped"] == 0


def test_a_staging_disk_too_small_for_every_worker_at_once_still_empties_the_share(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """Four workers, room for two files, copies slow enough to overlap: were they all to start,
    each would fill a quarter of the disk and none could ever finish."""
    with small_disk(folders.staging, "24m"):
        service = service_factory()
        service.start_session("tight")
        faultfs.slow_reads(processing_glob("tight", "*"), 0.005)
        scratch = folders.nfs / "scratch"
        scratch.mkdir()
        expected = {
            f"{today()}/tight/f{i}.bin": write_file(scratch / f"f{i}.bin", 10_000_000, seed=i)
            for i in range(6)
        }
        for name in sorted(os.listdir(scratch)):  # all at once, as complete files
            os.rename(scratch / name, folders.session("tight") / name)
        assert wait_for_blobs(container, set(expected), timeout=60) == expected
        wait_until_clean(folders)
        assert service.status()["files_quarantined"] == 0
        assert service.status()["files_failed"] == 0  # no copy ran out of space


def test_slow_reads_only_slow_things_down(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service.start_session("slow")
    faultfs.slow_reads(processing_glob("slow", "*"), 0.02)
    expected = drop(folders, "slow", {"a.bin": 2 * MiB, "b.bin": 100})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert service.status()["files_failed"] == 0


def test_a_file_that_cannot_be_read_is_quarantined_and_the_others_go_on(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_MAX_ATTEMPTS="3")
    service.start_session("bad")
    faultfs.fail("read", processing_glob("bad", "broken.bin"), "EIO", times=None)
    broken = write_file(folders.session("bad") / "broken.bin", 4096, seed=3)
    good = drop(folders, "bad", {"fine-1.bin": 100, "fine-2.bin": 2 * MiB})
    wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=60, what="the quarantine")
    assert wait_for_blobs(container, set(good)) == good
    failed = folders.processing / ".failed" / "files" / today() / "bad" / "broken.bin"
    assert failed.read_bytes() == broken
    reason = service.status()["quarantined"][0]
    # APP_MAX_ATTEMPTS, or one more where nothing else went through NFS between its last two
    # tries (the probe then earns it one more, begun while NFS is known to work).
    assert "EIO" in str(reason["reason"]) and reason["attempts"] in (3, 4)
    # After a restart, status still shows what is in the failed folder.
    service.stop()
    service.restart()
    wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=10,
             what="the failed folder to be read again")
    status = service.status()
    assert [q["file"] for q in status["quarantined"]] == ["broken.bin"]
    assert status["quarantined"][0]["path"] == reason["path"]


def test_a_file_whose_blob_name_azure_would_refuse_is_quarantined_at_once(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    service.start_session("deep")
    deep = Path(*["d" * 200] * 5) / "far.bin"  # a blob name of 1,026 characters
    far = write_file(folders.session("deep") / deep, 100)
    good = drop(folders, "deep", {"near.bin": 100})
    wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=30, what="the quarantine")
    assert wait_for_blobs(container, set(good)) == good
    [record] = service.status()["quarantined"]
    assert record["attempts"] == 1 and record["disposition"] == "permanent"
    assert "1026 characters long, and Azure allows at most 1024" in str(record["reason"])
    assert Path(str(record["path"])).read_bytes() == far


def test_checks_of_a_hung_share_repeated_at_every_failure_hold_one_thread_not_all(
    service_factory: ServiceFactory, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    """Each failing file asks whether the share answers for others (a listing of the
    processing root); with that listing hung, each check was abandoned holding a thread,
    until none was left for any file."""
    service = service_factory(
        APP_NFS_THREADS="4", APP_NFS_OP_TIMEOUT_S="1", APP_NFS_CALL_STUCK_S="1",
        APP_RETRY_BACKOFF_S="0.1", APP_RETRY_BACKOFF_MAX_S="0.5",
    )
    service.start_session("lk")
    faultfs.fail("read", processing_glob("lk", "bad*"), "EIO", times=None)
    listing = faultfs.hang("readdir", ".processing")
    drop(folders, "lk", {f"bad{i}.bin": 1000 for i in range(6)})
    # Past their last attempt, each failure of theirs checks the share: the first check hangs.
    wait_for(lambda: service.status()["nfs_calls"]["stuck"] >= 1, timeout=60, what="a check of the share to hang")
    time.sleep(3)  # more failures of theirs, each a check of the share
    good = {f"{today()}/lk/{name}": data for name, data in {
        name: write_file(folders.session("lk") / name, 1000, seed=i)
        for i, name in enumerate([f"good-{n}.bin" for n in range(8)], start=10)
    }.items()}
    assert wait_for_blobs(container, set(good), timeout=30) == good
    # And completed: a completion makes no folder in the hung processing root (made at start).
    wait_for(lambda: not [p for p in folders.files_on_nfs() if p.name.startswith("good-")], timeout=30,
             what="the good files to leave the share")
    assert service.status()["nfs_calls"]["stuck"] <= 2  # the hung check, once, and a GC sweep
    assert service.status()["files_quarantined"] == 0  # no file is to blame while the share hangs
    faultfs.release(listing)
    wait_for(lambda: service.status()["files_quarantined"] == 6, timeout=60, what="the bad files' quarantine")


def test_a_hung_share_blocks_neither_probes_nor_status_nor_stop(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    service.start_session("hang")
    hang = faultfs.hang("read", processing_glob("hang", "stuck.bin"))
    stuck = write_file(folders.session("hang") / "stuck.bin", 2 * MiB, seed=1)
    faultfs.wait_hung(1, timeout_s=30)
    others = drop(folders, "hang", {"free-1.bin": 1000, "free-2.bin": 3 * MiB})
    # Other files go up while one NFS call hangs.
    assert wait_for_blobs(container, set(others)) == others
    wait_for(lambda: service.status()["nfs_calls"]["stuck"] >= 1, timeout=10,
             what="status to report the stuck NFS call")
    [stuck_calls] = [line for line in service.http.get("/metrics").text.splitlines()
                     if line.startswith('calls_stuck{lane="nfs"} ')]
    assert float(stuck_calls.split()[-1]) >= 1  # for alerts, too
    latencies = []
    with httpx.Client(base_url=service.url, timeout=5) as client:
        for _ in range(200):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert client.get("/v1/status").status_code == 200
        assert time.perf_counter() - started < 0.5
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.05, f"/healthz p99 {p99 * 1000:.1f} ms while NFS hangs"
    # Stop answers at once, though the worker on the hung file cannot move.
    started = time.perf_counter()
    assert service.stop_session()["active"] is False
    assert time.perf_counter() - started < 2
    faultfs.release(hang)
    blob = f"{today()}/hang/stuck.bin"
    assert wait_for_blobs(container, {blob})[blob] == stuck
    wait_until_clean(folders)


def test_sigterm_exits_promptly_while_nfs_calls_hang(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders
) -> None:
    service.start_session("term")
    faultfs.hang("read", processing_glob("term", "*"))
    drop(folders, "term", {"x.bin": MiB})
    faultfs.wait_hung(1, timeout_s=30)
    faultfs.hang("readdir", "incoming/term")
    faultfs.wait_hung(2, timeout_s=30)
    started = time.monotonic()
    assert service.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 10
    assert "Traceback" not in service.log()
    faultfs.release_all()


def test_a_hung_share_at_start_answers_503_then_works(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders, container: ContainerClient
) -> None:
    hang = faultfs.hang("mkdir", "incoming/later")
    started = time.perf_counter()
    answer = service.http.post("/v1/watch/start", json={"session_name": "later"})
    assert answer.status_code == 503
    assert "did not answer" in answer.json()["error"]
    assert time.perf_counter() - started < 5
    assert service.status()["active"] is False
    faultfs.release(hang)
    wait_for(lambda: service.http.post("/v1/watch/start", json={"session_name": "later"}).status_code == 200,
             timeout=10, what="start to work again")
    data = write_file(folders.session("later") / "f.bin", 100)
    assert wait_for_blobs(container, {f"{today()}/later/f.bin"})[f"{today()}/later/f.bin"] == data


def test_concurrent_starts_on_a_hung_share_each_answer_within_the_timeout_and_leave_no_folder(
    service: ServiceProcess, faultfs: FaultFS, folders: Folders
) -> None:
    """Each start waited for the one before it (the fifth answered after five timeouts), and
    a mkdir given up on left the folder of a session that never started once it ended."""
    hang = faultfs.hang("mkdir", "incoming/*")
    answers: dict[str, tuple[int, float]] = {}

    def start(name: str) -> None:
        started = time.perf_counter()
        answer = httpx.post(f"{service.url}/v1/watch/start", json={"session_name": name}, timeout=30)
        answers[name] = (answer.status_code, time.perf_counter() - started)

    clients = [threading.Thread(target=start, args=(f"s{i}",)) for i in range(5)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    faultfs.release(hang)
    assert {status for status, _ in answers.values()} == {503}
    assert max(took for _, took in answers.values()) < 2 + 1.5, answers  # APP_NFS_OP_TIMEOUT_S=2
    assert service.status()["active"] is False
    wait_for(lambda: folders.incoming.is_dir() and not any(folders.incoming.iterdir()), timeout=10,
             what="the folder made after its start gave up to be removed")


def test_a_share_that_hangs_at_start_up_is_in_last_error_until_start_up_is_done(
    service_factory: ServiceFactory, faultfs: FaultFS, azurite: Azurite, proxy: FaultProxy
) -> None:
    """The log said so at once, the status only some 30 s later (from another step)."""
    hang = faultfs.hang("lookup", "incoming")
    storage = proxy.stall(times=None)  # start-up waits for storage: not ready meanwhile
    service = service_factory(
        start=False, connection_string=azurite.connection_string(port=proxy.port), APP_NFS_OP_TIMEOUT_S="1"
    )
    service.start(wait_ready=False)

    def last_error() -> str | None:
        try:
            return service.status()["last_error"]
        except httpx.TransportError:
            return None

    said = wait_for(last_error, timeout=10, what="last_error")
    assert said.startswith("cannot check APP_NFS_INCOMING_DIR (") and "no answer within 1 s" in said
    faultfs.release(hang)
    proxy.release(storage)
    service.wait_ready()
    assert service.status()["last_error"] is None


def test_status_shows_the_session_that_resumes_while_recovery_waits_for_the_share(
    service: ServiceProcess, faultfs: FaultFS
) -> None:
    service.start_session("back")
    service.kill()
    hang = faultfs.hang("readdir", ".processing")  # recovery's walk of the claimed files
    service.start(wait_ready=False)

    def resuming() -> dict[str, Any] | None:
        try:
            status = service.status()
        except httpx.TransportError:
            return None
        return status if status["session_name"] == "back" else None

    status = wait_for(resuming, timeout=15, what="the stored session in the status")
    assert status["active"] is True and status["ready"] is False
    faultfs.release(hang)
    service.wait_ready()
    assert service.status()["active"] is True
