"""The service's own log output, as a process that reads its stderr (or does not) sees it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from azure.storage.blob import ContainerClient

from tests.support.azurite import REPO_ROOT, Azurite, free_port
from tests.support.service import Folders, service_environment, wait_for, write_file
from tests.test_upload_e2e import today

FILES = 120  # their "uploaded" lines alone are several times the pipe's one page


@pytest.fixture
def unread_pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    # The smallest pipe there is: a few dozen log lines fill it.
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_stderr_nobody_reads_holds_up_neither_uploads_nor_probes_nor_exit(
    azurite: Azurite, container: ContainerClient, folders: Folders,
    unread_pipe: tuple[int, int],
) -> None:
    read_end, write_end = unread_pipe
    port = free_port()
    env = service_environment(folders, azurite.connection_string(), container.container_name, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uploader"], env=env, stdout=write_end, stderr=write_end, cwd=REPO_ROOT
    )
    os.close(write_end)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
            wait_for(lambda: _ready(http), timeout=30, what="the service to be ready")
            assert http.post("/v1/watch/start", json={"session_name": "quiet"}).status_code == 200
            for i in range(FILES):
                write_file(folders.session("quiet") / f"f{i:04d}.txt", 100, seed=i)

            def all_up() -> bool:
                # Every probe meanwhile answers within the client's timeout, or this raises.
                assert http.get("/healthz").status_code == 200
                prefix = f"{today()}/quiet/"
                return sum(1 for _ in container.list_blobs(name_starts_with=prefix)) == FILES

            wait_for(all_up, timeout=120, interval=0.5, what="every blob")
            assert http.get("/v1/status").json()["files_processed"] == FILES
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = drain(read_end).decode().splitlines()
    assert lines and all(json.loads(line)["message"] for line in lines)


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False
