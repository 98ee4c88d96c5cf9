"""Which credential the blob client uses (APP_AZURE_AUTH), and the client built with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient, ExponentialRetry
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from uploader.config import Settings
from uploader.errors import StartupError


class _PooledTransport(RequestsTransport):  # type: ignore[misc]
    """The SDK's requests transport with a connection pool as large as our Azure lane.

    requests keeps 10 connections per host by default; with more threads than that,
    every extra connection would be opened and thrown away again.
    """

    def __init__(self, pool_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_size = pool_size

    def _init_session(self, session: Any) -> None:
        super()._init_session(session)
        adapter = HTTPAdapter(
            pool_connections=4,
            pool_maxsize=self._pool_size,
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        for prefix in ("http://", "https://"):
            session.mount(prefix, adapter)


@dataclass
class Connection:
    """A blob service client and what it needs closed with it."""

    client: BlobServiceClient
    description: str  # which credential, for logs: never the secret itself
    credential: Any = None

    def close(self) -> None:
        self.client.close()
        close = getattr(self.credential, "close", None)
        if close is not None:
            close()


def client_options(settings: Settings, pool_size: int) -> dict[str, Any]:
    return {
        "max_block_size": settings.azure_max_block_size,
        "max_single_put_size": max(settings.azure_max_single_put_size, 1),
        "retry_policy": ExponentialRetry(
            initial_backoff=1,
            increment_base=2,
            retry_total=settings.azure_retry_total,
            random_jitter_range=1,
        ),
        "transport": _PooledTransport(
            pool_size,
            connection_timeout=settings.azure_connect_timeout_s,
            read_timeout=settings.azure_read_timeout_s,
            connection_data_block_size=256 * 1024,
        ),
    }


def connect_with_key(settings: Settings, pool_size: int) -> Connection:
    options = client_options(settings, pool_size)
    if settings.azure_connection_string is not None:
        client = BlobServiceClient.from_connection_string(
            settings.azure_connection_string.get_secret_value(), **options
        )
        return Connection(client, "the connection string (APP_AZURE_CONNECTION_STRING)")
    assert settings.azure_account_url and settings.azure_account_name and settings.azure_account_key
    client = BlobServiceClient(
        settings.azure_account_url,
        credential={
            "account_name": settings.azure_account_name,
            "account_key": settings.azure_account_key.get_secret_value(),
        },
        **options,
    )
    return Connection(client, "the account key (APP_AZURE_ACCOUNT_NAME/APP_AZURE_ACCOUNT_KEY)")


def connections_to_try(settings: Settings, pool_size: int) -> list[Connection]:
    """The clients to try at start-up, in order (the first that works is kept)."""
    if settings.azure_auth == "key":
        return [connect_with_key(settings, pool_size)]
    raise StartupError(
        f"APP_AZURE_AUTH={settings.azure_auth} is not available yet; set APP_AZURE_AUTH=key "
        "with a connection string or an account key"
    )
