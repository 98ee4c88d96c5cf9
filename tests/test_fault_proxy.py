"""Self-tests of the fault proxy against a real Azurite, driven by the sync Azure SDK."""

from __future__ import annotations

import os
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobServiceClient,
    ContainerClient,
    LinearRetry,
)

from tests.faults.proxy import PUT_BLOCK, PUT_BLOCK_LIST, FaultProxy
from tests.support.azurite import Azurite

MiB = 1024 * 1024
CONNECTION_ERRORS = (ServiceRequestError, ServiceResponseError)


@pytest.fixture
def made_container(container: ContainerClient) -> ContainerClient:
    # Created directly on Azurite so the proxy's counters only see what the test does.
    container.create_container()
    return container


def via_proxy(
    azurite: Azurite, proxy: FaultProxy, container: ContainerClient, **kwargs: Any
) -> ContainerClient:
    service = BlobServiceClient.from_connection_string(
        azurite.connection_string(port=proxy.port), **kwargs
    )
    return service.get_container_client(container.container_name)


def no_retry(
    azurite: Azurite, proxy: FaultProxy, container: ContainerClient, **kwargs: Any
) -> ContainerClient:
    return via_proxy(azurite, proxy, container, retry_total=0, **kwargs)


def error_code(exc: HttpResponseError) -> str | None:
    # The storage SDK attaches error_code at runtime; azure-core's type does not declare it.
    return getattr(exc, "error_code", None)


def block_id(i: int) -> str:
    return f"{i:08d}"


