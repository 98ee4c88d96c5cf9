"""A real Azurite blob service on loopback, started once per test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContainerClient

REPO_ROOT = Path(__file__).resolve().parents[2]

# Azurite's well-known development account: public, documented, loopback only.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def unreachable_connection_string() -> str:
    """Azurite's account on a loopback port nothing listens on: storage that cannot be reached."""
    endpoint = f"http://127.0.0.1:{free_port()}/{ACCOUNT_NAME}"
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint={endpoint};"
    )


def azurite_binary() -> str:
    local = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found is None:
        raise RuntimeError("azurite-blob is not installed: run `npm ci` at the repository root")
    return found


@dataclass(frozen=True)
class Azurite:
    host: str
    port: int
    scheme: str
    pid: int  # the azurite-blob process, for the benchmarks that measure its CPU time

    @property
    def account_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{ACCOUNT_NAME}"

    def connection_string(self, port: int | None = None) -> str:
        """A connection string for this Azurite, optionally through another port (a proxy)."""
        endpoint = f"{self.scheme}://{self.host}:{port or self.port}/{ACCOUNT_NAME}"
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={endpoint};"
        )


@contextmanager
def run_azurite(
    *extra_args: str,
    scheme: str = "http",
    cert: Path | None = None,
    key: Path | None = None,
    oauth: str | None = None,
) -> Iterator[Azurite]:
    """Start azurite-blob in memory on a free loopback port; stop it on exit.

    With ``cert`` and ``key`` (PEM files) it serves HTTPS; ``oauth="basic"`` makes it accept
    bearer tokens (over HTTPS only), checking their lifetime, issuer and audience but not
    their signature.
    """
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together")
    if cert is not None and key is not None:
        extra_args = (*extra_args, "--cert", str(cert), "--key", str(key))
        scheme = "https"
    if oauth is not None:
        extra_args = (*extra_args, "--oauth", oauth)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
    log = open(workdir / "azurite.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            azurite_binary(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            # Azurite otherwise reports usage to Application Insights: never off loopback.
            "--disableTelemetry",
            "--silent",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env={**os.environ, "AZURITE_ACCEPT_EULA": "true"},
    )
    try:
        wait_for_port(port)
        yield Azurite("127.0.0.1", port, scheme, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def blob_contents(container: ContainerClient) -> dict[str, bytes]:
    """Every blob of the container, by name (empty when the container does not exist).

    A blob overwritten while it is read (a re-upload after a restart) is left out of this
    round, as one that is not there yet: callers poll.
    """
    if not container.exists():
        return {}
    contents = {}
    for blob in container.list_blobs():
        try:
            contents[blob.name] = container.download_blob(blob.name).readall()
        except (ResourceModifiedError, ResourceNotFoundError):
            continue
    return contents
