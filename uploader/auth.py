"""Which credential the blob client uses (APP_AZURE_AUTH), and the client built with it.

- ``auto``: DefaultAzureCredential, then, when storage or the credential refuses it, the
  connection string or the account key (when one is configured).
- ``default``: DefaultAzureCredential only.
- ``key``: the connection string or the account key only; no token credential is ever built.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.identity import DefaultAzureCredential
from azure.storage.blob import BlobServiceClient, ExponentialRetry
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from uploader.config import Settings, redact
from uploader.errors import StartupError, describe
from uploader.http_session import EnvironmentOnceSession


class _PooledTransport(RequestsTransport):  # type: ignore[misc]
    """The SDK's requests transport with a connection pool as large as our Azure lane, on an
    ``EnvironmentOnceSession``.

    requests keeps 10 connections per host by default; with more threads than that,
    every extra connection would be opened and thrown away again.
    """

    session: requests.Session | None

    def __init__(self, pool_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_size = pool_size

    def open(self) -> None:
        if self.session is None and self._session_owner:
            self.session = EnvironmentOnceSession()
            self._init_session(self.session)
        super().open()

    def _init_session(self, session: Any) -> None:
        super()._init_session(session)
        session.trust_env = False  # EnvironmentOnceSession reads the environment itself
        adapter = HTTPAdapter(
            pool_connections=4,
            pool_maxsize=self._pool_size,
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        for prefix in ("http://", "https://"):
            session.mount(prefix, adapter)


# What the blob client asks a token credential for (its default audience).
STORAGE_SCOPE = "https://storage.azure.com/.default"
DEFAULT_CREDENTIAL = "DefaultAzureCredential"


@dataclass
class Connection:
    """A blob service client and what it needs closed with it."""

    client: BlobServiceClient
    description: str  # which credential, for logs: never the secret itself
    credential: Any = None

    def check_credential(self) -> None:
        """Get a token once, right now (nothing to do for key credentials); blocking.

        The storage SDK's retry policy runs before its credential policy, so a credential
        that cannot get a token would be retried like a network error, APP_AZURE_RETRY_TOTAL
        times with backoff, before start-up could report it: start-up asks once, directly.
        """
        if self.credential is not None:
            self.credential.get_token(STORAGE_SCOPE)

    def in_use(self) -> str:
        """The description, naming the credential of a chain that got the token."""
        chosen = getattr(self.credential, "_successful_credential", None)  # set by the chain
        return f"{self.description} ({type(chosen).__name__})" if chosen is not None else self.description

    def close(self) -> None:
        self.client.close()
        close = getattr(self.credential, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class Unusable:
    """A connection that cannot be used here at all, and why: start-up moves on to the next."""

    description: str
    reason: str


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
        try:
            client = BlobServiceClient.from_connection_string(
                settings.azure_connection_string.get_secret_value(), **options
            )
        except ValueError as exc:  # config.check_connection_string should have caught it
            raise StartupError(
                f"APP_AZURE_CONNECTION_STRING cannot be used: {redact(describe(exc))}"
            ) from None
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


def connect_with_default_credential(settings: Settings, pool_size: int) -> Connection:
    # On failure the chain logs a warning of its own, on several lines: start-up and the
    # workers report the same failure themselves, in one line (errors.describe).
    logging.getLogger("azure.identity._credentials.chained").setLevel(logging.ERROR)
    try:
        credential = DefaultAzureCredential()
    except ValueError as exc:  # AZURE_TOKEN_CREDENTIALS names no credential, for one
        raise StartupError(f"cannot build {DEFAULT_CREDENTIAL}: {exc}") from None
    assert settings.token_account_url  # required for auto and default (config.py)
    try:
        client = BlobServiceClient(
            settings.token_account_url,
            credential=credential,
            **client_options(settings, pool_size),
        )
    except BaseException:
        credential.close()
        raise
    return Connection(client, DEFAULT_CREDENTIAL, credential)


def connections_to_try(settings: Settings, pool_size: int) -> Iterator[Connection | Unusable]:
    """The clients to try at start-up, in order (the first that works is kept).

    Lazy: each is built only when the one before it failed, and ``key`` never builds a
    token credential.
    """
    if settings.azure_auth in ("auto", "default"):
        url = settings.token_account_url
        assert url  # required for auto and default (config.py)
        if url.lower().startswith("https://"):
            yield connect_with_default_credential(settings, pool_size)
        else:
            # The SDK refuses a token credential with a plain http URL ("Token credential is
            # only supported with HTTPS."), as Azure and Azurite refuse bearer tokens over http.
            yield Unusable(
                DEFAULT_CREDENTIAL,
                f"{DEFAULT_CREDENTIAL} needs an https:// APP_AZURE_ACCOUNT_URL: "
                "a token is never sent over plain http",
            )
    if settings.azure_auth == "key" or (
        settings.azure_auth == "auto" and settings.has_key_credentials
    ):
        yield connect_with_key(settings, pool_size)


def no_fallback_note(settings: Settings) -> str | None:
    """Why nothing was tried after DefaultAzureCredential, for the start-up error."""
    if settings.azure_auth == "default":
        return f"APP_AZURE_AUTH=default uses {DEFAULT_CREDENTIAL} only, with no fallback"
    if settings.azure_auth == "auto" and not settings.has_key_credentials:
        return (
            "no key to fall back on (APP_AZURE_CONNECTION_STRING, or APP_AZURE_ACCOUNT_NAME "
            "with APP_AZURE_ACCOUNT_KEY)"
        )
    return None
