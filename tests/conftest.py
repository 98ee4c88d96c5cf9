from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.support.azurite import Azurite, run_azurite


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with run_azurite() as server:
        yield server


@pytest.fixture
def container_name() -> str:
    return f"t-{uuid.uuid4().hex[:20]}"


@pytest.fixture
def container(azurite: Azurite, container_name: str) -> Iterator[ContainerClient]:
    """A client for a container that each test owns (created by the service, not here)."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    client = service.get_container_client(container_name)
    yield client
    service.close()
