"""The real service, started as users start it (``python -m uploader``), driven over HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.azurite import REPO_ROOT, free_port

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until ``predicate`` returns something truthy; the timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
        last = predicate()
    return last


def clean_environment() -> dict[str, str]:
    """This process's environment without any APP_*, OTEL_*, AZURE_* or RCLONE_* setting."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APP_", "OTEL_", "AZURE_", "RCLONE_"))
    }


@dataclass
class Folders:
    """The service's folders. Tests read and write NFS through ``nfs``; the service is given
    ``service_nfs``, which differs when the share is a fault-injecting FUSE mount whose
    backing folder (``nfs``) plays the NFS server's own disk."""

    root: Path
    mounted_nfs: Path | None = None
    backing_nfs: Path | None = None

    @property
    def nfs(self) -> Path:
        return self.backing_nfs or self.root / "nfs"

    @property
    def service_nfs(self) -> Path:
        return self.mounted_nfs or self.nfs

    @property
    def incoming(self) -> Path:
        return self.nfs / "incoming"

    @property
    def processing(self) -> Path:
        return self.nfs / ".processing"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def session(self, name: str) -> Path:
        return self.incoming / name

    def files_on_nfs(self) -> list[Path]:
        """Every file on the NFS side, except the service's session record and lock."""
        own = {self.processing / "session.json", self.processing / ".uploader.lock"}
        found = []
        for base, _, names in os.walk(self.nfs):
            for name in names:
                path = Path(base) / name
                if path not in own:
                    found.append(path)
        return sorted(found)

    def files_in_staging(self) -> list[Path]:
        return sorted(Path(b) / n for b, _, names in os.walk(self.staging) for n in names)


@dataclass
class ServiceProcess:
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _client: httpx.Client | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=10.0)
        return self._client

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> ServiceProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        log.write(f"----- start {self.starts} -----\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uploader"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=timeout, what="the service to be ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the service did not exit within {timeout} s of {sig}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self, timeout: float = 30.0) -> ServiceProcess:
        return self.start(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        answer = self.http.get("/v1/status")
        answer.raise_for_status()
        return dict(answer.json())

    def start_session(self, name: str | None = None) -> dict[str, Any]:
        answer = self.http.post("/v1/watch/start", json={} if name is None else {"session_name": name})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def stop_session(self) -> dict[str, Any]:
        answer = self.http.post("/v1/watch/stop")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            # A thread stuck in a hung FUSE request can hold the exit until the share is
            # released, which the faultfs fixture does at its own teardown.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self._client is not None:
            self._client.close()


def service_environment(
    folders: Folders, connection_string: str, container: str, port: int, **overrides: Any
) -> dict[str, str]:
    env = clean_environment()
    env.update(
        {
            "APP_AZURE_AUTH": "key",
            "APP_AZURE_CONNECTION_STRING": connection_string,
            "APP_AZURE_CONTAINER": container,
            "APP_NFS_INCOMING_DIR": str(folders.service_nfs / "incoming"),
            "APP_NFS_PROCESSING_ROOT": str(folders.service_nfs / ".processing"),
            "APP_LOCAL_STAGING_ROOT": str(folders.staging),
            "APP_HOST": "127.0.0.1",
            "APP_PORT": str(port),
            "APP_POLL_INTERVAL_S": "0.1",
            "APP_MIN_FILE_AGE_S": "0.3",
            "APP_GC_INTERVAL_S": "0.5",
            "APP_RETRY_BACKOFF_S": "0.2",
            "APP_RETRY_BACKOFF_MAX_S": "2",
            "APP_AZURE_RETRY_TOTAL": "1",
        }
    )
    for key, value in overrides.items():
        name = key if key.startswith(("APP_", "OTEL_", "AZURE_")) else f"APP_{key.upper()}"
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@contextmanager
def running_service(
    folders: Folders, connection_string: str, container: str, *, start: bool = True, **overrides: Any
) -> Iterator[ServiceProcess]:
    port = free_port()
    env = service_environment(folders, connection_string, container, port, **overrides)
    folders.root.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(env, port, folders.root / "service.log")
    try:
        if start:
            service.start()
        yield service
    finally:
        service.close()


def write_file(path: Path, size: int, *, seed: int = 0) -> bytes:
    """A file of ``size`` pseudo-random bytes (different for each seed), written in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random_bytes(size, seed)
    path.write_bytes(data)
    return data


def random_bytes(size: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])