def test_passthrough_upload_and_download_count_body_bytes(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    data = os.urandom(6 * MiB)
    client = via_proxy(azurite, proxy, made_container)

    client.upload_blob("blob", data)
    assert client.download_blob("blob").readall() == data

    stats = proxy.stats()
    assert stats.bytes_up == len(data)
    assert stats.bytes_down == len(data)
    assert stats.count("PUT", "") == 1
    assert stats.count("GET", "") == 1
    assert stats.faults == {}
    assert stats.connections == 1  # keep-alive carried both requests


def test_block_upload_counts_each_operation(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    data = os.urandom(4 * MiB)
    client = via_proxy(azurite, proxy, made_container, max_single_put_size=MiB, max_block_size=MiB)

    client.upload_blob("blob", data, max_concurrency=4)

    stats = proxy.stats()
    assert stats.count("PUT", "comp=block") == 4
    assert stats.count("PUT", "comp=blocklist") == 1
    # Block bodies plus the small block-list XML.
    assert len(data) < stats.bytes_up < len(data) + 4096
    assert made_container.download_blob("blob").readall() == data


def test_error_503_surfaces_as_server_busy_then_same_client_recovers(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    proxy.error(503, method="PUT")

    with pytest.raises(HttpResponseError) as caught:
        blob.upload_blob(os.urandom(256 * 1024))
    assert caught.value.status_code == 503
    assert error_code(caught.value) == "ServerBusy"
    assert proxy.stats().bytes_up == 0  # drained, never forwarded

    blob.upload_blob(b"second try")

    assert made_container.download_blob("blob").readall() == b"second try"
    stats = proxy.stats()
    assert stats.faults == {"error": 1}
    assert stats.connections == 1  # the drained body kept the connection usable


def test_error_on_head_request_has_no_body_but_keeps_error_code(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"x")
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    proxy.error(500, method="HEAD")

    with pytest.raises(HttpResponseError) as caught:
        blob.get_blob_properties()
    assert caught.value.status_code == 500
    assert error_code(caught.value) == "InternalError"

    assert blob.get_blob_properties().size == 1


def test_reset_mid_body_on_put_block_is_a_connection_error_and_a_retry_succeeds(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    data = os.urandom(4 * MiB)
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    proxy.reset_mid_body(after_bytes=MiB, method="PUT", target=PUT_BLOCK)

    with pytest.raises(CONNECTION_ERRORS):
        blob.stage_block(block_id(0), data)
    stats = proxy.stats()
    assert stats.bytes_up == MiB  # exactly what reached Azurite before the reset
    assert stats.faults == {"reset_mid_body": 1}

    blob.stage_block(block_id(0), data)
    blob.commit_block_list([BlobBlock(block_id(0))])
    assert made_container.download_blob("blob").readall() == data


def test_sdk_retries_through_a_reset(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    data = os.urandom(2 * MiB)
    client = via_proxy(
        azurite,
        proxy,
        made_container,
        retry_policy=LinearRetry(backoff=0, random_jitter_range=0),
        max_single_put_size=MiB,
        max_block_size=MiB,
    )
    proxy.reset_mid_body(after_bytes=64 * 1024, target=PUT_BLOCK)

    client.upload_blob("blob", data)

    stats = proxy.stats()
    assert stats.faults == {"reset_mid_body": 1}
    assert stats.count("PUT", "comp=block") == 3  # two blocks plus one retry
    assert stats.bytes_up < len(data) + 64 * 1024 + 4096
    assert made_container.download_blob("blob").readall() == data


def test_reset_after_the_whole_body_loses_only_the_response(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    proxy.reset_mid_body(after_bytes=MiB, method="PUT")

    with pytest.raises(CONNECTION_ERRORS):
        blob.upload_blob(b"landed anyway")

    # The write reached Azurite even though the client saw a dead connection.
    assert made_container.download_blob("blob").readall() == b"landed anyway"


def test_stall_trips_the_client_read_timeout(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"x")
    blob = no_retry(azurite, proxy, made_container, read_timeout=0.5).get_blob_client("blob")
    rule = proxy.stall(method="GET")

    started = time.monotonic()
    with pytest.raises(ServiceResponseTimeoutError):
        blob.download_blob().readall()
    assert 0.4 < time.monotonic() - started < 5
    assert proxy.stats().stalled_now == 1

    proxy.release(rule)


def test_release_lets_a_stalled_request_succeed(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    rule = proxy.stall(method="PUT")

    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(blob.upload_blob, b"held then sent")
        proxy.wait_stalled(rule, timeout=5)
        time.sleep(0.3)
        assert not upload.done()
        assert proxy.stats().bytes_up == 0

        proxy.release(rule)
        upload.result(timeout=5)

    assert made_container.download_blob("blob").readall() == b"held then sent"
    assert proxy.stats().stalled_now == 0


def test_stall_with_seconds_forwards_on_its_own(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"x")
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    proxy.stall(method="HEAD", seconds=0.4)

    started = time.monotonic()
    assert blob.get_blob_properties().size == 1
    assert time.monotonic() - started >= 0.4


def test_clear_releases_stalls_and_removes_rules(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"x")
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    rule = proxy.stall(method="HEAD")
    proxy.error(503, times=None)

    with ThreadPoolExecutor(1) as pool:
        props = pool.submit(blob.get_blob_properties)
        proxy.wait_stalled(rule, timeout=5)
        proxy.clear()
        assert props.result(timeout=5).size == 1

    assert blob.download_blob().readall() == b"x"


def test_latency_delays_every_request(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"x")
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    blob.get_blob_properties()  # connect outside the timed calls

    proxy.latency(0.3)
    for _ in range(2):
        started = time.monotonic()
        blob.get_blob_properties()
        assert time.monotonic() - started >= 0.3

    proxy.latency(0)
    started = time.monotonic()
    blob.get_blob_properties()
    assert time.monotonic() - started < 0.3
    assert proxy.stats().faults == {"latency": 2}


def test_times_n_hits_only_the_next_n_matching_requests(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    blob = no_retry(azurite, proxy, made_container).get_blob_client("blob")
    # Put Block List only: the Put Blocks must not match although `comp=block` is a prefix.
    proxy.error(500, method="PUT", target=PUT_BLOCK_LIST, times=2)
    blob.stage_block(block_id(0), b"a")
    blob.stage_block(block_id(1), b"b")

    for _ in range(2):
        with pytest.raises(HttpResponseError) as caught:
            blob.commit_block_list([BlobBlock(block_id(0)), BlobBlock(block_id(1))])
        assert caught.value.status_code == 500
        assert error_code(caught.value) == "InternalError"
    blob.commit_block_list([BlobBlock(block_id(0)), BlobBlock(block_id(1))])

    assert made_container.download_blob("blob").readall() == b"ab"
    stats = proxy.stats()
    assert stats.faults == {"error": 2}
    assert stats.count("PUT", "comp=block") == 2
    assert stats.count("PUT", "comp=blocklist") == 3


def test_times_none_applies_until_removed(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    blob: BlobClient = no_retry(azurite, proxy, made_container).get_blob_client("missing")
    rule = proxy.error(503, method="HEAD", times=None)

    for _ in range(3):
        with pytest.raises(HttpResponseError) as caught:
            blob.get_blob_properties()
        assert caught.value.status_code == 503
    proxy.remove(rule)

    # Now Azurite answers for real.
    with pytest.raises(ResourceNotFoundError):
        blob.get_blob_properties()
    assert proxy.stats().faults == {"error": 3}


def test_keep_alive_framing_for_head_304_and_chunked_responses(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    made_container.upload_blob("blob", b"0123456789")
    # Public blobs let a plain HTTP client get real 200/304 answers without signing requests.
    made_container.set_container_access_policy(signed_identifiers={}, public_access="blob")
    container_url = f"{proxy.url}/devstoreaccount1/{made_container.container_name}"

    with httpx.Client() as http:
        head = http.head(f"{container_url}/blob")
        assert head.status_code == 200
        assert head.headers["content-length"] == "10"
        assert head.content == b""

        etag = head.headers["etag"]
        not_modified = http.get(f"{container_url}/blob", headers={"If-None-Match": etag})
        assert not_modified.status_code == 304

        # Anonymous listing is refused on a blob-level public container, with a chunked body.
        listing = http.get(container_url, params={"restype": "container", "comp": "list"})
        assert listing.status_code in (403, 404)
        assert listing.headers.get("transfer-encoding") == "chunked"
        assert b"<Error>" in listing.content

        assert http.get(f"{container_url}/blob").content == b"0123456789"
    assert proxy.stats().connections == 1


def test_many_concurrent_connections(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    client = via_proxy(azurite, proxy, made_container)
    payloads = {f"blob-{i}": os.urandom(512 * 1024) for i in range(32)}

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: client.upload_blob(*item), payloads.items()))
        downloaded = dict(
            zip(
                payloads,
                pool.map(lambda name: client.download_blob(name).readall(), payloads),
                strict=True,
            )
        )

    assert downloaded == payloads
    stats = proxy.stats()
    assert stats.connections > 1
    assert stats.bytes_up == stats.bytes_down == sum(map(len, payloads.values()))


def test_stalled_large_upload_is_bounded_by_the_write_timeout_not_the_read_timeout(
    azurite: Azurite, proxy: FaultProxy, made_container: ContainerClient
) -> None:
    # The stall leaves the body unread, so once socket buffers fill the SDK blocks in send();
    # urllib3 applies connection_timeout there, and read_timeout only after the body is sent.
    blob = no_retry(
        azurite, proxy, made_container, connection_timeout=0.5, read_timeout=60
    ).get_blob_client("blob")
    proxy.stall(method="PUT")

    started = time.monotonic()
    with pytest.raises(ServiceResponseError):
        blob.upload_blob(bytes(32 * MiB))
    assert time.monotonic() - started < 10
    assert proxy.stats().bytes_up == 0


def test_stop_cuts_off_stalled_requests(azurite: Azurite, made_container: ContainerClient) -> None:
    fault_proxy = FaultProxy.start(azurite.host, azurite.port)
    blob = no_retry(azurite, fault_proxy, made_container).get_blob_client("blob")
    rule = fault_proxy.stall()

    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(blob.upload_blob, b"never sent")
        fault_proxy.wait_stalled(rule, timeout=5)
        started = time.monotonic()
        fault_proxy.stop()
        assert time.monotonic() - started < 2
        with pytest.raises(CONNECTION_ERRORS):
            upload.result(timeout=5)


class _OneShotUpstream(socketserver.ThreadingTCPServer):
    """Answers one request per connection, then closes it without saying so, as Node does
    to keep-alive connections left idle past its keepAliveTimeout."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OneShotHandler)


class _OneShotHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_upstream_closing_an_idle_connection_is_not_a_fault() -> None:
    with _OneShotUpstream() as upstream:
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            with (
                FaultProxy.start("127.0.0.1", upstream.server_address[1]) as fault_proxy,
                httpx.Client() as http,
            ):
                for _ in range(3):
                    assert http.get(f"{fault_proxy.url}/x").text == "ok"
                    time.sleep(0.1)  # let the upstream's FIN arrive before the next request
                stats = fault_proxy.stats()
                assert stats.connections == 1
                assert stats.requests == 3
        finally:
            upstream.shutdown()
