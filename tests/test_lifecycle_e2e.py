"""Start-up, shutdown, crashes and restarts of the real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import httpx
import pytest
from azure.storage.blob import ContainerClient

from tests.conftest import ServiceFactory
from tests.support.azurite import REPO_ROOT, blob_contents, unreachable_connection_string
from tests.support.service import Folders, clean_environment, wait_for, write_file
from tests.test_upload_e2e import today, wait_for_blobs, wait_until_clean
from uploader.layout import FileKey, Layout

MiB = 1024 * 1024


def test_sigterm_exits_zero_promptly_without_traceback(service_factory: ServiceFactory) -> None:
    service = service_factory()
    service.start_session("bye")
    started = time.monotonic()
    assert service.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in service.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_exit_zero_like_sigterm(service_factory: ServiceFactory, sig: int) -> None:
    service = service_factory()
    assert service.stop(sig) == 0
    assert f"received {signal.Signals(sig).name}; shutting down" in service.log()
    assert "Traceback" not in service.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_modules_load_is_a_clean_shutdown(service_factory: ServiceFactory, sig: int) -> None:
    service = service_factory(start=False)
    service.start(wait_ready=False)
    time.sleep(0.3)  # the interpreter runs; the service's modules are still loading
    assert service.proc is not None
    service.proc.send_signal(sig)
    assert service.proc.wait(timeout=15) == 0, service.log()
    assert f"received {signal.Signals(sig).name}; shutting down" in service.log()
    assert "Traceback" not in service.log()


@pytest.mark.parametrize("gap_s", [0.002, 0.005, 0.01])
def test_a_second_sigterm_does_not_cut_the_shutdown_short(service_factory: ServiceFactory, gap_s: float) -> None:
    service = service_factory()
    service.start_session("twice")
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    time.sleep(gap_s)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=15) == 0
    assert '"message": "stopped"' in service.log()


def test_sigterm_exits_promptly_while_an_http2_client_reads_nothing(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory()
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        # A flow-control window of zero: the answer's body can never be sent.
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, [(":method", "GET"), (":path", "/v1/status"),
                                     (":scheme", "http"), (":authority", "x")], end_stream=True)
        sock.sendall(client.data_to_send())
        assert sock.recv(65536)  # the server's settings (and maybe the answer's headers)
        time.sleep(0.5)
        started = time.monotonic()
        assert service.stop(signal.SIGTERM, timeout=20) == 0
        assert time.monotonic() - started < 10


def test_sigkill_during_large_uploads_loses_nothing_and_resumes_the_session(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_AZURE_MAX_BLOCK_SIZE=str(MiB), APP_AZURE_MAX_CONCURRENCY="2")
    service.start_session("crash")
    expected = {
        f"{today()}/crash/big-{i}.bin": write_file(folders.session("crash") / f"big-{i}.bin", 48 * MiB, seed=i)
        for i in range(4)
    }
    # Kill while the files are in flight: claimed, some bytes sent, none finished.
    wait_for(lambda: service.status()["bytes_sent"] > 8 * MiB, timeout=60, interval=0.01,
             what="the uploads to be under way")
    service.kill()
    assert service.proc is not None and service.proc.returncode == -signal.SIGKILL
    in_flight = list((folders.processing / today() / "crash").iterdir())
    assert in_flight, "expected claimed files left in processing"

    service.restart()
    assert service.status()["active"] is True
    assert service.status()["session_name"] == "crash"
    blobs = wait_for_blobs(container, set(expected), timeout=120)
    assert blobs == expected
    wait_until_clean(folders)
    # The resumed session still watches.
    later = write_file(folders.session("crash") / "after.bin", 10, seed=5)
    assert wait_for_blobs(container, {f"{today()}/crash/after.bin"})[f"{today()}/crash/after.bin"] == later


def test_a_stopped_session_stays_stopped_after_a_restart(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory()
    service.start_session("halt")
    service.stop_session()
    wait_for(lambda: b'"active": false' in (folders.processing / "session.json").read_bytes(),
             what="the stopped state to be recorded")
    service.kill()
    service.restart()
    status = service.status()
    assert status["active"] is False
    assert status["session_name"] == "halt"
    write_file(folders.session("halt") / "stays.txt", 10)
    time.sleep(1)
    assert (folders.session("halt") / "stays.txt").exists()
    assert blob_contents(container) == {}


def test_an_interrupted_claim_uploads_the_file_once(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    """A crash between link() and unlink() leaves the file in incoming and processing."""
    service = service_factory(start=False)
    date = today()
    (folders.processing / date / "twin").mkdir(parents=True)
    folders.session("twin").mkdir(parents=True)
    data = write_file(folders.session("twin") / "t.bin", 5000)
    os.link(folders.session("twin") / "t.bin", folders.processing / date / "twin" / "t.bin")
    (folders.processing / "session.json").write_text(
        f'{{"active": true, "session_name": "twin", "date_prefix": "{date}"}}'
    )
    service.start()
    assert wait_for_blobs(container, {f"{date}/twin/t.bin"}) == {f"{date}/twin/t.bin": data}
    wait_until_clean(folders)
    assert service.status()["files_processed"] == 1


def interrupted_quarantine(folders: Folders, session: str, rel: Path, size: int) -> tuple[bytes, Path]:
    """A crash in the middle of a quarantine: the file linked into the failed folder, its
    reason written, the claimed name not yet removed. (the file's bytes, its failed path)"""
    date = today()
    layout = Layout(folders.incoming, folders.processing, folders.staging)
    key = FileKey(date, session, rel.as_posix())
    data = write_file(layout.processing_path(key), size)
    failed = layout.failed_path(key)
    failed.parent.mkdir(parents=True)
    os.link(layout.processing_path(key), failed)
    reason = layout.failed_reason_path(failed)
    reason.parent.mkdir(parents=True)
    reason.write_text(json.dumps({"file": key.rel, "path": str(failed), "reason": "the staging disk is full"}))
    (folders.processing / "session.json").write_text(
        f'{{"active": false, "session_name": "{session}", "date_prefix": "{date}"}}'
    )
    return data, failed


def test_a_file_whose_quarantine_a_crash_interrupted_goes_up_and_leaves_the_failed_folder(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    """Tried again after the restart, it goes up: it is not also listed as quarantined."""
    service = service_factory(start=False)
    data, failed = interrupted_quarantine(folders, "q", Path("x.bin"), 5000)
    service.start()
    assert wait_for_blobs(container, {f"{today()}/q/x.bin"}) == {f"{today()}/q/x.bin": data}
    wait_until_clean(folders)
    status = service.status()
    assert status["files_quarantined"] == 0 and status["quarantined"] == []
    assert not failed.exists()


def test_a_file_whose_quarantine_a_crash_interrupted_is_counted_once_when_quarantined_again(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(start=False)
    far = Path(*["d" * 200] * 5) / "far.bin"  # a blob name Azure refuses: quarantined at once
    data, failed = interrupted_quarantine(folders, "deep", far, 100)
    service.start()
    wait_for(lambda: service.status()["files_quarantined"] >= 1, timeout=30, what="the quarantine")
    time.sleep(1)  # the failed folder is read once start-up is done: it must not count it twice
    status = service.status()
    assert status["files_quarantined"] == 1
    assert [record["path"] for record in status["quarantined"]] == [str(failed)]
    assert failed.read_bytes() == data
    assert [path for path in folders.files_on_nfs() if ".failed" not in path.parts] == []


def test_a_state_file_the_service_did_not_write_is_set_aside_and_reported(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    """A FIFO where session.json should be: a plain read would wait for a writer for ever."""
    service = service_factory(start=False)
    date = today()
    (folders.processing / date / "left").mkdir(parents=True)
    data = write_file(folders.processing / date / "left" / "claimed.bin", 3000)
    os.mkfifo(folders.processing / "session.json")
    service.start(timeout=15)

    assert "session.json could not be used (it is not a regular file)" in service.status()["last_error"]
    assert [p.name[:17] for p in folders.processing.glob("session.json.bad-*")] == ["session.json.bad-"]
    # Files claimed before still go up, and a new session starts.
    assert wait_for_blobs(container, {f"{date}/left/claimed.bin"}) == {f"{date}/left/claimed.bin": data}
    assert service.start_session("fresh")["active"] is True


def test_healthz_stays_fast_while_workers_are_saturated(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    service = service_factory(APP_WORKER_CONCURRENCY="4", APP_AZURE_MAX_BLOCK_SIZE=str(MiB))
    service.start_session("busy")
    for i in range(16):
        write_file(folders.session("busy") / f"load-{i}.bin", 16 * MiB, seed=i)
    wait_for(lambda: service.status()["in_flight"] >= 4, timeout=30, interval=0.01,
             what="every worker to be busy")
    latencies = []
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while service.status()["in_flight"] >= 2 and len(latencies) < 400:
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    assert len(latencies) >= 20
    # A generous bound: this checks the loop is never blocked, not how fast the machine is.
    assert max(latencies) < 1.0, f"slowest /healthz took {max(latencies):.3f} s"
    assert statistics.median(latencies) < 0.1


def test_a_missing_container_is_created(
    service_factory: ServiceFactory, container: ContainerClient
) -> None:
    assert not container.exists()
    service_factory()
    assert container.exists()


def settings_env(tmp_path: Path) -> dict[str, str]:
    """Good settings for a start-up that only gets as far as reading them."""
    return clean_environment() | {
        "APP_AZURE_AUTH": "key",
        "APP_AZURE_CONTAINER": "ok-container",
        "APP_AZURE_CONNECTION_STRING": "UseDevelopmentStorage=true",
        "APP_NFS_INCOMING_DIR": str(tmp_path / "in"),
        "APP_NFS_PROCESSING_ROOT": str(tmp_path / "proc"),
        "APP_LOCAL_STAGING_ROOT": str(tmp_path / "stage"),
    }


def refused_setting(env: dict[str, str]) -> str:
    """Start ``python -m uploader``; it must stop with exit 2 and one line, returned."""
    result = subprocess.run(
        [sys.executable, "-m", "uploader"], env=env,
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_settings_stop_start_up_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    base = settings_env(tmp_path)
    cases = {
        "APP_POLL_INTERVAL_S": "-1",
        "APP_PORT": "http",
        "APP_WORKER_CONCURRENCY": "0",
        "APP_AZURE_CONTAINER": "Bad_Name",
        "APP_AZURE_AUTH": "magic",
        "APP_NFS_INCOMING_DIR": "relative/path",
        "APP_AZURE_MAX_BLOCK_SIZE": "1",
    }
    for variable, value in cases.items():
        assert variable in refused_setting(base | {variable: value})
    # A required setting that is missing is named too.
    env = {k: v for k, v in base.items() if k != "APP_AZURE_CONTAINER"}
    assert refused_setting(env) == "uploader: bad setting: APP_AZURE_CONTAINER is required but not set"


def test_a_malformed_or_empty_connection_string_stops_start_up_with_one_line(tmp_path: Path) -> None:
    expected = {
        "garbage": "uploader: bad setting: APP_AZURE_CONNECTION_STRING: must be name=value pairs",
        # Empty is not set: key auth then has no credential at all.
        "": "uploader: bad setting: APP_AZURE_AUTH=key needs APP_AZURE_CONNECTION_STRING",
    }
    for value, start in expected.items():
        line = refused_setting(settings_env(tmp_path) | {"APP_AZURE_CONNECTION_STRING": value})
        assert line.startswith(start), (value, line)


def test_bad_otel_settings_stop_start_up_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    cases = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "notaurl",
        "OTEL_TRACES_EXPORTER": "bogus",
        "OTEL_TRACES_SAMPLER": "bogus",
        "OTEL_METRIC_EXPORT_INTERVAL": "abc",
        "OTEL_BSP_MAX_QUEUE_SIZE": "0",
        # Read by OpenTelemetry when it is imported: still one line, not a traceback.
        "OTEL_PROPAGATORS": "b3",
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-3",
    }
    for variable, value in cases.items():
        line = refused_setting(settings_env(tmp_path) | {variable: value})
        assert line.startswith(f"uploader: bad setting: {variable}: "), line
    # With a bad APP_ setting too, both are on the one line.
    line = refused_setting(settings_env(tmp_path) | {"APP_PORT": "0", "OTEL_TRACES_SAMPLER": "bogus"})
    assert "APP_PORT" in line and "OTEL_TRACES_SAMPLER" in line


def test_overlapping_folders_are_refused(tmp_path: Path) -> None:
    line = refused_setting(settings_env(tmp_path) | {
        "APP_NFS_INCOMING_DIR": str(tmp_path / "nfs"),
        "APP_NFS_PROCESSING_ROOT": str(tmp_path / "nfs" / ".processing"),
    })
    assert "APP_NFS_INCOMING_DIR" in line and "APP_NFS_PROCESSING_ROOT" in line


def test_overlapping_folders_with_bytes_that_are_no_utf8_are_refused_in_one_line(tmp_path: Path) -> None:
    """They ended in a UnicodeEncodeError traceback and exit 1."""
    line = refused_setting(settings_env(tmp_path) | {
        "APP_NFS_INCOMING_DIR": os.fsdecode(b"/x/in\xff"),
        "APP_LOCAL_STAGING_ROOT": os.fsdecode(b"/x/in\xff/s"),
    })
    assert line.startswith(
        "uploader: bad setting: APP_NFS_INCOMING_DIR (/x/in\\xff) and APP_LOCAL_STAGING_ROOT (/x/in\\xff/s) "
    )


def test_unreachable_storage_stops_start_up_with_a_clear_line(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory(
        start=False,
        connection_string=unreachable_connection_string(),
        APP_AZURE_RETRY_TOTAL="0",
    )
    service.start(wait_ready=False)
    assert service.proc is not None
    assert service.proc.wait(timeout=30) == 1
    assert "cannot reach Azure Blob Storage" in service.log()
    assert "Traceback" not in service.log()


def test_port_in_use_stops_start_up_with_a_clear_line(service_factory: ServiceFactory) -> None:
    first = service_factory()
    second = service_factory(start=False)
    second.env["APP_PORT"] = str(first.port)
    second.port = first.port
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=30) == 1
    assert "cannot listen on 127.0.0.1" in second.log()



def test_default_auth_with_only_a_connection_string_to_plain_http_uses_the_key(
    service_factory: ServiceFactory, folders: Folders, container: ContainerClient
) -> None:
    """APP_AZURE_AUTH left at auto: no token goes over http, so the key is used at once."""
    service = service_factory(APP_AZURE_AUTH=None)
    assert "DefaultAzureCredential needs an https://" in service.log()
    service.start_session("auto")
    data = write_file(folders.session("auto") / "a.txt", 10)
    assert wait_for_blobs(container, {f"{today()}/auto/a.txt"})[f"{today()}/auto/a.txt"] == data
