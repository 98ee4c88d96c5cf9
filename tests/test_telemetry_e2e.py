"""Traces, metrics and logs, as a real OTLP/HTTP receiver on loopback gets them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite
from tests.support.otlp import OtlpReceiver, SpanRecord
from tests.support.service import Folders, ServiceProcess, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean

MiB = 1024 * 1024
SERVER = 2  # SpanKind.SERVER in the OTLP protobuf
SIZES = {"a.bin": 1000, "b.bin": 3 * MiB, "big.bin": 10 * MiB, "fails-once.bin": 2000}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def observed(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy, receiver: OtlpReceiver,
    folders: Folders, container: ContainerClient,
) -> ServiceProcess:
    """A known workload: four files, one of which fails once before it goes up."""
    service = service_factory(
        connection_string=azurite.connection_string(port=proxy.port),
        APP_AZURE_MAX_SINGLE_PUT_SIZE=str(4 * MiB),
        APP_AZURE_MAX_BLOCK_SIZE=str(MiB),
        APP_AZURE_RETRY_TOTAL="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint + "\n",  # as a YAML block gives it
        OTEL_SERVICE_NAME="uploader-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_BLRP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="300",
    )
    for _ in range(3):
        assert service.http.get("/healthz").status_code == 200
    proxy.error(500, method="PUT", target="tele/fails-once.bin", times=1)
    service.start_session("tele")
    expected = {
        f"{today()}/tele/{name}": write_file(folders.session("tele") / name, size, seed=i)
        for i, (name, size) in enumerate(SIZES.items())
    }
    assert wait_for_blobs(container, set(expected)) == expected
    wait_until_clean(folders)
    return service


def spans_named(receiver: OtlpReceiver, name: str) -> list[SpanRecord]:
    with receiver.lock:
        return [s for s in receiver.spans if s.name == name]


def test_one_file_is_one_trace_covering_its_whole_pipeline(
    observed: ServiceProcess, receiver: OtlpReceiver
) -> None:
    def big_file_span() -> SpanRecord | None:
        done = [s for s in spans_named(receiver, "file")
                if s.attributes.get("file") == "big.bin" and s.attributes.get("outcome") == "uploaded"]
        return done[0] if done else None

    file_span = wait_for(big_file_span, timeout=20, what="the big file's span")
    assert file_span.attributes["session"] == "tele"
    assert file_span.attributes["size"] == SIZES["big.bin"]
    assert file_span.resource["service.name"] == "uploader-under-test"

    def below(span: SpanRecord) -> dict[str, SpanRecord]:
        """Every span under ``span`` in its trace, by name."""
        with receiver.lock:
            trace_spans = [s for s in receiver.spans if s.trace_id == span.trace_id]
        found: dict[str, SpanRecord] = {}
        parents = {span.span_id}
        while True:
            more = {s.name: s for s in trace_spans if s.parent_span_id in parents and s.name not in found}
            if not more:
                return found
            found.update(more)
            parents |= {s.span_id for s in more.values()}

    steps = wait_for(
        lambda: {"claim", "stage", "upload", "complete"} <= set(b := below(file_span)) and b,
        timeout=20, what="the step spans",
    )
    # The span context crosses into the worker threads: the calls made there are under
    # the step that made them.
    assert "nfs claim" in below(steps["claim"])
    # A large file is copied to staging while its blocks go up.
    assert "stage" in below(steps["upload"]) and "nfs stage_copy" in below(steps["stage"])
    assert "azure stage_block" in below(steps["upload"])
    assert "azure commit_block_list" in below(steps["upload"])
    assert "nfs finish" in below(steps["complete"])
    assert all(s.trace_id == file_span.trace_id for s in steps.values())
    # A new blob has no blocks to resume from: expected, and no error in the trace.
    assert [s.name for s in below(file_span).values() if s.error] == []


def test_the_failed_attempt_is_a_span_of_its_own(observed: ServiceProcess, receiver: OtlpReceiver) -> None:
    def outcomes() -> list[str]:
        return sorted(str(s.attributes.get("outcome")) for s in spans_named(receiver, "file")
                      if s.attributes.get("file") == "fails-once.bin")

    assert wait_for(lambda: outcomes() == ["failed", "uploaded"], timeout=20, what="both attempts")


def test_a_quarantined_file_s_span_says_so_and_holds_the_move(
    service_factory: ServiceFactory, receiver: OtlpReceiver, folders: Folders
) -> None:
    service = service_factory(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    service.start_session("deep")
    write_file(folders.session("deep") / Path(*["d" * 200] * 5) / "far.bin", 100)  # a name Azure refuses

    def far_span() -> SpanRecord | None:
        spans = [s for s in spans_named(receiver, "file") if str(s.attributes.get("file")).endswith("far.bin")]
        return spans[0] if spans else None

    span = wait_for(far_span, timeout=20, what="the span of the quarantined file")
    assert span.attributes["outcome"] == "quarantined" and span.attributes["disposition"] == "permanent"
    assert span.error
    with receiver.lock:
        children = [s.name for s in receiver.spans if s.parent_span_id == span.span_id]
    assert "nfs quarantine" in children


def test_api_requests_get_server_spans_but_probes_do_not(
    observed: ServiceProcess, receiver: OtlpReceiver
) -> None:
    def server_paths() -> set[str]:
        with receiver.lock:
            return {
                str(s.attributes.get("url.path") or s.attributes.get("http.target"))
                for s in receiver.spans if s.kind == SERVER
            }

    assert observed.http.get("/metrics").status_code == 200
    assert observed.http.get("/v1/metrics").status_code == 404  # a path with the word: traced
    assert "/v1/metrics" in wait_for(lambda: "/v1/metrics" in server_paths() and server_paths(),
                                     timeout=20, what="server spans")
    paths = server_paths()
    assert "/v1/watch/start" in paths
    assert "/healthz" not in paths and "/metrics" not in paths


def test_the_start_request_s_trace_ends_with_the_request(
    observed: ServiceProcess, receiver: OtlpReceiver
) -> None:
    """The watcher it starts runs for the session's life; its scans are not the request's."""

    def start_span() -> SpanRecord | None:
        with receiver.lock:
            found = [s for s in receiver.spans if s.kind == SERVER and "/v1/watch/start" in (
                str(s.attributes.get("url.path")), str(s.attributes.get("http.target")))]
        return found[0] if found else None

    start = wait_for(start_span, timeout=20, what="the start request's span")
    with receiver.lock:
        in_its_trace = {s.name for s in receiver.spans if s.trace_id == start.trace_id}
    assert "nfs write" in in_its_trace  # the session state, recorded by the request
    assert not any("scan" in name for name in in_its_trace), in_its_trace


def test_a_drain_s_work_after_the_stop_request_is_not_in_its_trace(
    service_factory: ServiceFactory, azurite: Azurite, proxy: FaultProxy, receiver: OtlpReceiver,
    folders: Folders, container: ContainerClient,
) -> None:
    """The stop answers at once; the drain it leaves behind lasts until the queue is worked off."""
    service = service_factory(
        connection_string=azurite.connection_string(port=proxy.port),
        APP_WORKER_CONCURRENCY="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    held = proxy.stall(method="PUT", times=None)
    service.start_session("drained")
    names = {f"q{i}.bin" for i in range(4)}
    for i, name in enumerate(sorted(names)):
        write_file(folders.session("drained") / name, 100, seed=i)
    proxy.wait_stalled(held, timeout=20)
    wait_for(lambda: service.status()["queue_depth"] > 0, timeout=20, what="files queued behind the stalled one")
    service.stop_session()
    proxy.remove(held)  # (first: it would hold the next request)
    proxy.release_all()
    wait_for_blobs(container, {f"{today()}/drained/{name}" for name in names})

    # The drain ends once it found its files gone from the folder: checks made after the stop.
    wait_for(lambda: service.status()["draining"] == [], timeout=20, what="the drain to end")
    service.stop()  # (which flushes the spans)
    with receiver.lock:
        stops = [s for s in receiver.spans if s.kind == SERVER and "/v1/watch/stop" in (
            str(s.attributes.get("url.path")), str(s.attributes.get("http.target")))]
        assert len(stops) == 1
        in_its_trace = {s.name for s in receiver.spans if s.trace_id == stops[0].trace_id}
    assert "nfs write" in in_its_trace  # the state and the drain, recorded by the request
    assert "nfs still_there" not in in_its_trace, in_its_trace


def test_the_five_metrics_have_the_workloads_values(
    observed: ServiceProcess, receiver: OtlpReceiver
) -> None:
    wait_for(lambda: receiver.total("files.processed") == 4, timeout=20, what="files.processed")
    assert receiver.total("files.failed") == 1
    assert receiver.total("upload.duration") == 4  # histogram: one sample per upload
    assert receiver.total("file.size") == 4
    with receiver.lock:
        assert receiver.metrics["file.size"][0]["sum"] == sum(SIZES.values())
        assert receiver.metrics["queue.depth"][0]["value"] == 0
        assert receiver.metrics["bytes.uploaded"][0]["value"] == sum(SIZES.values())
        assert "files.in_flight" in receiver.metrics


def test_metrics_are_scrapeable_in_prometheus_format(observed: ServiceProcess) -> None:
    answer = observed.http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(answer.text.splitlines())
    assert "# TYPE files_processed_total counter" in lines
    assert "files_processed_total 4" in lines
    assert "# TYPE upload_duration_seconds histogram" in lines
    assert "upload_duration_seconds_count 4" in lines
    assert f"file_size_bytes_sum {sum(SIZES.values())}" in lines
    assert "queue_depth 0" in lines
    assert 'files_failed_total{disposition="retryable"} 1' in lines
    assert {"files_retry_waiting 0", "files_claimed 0", "files_incoming 0"} <= lines
    assert {f'calls_stuck{{lane="{lane}"}} 0' for lane in ("nfs", "staging", "azure")} <= lines


def test_histogram_buckets_fit_file_sizes_and_upload_times(observed: ServiceProcess) -> None:
    """Not the SDK's default 0..10,000 boundaries: sizes from 1 KiB to 64 GiB by powers of 4,
    durations from 10 ms to an hour."""

    def buckets(name: str) -> dict[str, int]:
        found = {}
        for line in observed.http.get("/metrics").text.splitlines():
            if line.startswith(f'{name}_bucket{{le="'):
                bound, count = line.removeprefix(f'{name}_bucket{{le="').split('"} ')
                found[bound] = int(count)
        return found

    # 1000 and 2000 bytes, 3 MiB and 10 MiB: each in its own bucket, none past 64 GiB.
    sizes = buckets("file_size_bytes")
    assert list(sizes) == [repr(float(1024 * 4**i)) for i in range(14)] + ["+Inf"]
    assert sizes["1024.0"] == 1 and sizes["4096.0"] == 2
    assert sizes["1048576.0"] == 2 and sizes["4194304.0"] == 3 and sizes["16777216.0"] == 4
    assert sizes["68719476736.0"] == sizes["+Inf"] == 4
    durations = buckets("upload_duration_seconds")
    assert list(durations) == [
        "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "25.0",
        "60.0", "120.0", "300.0", "600.0", "1800.0", "3600.0", "+Inf",
    ]
    assert durations["3600.0"] == durations["+Inf"] == 4


def test_logs_are_json_lines_that_carry_the_trace(
    observed: ServiceProcess, receiver: OtlpReceiver
) -> None:
    lines = [json.loads(line) for line in observed.log().splitlines() if line.startswith("{")]
    uploaded = [e for e in lines if e["message"].endswith("/tele/big.bin (10485760 bytes, 0 resumed)")]
    assert len(uploaded) == 1
    entry = uploaded[0]
    assert entry["session"] == "tele" and entry["file"] == "big.bin"
    wait_for(
        lambda: entry["trace_id"] in {
            s.trace_id for s in spans_named(receiver, "file") if s.attributes.get("file") == "big.bin"
        },
        timeout=20, what="the log's trace among the file's spans",
    )

    def exported() -> list[object]:
        with receiver.lock:
            return [r for r in receiver.logs if str(r.body).startswith("uploaded") and "big.bin" in str(r.body)]

    record = wait_for(exported, timeout=20, what="the OTLP log record")[0]
    assert record.trace_id == entry["trace_id"]  # type: ignore[attr-defined]


def test_the_log_line_of_a_failed_attempt_names_its_session_and_file(
    observed: ServiceProcess,
) -> None:
    lines = [json.loads(line) for line in observed.log().splitlines() if line.startswith("{")]
    [failed] = [e for e in lines if e["message"].startswith("attempt 1 of ")]
    assert failed["level"] == "warning"
    assert (failed["session"], failed["file"]) == ("tele", "fails-once.bin")


def test_every_counter_is_scrapeable_at_zero_before_anything_happened(
    service_factory: ServiceFactory,
) -> None:
    text = service_factory().http.get("/metrics").text
    for series in ("files_processed_total 0", "bytes_uploaded_total 0", "files_quarantined_total 0",
                   'files_failed_total{disposition="retryable"} 0',
                   'files_failed_total{disposition="permanent"} 0'):
        assert series in text, series


def test_http_server_metrics_keep_one_series_whatever_host_clients_name(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory()
    for n in range(5):
        assert service.http.get("/v1/status", headers={"Host": f"h{n}.example"}).status_code == 200
    text = service.http.get("/metrics").text
    assert "example" not in text
    active = [line for line in text.splitlines() if line.startswith("http_server_active_requests{")]
    assert active == ['http_server_active_requests{http_flavor="1.1",http_method="GET",'
                      'http_scheme="http"} 0']


def test_metrics_switched_off_with_the_sdk_say_so(service_factory: ServiceFactory) -> None:
    answer = service_factory(OTEL_SDK_DISABLED="true").http.get("/metrics")
    assert answer.status_code == 503
    assert "OTEL_SDK_DISABLED=true" in answer.json()["error"]


def test_the_collector_gets_the_configured_token_and_service_name_whatever_netrc_says(
    service_factory: ServiceFactory, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"  # requests would send its Basic auth instead of the token
    netrc.write_text("machine 127.0.0.1 login someone password s3cr3t\n")
    netrc.chmod(0o600)
    service = service_factory(
        HOME=str(home),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer tok123",
        OTEL_RESOURCE_ATTRIBUTES="service.name=my-uploader,deployment.environment=lab",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    service.start_session("named")
    wait_for(lambda: receiver.spans, what="a span to arrive")
    assert receiver.spans[0].resource["service.name"] == "my-uploader"
    assert receiver.spans[0].resource["deployment.environment"] == "lab"
    assert set(receiver.authorizations) == {"Bearer tok123"}


@pytest.mark.parametrize("blank", [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "   ", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}],
                         ids=["unset", "blank"])
def test_without_an_endpoint_nothing_is_exported_and_nothing_complains(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient, blank: dict[str, str]
) -> None:
    service = service_factory(**blank)
    service.start_session("quiet")
    write_file(folders.session("quiet") / "q.bin", 100)
    wait_for_blobs(container, {f"{today()}/quiet/q.bin"})
    assert "files_processed_total 1" in service.http.get("/metrics").text
    service.stop()
    noisy = [line for line in service.log().splitlines()
             if '"level": "warning"' in line or '"level": "error"' in line or "opentelemetry" in line]
    assert noisy == []
