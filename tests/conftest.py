from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.faults.faultfs import FaultFS
from tests.faults.proxy import FaultProxy
from tests.support.azurite import Azurite, run_azurite
from tests.support.service import Folders, ServiceProcess, running_service

ServiceFactory = Callable[..., ServiceProcess]
# The FUSE fixture (`faultfs`), for every module.
pytest_plugins = ["tests.faults.fixtures"]


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with run_azurite() as server:
        yield server


@pytest.fixture
def container_name() -> str:
    return f"t-{uuid.uuid4().hex[:20]}"


@pytest.fixture
def container(azurite: Azurite, container_name: str) -> Iterator[ContainerClient]:
    """A client for the container this test owns (the service creates it, not this fixture)."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    yield service.get_container_client(container_name)
    service.close()


@pytest.fixture
def folders(tmp_path: Any) -> Folders:
    return Folders(tmp_path / "svc")


@pytest.fixture
def fuse_folders(faultfs: FaultFS, tmp_path: Any) -> Folders:
    """Folders whose NFS share is a faultfs mount (the service sees the mount)."""
    return Folders(tmp_path / "svc", mounted_nfs=faultfs.mountpoint, backing_nfs=faultfs.source)


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    """A fault proxy in front of Azurite; ``azurite.connection_string(port=proxy.port)`` uses it."""
    with FaultProxy.start(azurite.host, azurite.port) as fault_proxy:
        yield fault_proxy
        assert fault_proxy.stats().internal_errors == 0


@pytest.fixture
def service_factory(
    azurite: Azurite, folders: Folders, container_name: str
) -> Iterator[ServiceFactory]:
    """Start the real service on this test's folders and container; kill it at teardown."""
    with ExitStack() as stack:

        def start(
            *,
            start: bool = True,
            connection_string: str | None = None,
            folders: Folders = folders,
            **overrides: Any,
        ) -> ServiceProcess:
            return stack.enter_context(
                running_service(
                    folders,
                    connection_string or azurite.connection_string(),
                    container_name,
                    start=start,
                    **overrides,
                )
            )

        yield start

