"""Storage faults, injected by a real proxy in front of Azurite, against the real process."""

from __future__ import annotations

import json
import signal
import time

from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.proxy import PUT_BLOCK, PUT_BLOCK_LIST, FaultProxy
from tests.support.azurite import Azurite, blob_contents
from tests.support.service import Folders, ServiceProcess, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean

MiB = 1024 * 1024


def through_proxy(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy, **overrides: object
) -> ServiceProcess:
    return service_factory(connection_string=azurite.connection_string(port=proxy.port), **overrides)


def drop(folders: Folders, session: str, sizes: dict[str, int]) -> dict[str, bytes]:
    return {
        f"{today()}/{session}/{name}": write_file(folders.session(session) / name, size, seed=i)
        for i, (name, size) in enumerate(sizes.items())
    }


def test_files_stay_on_nfs_until_storage_takes_them(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    # The SDK's own retry (about a second) adds nothing here but time.
    service = through_proxy(service_factory, azurite, proxy, azure_retry_total=0)
    service.start_session("hold")
    outage = proxy.error(503, method="PUT", times=None)
    expected = drop(folders, "hold", {"a.bin": 1000, "b.bin": 3 * MiB, "c.bin": 20 * MiB})
    wait_for(lambda: service.status()["files_failed"] >= 6, timeout=60, what="failed attempts")
    # Nothing was deleted: every file is still on NFS, claimed, byte for byte.
    claimed = folders.processing / today() / "hold"
    for blob, data in expected.items():
        assert (claimed / blob.rsplit("/", 1)[1]).read_bytes() == data
    status = service.status()
    assert status["files_processed"] == 0
    assert status["files_quarantined"] == 0  # an outage fails everything: nobody is to blame
    assert status["retry_waiting"] + status["in_flight"] + status["queue_depth"] == 3
    assert "503" in status["last_error"] and "ServerBusy" in status["last_error"]
    proxy.remove(outage)
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    # GC took the empty folders too.
    wait_for(lambda: not claimed.exists() and not (folders.staging / today()).exists(),
             timeout=10, what="empty folders to go")
    status = service.status()
    assert status["files_processed"] == 3 and status["files_retried"] >= 6


def test_files_waiting_for_a_retry_keep_no_staging_copy(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    # Long enough a wait that all three are seen waiting at once.
    service = through_proxy(service_factory, azurite, proxy, retry_backoff_s=5,
                            retry_backoff_max_s=5, azure_retry_total=0)
    service.start_session("wait")
    outage = proxy.error(503, method="PUT", times=None)
    expected = drop(folders, "wait", {"a.bin": 1000, "b.bin": 3 * MiB, "c.bin": 20 * MiB})
    wait_for(lambda: service.status()["retry_waiting"] == 3, timeout=30, what="all three waiting")
    # An outage makes every file wait: staging holds only files in flight, never the waiting.
    assert folders.files_in_staging() == []
    proxy.remove(outage)
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)


def test_connection_resets_in_the_middle_of_blocks(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
                            APP_AZURE_RETRY_TOTAL="0")
    service.start_session("reset")
    proxy.reset_mid_body(300_000, method="PUT", target=PUT_BLOCK, times=5)
    expected = drop(folders, "reset", {"big.bin": 12 * MiB + 7})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert proxy.stats().faults["reset_mid_body"] == 5
    status = service.status()
    assert status["files_processed"] == 1
    assert status["files_failed"] >= 1 and status["files_quarantined"] == 0


def test_a_failed_commit_is_retried(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
                            APP_AZURE_MAX_SINGLE_PUT_SIZE=str(MiB), APP_AZURE_RETRY_TOTAL="0")
    service.start_session("commit")
    proxy.error(500, method="PUT", target=PUT_BLOCK_LIST, times=2)
    expected = drop(folders, "commit", {"blocks.bin": 5 * MiB})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    status = service.status()
    assert status["files_failed"] == 2 and status["files_processed"] == 1
    # The retries found every block already staged and sent none again.
    assert status["bytes_resumed"] == 5 * MiB
    assert status["bytes_sent"] == 5 * MiB


def test_a_lost_response_is_retried_and_the_blob_overwritten(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_AZURE_RETRY_TOTAL="0")
    service.start_session("lost")
    # The Put Blob reaches storage, but the answer never comes back.
    proxy.reset_mid_body(10 * MiB, method="PUT", target="lost/small.bin", times=1)
    expected = drop(folders, "lost", {"small.bin": 200_000})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert service.status()["files_failed"] == 1
    assert service.status()["files_processed"] == 1


def test_a_stalled_storage_request_times_out_and_is_retried(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(
        service_factory, azurite, proxy,
        APP_AZURE_READ_TIMEOUT_S="1", APP_AZURE_CONNECT_TIMEOUT_S="1", APP_AZURE_RETRY_TOTAL="0",
    )
    service.start_session("stall")
    stall = proxy.stall(method="PUT", target="stall/", times=2)
    expected = drop(folders, "stall", {"s1.bin": 1000, "s2.bin": 2000})
    proxy.wait_stalled(stall, count=2, timeout=30)
    started = time.perf_counter()
    assert service.http.get("/healthz").status_code == 200
    assert time.perf_counter() - started < 1
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    proxy.release_all()
    assert service.status()["files_failed"] >= 2


def test_added_latency_only_slows_things_down(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_AZURE_MAX_BLOCK_SIZE=str(MiB))
    proxy.latency(0.1)
    service.start_session("slow")
    expected = drop(folders, "slow", {f"f{i}.bin": 300_000 * i for i in range(6)})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    assert service.status()["files_failed"] == 0


def test_an_upload_answered_without_an_md5_is_checked_against_the_stored_blob(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    """An endpoint that says 201 to a Put Blob it never stored (a proxy in the way)."""
    service = through_proxy(service_factory, azurite, proxy)
    service.start_session("lie")
    proxy.error(201, method="PUT", target="lie/told.bin", times=1)
    expected = drop(folders, "lie", {"told.bin": 5000})
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    status = service.status()
    assert status["files_failed"] == 1 and status["files_processed"] == 1
    assert "answered without an MD5" in status["last_error"]


def test_a_request_storage_refuses_for_one_file_quarantines_it_at_its_second_attempt(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_MAX_ATTEMPTS="5")
    service.start_session("p")
    proxy.error(400, method="PUT", target="p/refused.bin", times=None, code="InvalidHeaderValue")
    write_file(folders.session("p") / "refused.bin", 5000, seed=1)
    good = drop(folders, "p", {"ok.bin": 10_000})
    wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=60, what="the quarantine")
    assert wait_for_blobs(container, set(good)) == good
    reason = json.loads((folders.processing / ".failed" / "reasons" / today() / "p" / "refused.bin.json").read_text())
    # Not at the first: storage must be seen working between two refusals (an account-wide
    # refusal that just ended would otherwise quarantine the file it failed last).
    assert reason["attempts"] == 2 and reason["disposition"] == "permanent"
    assert "InvalidHeaderValue" in reason["reason"]


def test_a_refusal_of_every_request_quarantines_nothing(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    """A 400 is permanent for a file, unless storage refuses everyone: an account changed
    since files went up."""
    service = through_proxy(service_factory, azurite, proxy, APP_MAX_ATTEMPTS="2")
    service.start_session("p")
    before = drop(folders, "p", {"before.bin": 100})
    assert wait_for_blobs(container, set(before)) == before
    refusal = proxy.error(400, method="PUT", times=None, code="AccountRequiresHttps",
                          message="The account being accessed does not support http.")
    expected = drop(folders, "p", {"a.bin": 1000, "b.bin": 3 * MiB})
    wait_for(lambda: service.status()["files_failed"] >= 6, timeout=60, what="failed attempts")
    status = service.status()
    assert status["files_quarantined"] == 0 and "AccountRequiresHttps" in status["last_error"]
    wait_for(lambda: str(service.status()["last_error"]).startswith("storage refuses every request, not only"),
             timeout=30, what="the refusal said to be everyone's")
    proxy.remove(refusal)
    assert wait_for_blobs(container, set(expected) | set(before)) == expected | before
    wait_until_clean(folders)
    assert service.status()["files_quarantined"] == 0


def test_a_file_that_always_fails_is_quarantined_and_the_others_go_on(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    service = through_proxy(service_factory, azurite, proxy, APP_MAX_ATTEMPTS="3",
                            APP_AZURE_RETRY_TOTAL="0")
    service.start_session("q")
    proxy.error(500, method="PUT", target="q/doomed.bin", times=None, code="InternalError")
    bad = write_file(folders.session("q") / "doomed.bin", 5000, seed=1)
    good = drop(folders, "q", {f"ok-{i}.bin": 10_000 + i for i in range(5)})
    wait_for(lambda: service.status()["files_quarantined"] == 1, timeout=60, what="the quarantine")
    assert wait_for_blobs(container, set(good)) == good
    assert f"{today()}/q/doomed.bin" not in blob_contents(container)
    failed = folders.processing / ".failed" / "files" / today() / "q" / "doomed.bin"
    reason_file = folders.processing / ".failed" / "reasons" / today() / "q" / "doomed.bin.json"
    assert failed.read_bytes() == bad
    reason = json.loads(reason_file.read_text())
    # APP_MAX_ATTEMPTS, or one more where no other file went up between its last two tries
    # (the probe then earns it one more, begun while storage is known to work).
    attempts = reason["attempts"]
    assert attempts in (3, 4)
    assert "500" in reason["reason"] and "InternalError" in reason["reason"]
    assert reason["blob_name"] == f"{today()}/q/doomed.bin"
    status = service.status()
    assert status["quarantined"][0]["file"] == "doomed.bin"
    assert status["quarantined"][0]["path"] == str(
        folders.service_nfs / ".processing" / ".failed" / "files" / today() / "q" / "doomed.bin"
    )
    assert status["files_processed"] == 5
    assert f"quarantined {today()}/q/doomed.bin after {attempts} attempts: " in service.log()
    # Nothing else is left behind, and the service still takes new files.
    wait_for(lambda: folders.files_on_nfs() == sorted([failed, reason_file]),
             what="only the quarantined file and its reason on NFS")
    later = drop(folders, "q", {"later.bin": 100})
    assert wait_for_blobs(container, set(later))[f"{today()}/q/later.bin"] == later[f"{today()}/q/later.bin"]


def test_a_deleted_container_is_created_again(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    service.start_session("gone")
    first = drop(folders, "gone", {"first.bin": 100})
    wait_for_blobs(container, set(first))
    container.delete_container()
    wait_for(lambda: not container.exists(), what="the container to go")
    second = write_file(folders.session("gone") / "second.bin", 100, seed=9)
    blobs = wait_for_blobs(container, {f"{today()}/gone/second.bin"})
    assert blobs[f"{today()}/gone/second.bin"] == second
    assert service.status()["files_quarantined"] == 0


def test_files_queued_when_a_session_stopped_still_go_up_after_a_restart(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy,
    folders: Folders, container: ContainerClient,
) -> None:
    """Stop a session, then a rolling update (SIGTERM) before its queue drained: the queue
    was in memory, and the files in it must not wait in incoming for ever."""
    service = through_proxy(service_factory, azurite, proxy, APP_WORKER_CONCURRENCY="1")
    service.start_session("drain")
    held = proxy.stall(method="PUT", times=None)  # the first upload holds the single worker
    files = drop(folders, "drain", {f"f{i:02}.bin": 1000 + i for i in range(20)})
    wait_for(lambda: service.status()["queue_depth"] >= 10, what="files to queue behind the held upload")
    # The held call shows long before the read timeout makes it count as stuck.
    wait_for(lambda: service.status()["azure_calls"]["longest_running_s"] >= 1,
             what="status to show how long the held call runs")
    assert service.status()["azure_calls"]["stuck"] == 0
    assert service.stop_session()["draining"] == ["drain"]
    late = write_file(folders.session("drain") / "late.bin", 10)  # after the stop: stays
    # So does a folder of older files moved in whole (a rename keeps its files' times).
    run = write_file(folders.root / "elsewhere" / "run7" / "old.bin", 10, seed=7)
    (folders.root / "elsewhere" / "run7").rename(folders.session("drain") / "run7")
    assert service.stop(signal.SIGTERM) == 0
    proxy.release(held)

    service.restart()
    assert wait_for_blobs(container, set(files)) == files
    wait_for(lambda: service.status()["draining"] == [], what="the drain to be forgotten")
    assert (folders.session("drain") / "late.bin").read_bytes() == late
    assert (folders.session("drain") / "run7" / "old.bin").read_bytes() == run
    assert set(blob_contents(container)) == set(files)
    assert service.status()["active"] is False
    assert not list((folders.processing / ".drains").rglob("*.json"))
