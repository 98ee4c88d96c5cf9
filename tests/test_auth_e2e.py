"""APP_AZURE_AUTH end to end: a real DefaultAzureCredential in the real process, a real Azurite.

Azurite serves HTTPS with a self-signed certificate (bearer tokens are refused over plain
http, by Azurite and by the SDK) and checks tokens with ``--oauth basic``: lifetime, issuer
and audience, not the signature. The service trusts the certificate through
``REQUESTS_CA_BUNDLE``. Its DefaultAzureCredential is narrowed to the Azure CLI credential
by ``AZURE_TOKEN_CREDENTIALS=AzureCliCredential`` (so nothing probes the instance metadata
address), and the ``az`` it runs is a fake that hands out JWTs (tests/support/fake_az.py).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import AzureCliCredential, ChainedTokenCredential, EnvironmentCredential
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite, run_azurite
from tests.support.fake_az import FakeAz, install_fake_az
from tests.support.service import Folders, ServiceProcess, running_service, write_file
from tests.support.tls import CertificateFiles, self_signed_certificate
from tests.test_upload_e2e import today, wait_for_blobs
from uploader import blobstore
from uploader.auth import Connection
from uploader.config import Settings
from uploader.errors import describe
from uploader.service import make_lanes

AADSTS_ERROR = (
    "ERROR: AADSTS700082: The refresh token has expired due to inactivity. The token was issued "
    "on 2026-01-01T00:00:00Z and was inactive for 90.00:00:00.\n"
    "Trace ID: 0f0e0d0c-0b0a-0908-0706-050403020100\n"
    "Run the command below to authenticate interactively; additional arguments may be added "
    "as needed:\naz logout\naz login --scope https://storage.azure.com/.default\n"
)
WRONG_AUDIENCE = "https://management.azure.com"
CONNECTION_STRING = "the connection string (APP_AZURE_CONNECTION_STRING)"
ACCOUNT_KEY_SETTINGS = "the account key (APP_AZURE_ACCOUNT_NAME/APP_AZURE_ACCOUNT_KEY)"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def oauth_azurite(tls: CertificateFiles) -> Iterator[Azurite]:
    """One Azurite for the module: HTTPS, basic OAuth (and the well-known account key)."""
    with run_azurite(cert=tls.cert, key=tls.key, oauth="basic") as server:
        assert server.scheme == "https"
        yield server


@pytest.fixture
def fake_az(tmp_path: Path) -> FakeAz:
    return install_fake_az(tmp_path / "fake-az")


@pytest.fixture
def key_container(
    oauth_azurite: Azurite, tls: CertificateFiles, container_name: str
) -> Iterator[ContainerClient]:
    """The test's container, seen through the account key (to check what the service did)."""
    client = BlobServiceClient.from_connection_string(
        oauth_azurite.connection_string(), connection_verify=str(tls.cert)
    )
    yield client.get_container_client(container_name)
    client.close()


Start = Callable[..., ServiceProcess]


@pytest.fixture
def start(
    oauth_azurite: Azurite,
    tls: CertificateFiles,
    fake_az: FakeAz,
    folders: Folders,
    container_name: str,
) -> Iterator[Start]:
    """Start the service with APP_AZURE_AUTH=``auth`` and the fake ``az`` first on its PATH.

    ``key``: "connection-string", "account-key" or None (no key settings at all).
    """
    with ExitStack() as stack:

        def start_service(
            auth: str, *, key: str | None, wait_ready: bool = True, **overrides: Any
        ) -> ServiceProcess:
            settings: dict[str, Any] = {
                "APP_AZURE_AUTH": auth,
                "APP_AZURE_ACCOUNT_URL": oauth_azurite.account_url,
                "APP_AZURE_CONNECTION_STRING": None,
                # The only credential DefaultAzureCredential may try: never the metadata address.
                "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
            }
            if key == "connection-string":
                settings["APP_AZURE_CONNECTION_STRING"] = oauth_azurite.connection_string()
            elif key == "account-key":
                settings["APP_AZURE_ACCOUNT_NAME"] = ACCOUNT_NAME
                settings["APP_AZURE_ACCOUNT_KEY"] = ACCOUNT_KEY
            else:
                assert key is None, key
            service = stack.enter_context(
                running_service(
                    folders, "unused", container_name, start=False, **{**settings, **overrides}
                )
            )
            service.env.update(
                {
                    "PATH": fake_az.path(),
                    "REQUESTS_CA_BUNDLE": str(tls.cert),
                    "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost",
                }
            )
            return service.start(wait_ready=wait_ready)

        yield start_service


def log_entries(service: ServiceProcess) -> list[dict[str, Any]]:
    """The service's JSON log lines (the plain lines, such as the exit message, are left out)."""
    entries = []
    for line in service.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def messages(service: ServiceProcess, level: str | None = None) -> list[str]:
    return [e["message"] for e in log_entries(service) if level is None or e["level"] == level]


def upload_one_file(service: ServiceProcess, folders: Folders, container: ContainerClient) -> None:
    service.start_session("auth")
    data = write_file(folders.session("auth") / "proof.bin", 3000, seed=7)
    name = f"{today()}/auth/proof.bin"
    assert wait_for_blobs(container, {name}, timeout=20) == {name: data}


def exits_with_one_clear_line(service: ServiceProcess, started: float) -> str:
    """Start-up fails: exit code 1 within seconds, one log line, no traceback."""
    assert service.proc is not None
    assert service.proc.wait(timeout=20) == 1, service.log()
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"took {elapsed:.1f} s to give up"
    log = service.log()
    assert "Traceback" not in log
    critical = messages(service, "critical")
    assert len(critical) == 1, log
    line = critical[0]
    assert "\n" not in line and "\t" not in line
    assert f"uploader: cannot start: {line.removeprefix('cannot start: ')}\n" in log
    # Nothing else complains: the chain's own multi-line warning is not repeated.
    assert messages(service, "warning") == [], log
    return line


# --- the token path ----------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["auto", "default"])
def test_a_token_from_default_azure_credential_is_used(
    auth: str, start: Start, fake_az: FakeAz, folders: Folders, key_container: ContainerClient
) -> None:
    service = start(auth, key=None)
    upload_one_file(service, folders, key_container)
    assert any(
        m.startswith("connected to https://127.0.0.1:")
        and m.endswith(" with DefaultAzureCredential (AzureCliCredential)")
        for m in messages(service, "info")
    ), service.log()
    calls = fake_az.invocations()
    assert calls, "the Azure CLI credential was never asked for a token"
    assert set(calls) == {"account get-access-token --output json --resource https://storage.azure.com"}
    assert service.stop(signal.SIGTERM) == 0
    assert "Traceback" not in service.log()
    assert messages(service, "warning") == []


# --- the fallback ------------------------------------------------------------------------


def test_auto_falls_back_to_the_connection_string_when_storage_refuses_the_token(
    start: Start, fake_az: FakeAz, folders: Folders, key_container: ContainerClient
) -> None:
    fake_az.answer_with_token(audience=WRONG_AUDIENCE)  # Azurite: "Invalid token audience."
    service = start("auto", key="connection-string")
    upload_one_file(service, folders, key_container)
    warnings = messages(service, "warning")
    assert len(warnings) == 1, service.log()
    assert warnings[0].startswith("storage refused DefaultAzureCredential (AzureCliCredential): ")
    assert "Azure answered 403 AuthenticationFailed" in warnings[0]
    assert "(Invalid token audience.)" in warnings[0]
    assert warnings[0].endswith(f"; trying {CONNECTION_STRING}")
    assert any(m.endswith(f" with {CONNECTION_STRING}") for m in messages(service, "info"))
    assert fake_az.invocations()


def test_auto_falls_back_to_the_account_key_when_the_cli_gives_no_token(
    start: Start, fake_az: FakeAz, folders: Folders, key_container: ContainerClient
) -> None:
    fake_az.fail(AADSTS_ERROR)
    service = start("auto", key="account-key")
    upload_one_file(service, folders, key_container)
    warnings = messages(service, "warning")
    assert len(warnings) == 1, service.log()
    assert warnings[0].startswith(
        "DefaultAzureCredential failed to retrieve a token from the included credentials "
        "(AzureCliCredential: ERROR: AADSTS700082: The refresh token has expired"
    )
    assert warnings[0].endswith(f"; trying {ACCOUNT_KEY_SETTINGS}")
    assert any(m.endswith(f" with {ACCOUNT_KEY_SETTINGS}") for m in messages(service, "info"))
    # Asked once: start-up does not let the SDK retry a credential that gets no token.
    assert len(fake_az.invocations()) == 1


# --- the fatal path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        pytest.param(
            "cli-error",
            "DefaultAzureCredential failed to retrieve a token from the included credentials "
            "(AzureCliCredential: ERROR: AADSTS700082: The refresh token has expired due to "
            "inactivity.",
            id="cli-error",
        ),
        pytest.param(
            "wrong-audience",
            "storage refused DefaultAzureCredential (AzureCliCredential): Azure answered 403 "
            "AuthenticationFailed: Server failed to authenticate the request.",
            id="wrong-audience",
        ),
    ],
)
def test_auto_without_a_key_exits_1_with_one_line_naming_the_credential_and_why(
    refusal: str, reason: str, start: Start, fake_az: FakeAz, key_container: ContainerClient
) -> None:
    if refusal == "cli-error":
        fake_az.fail(AADSTS_ERROR)
    else:
        fake_az.answer_with_token(audience=WRONG_AUDIENCE)
    started = time.monotonic()
    service = start("auto", key=None, wait_ready=False)
    line = exits_with_one_clear_line(service, started)
    assert line.startswith(f"cannot start: cannot authenticate to {key_container.url}: {reason}")
    assert line.endswith(
        "; no key to fall back on (APP_AZURE_CONNECTION_STRING, or APP_AZURE_ACCOUNT_NAME "
        "with APP_AZURE_ACCOUNT_KEY)"
    )
    if refusal == "cli-error":
        assert "Trace ID: 0f0e0d0c" in line and "az logout az login --scope" in line
        assert "To mitigate this issue" not in line
    else:
        assert "(Invalid token audience.)" in line
    assert not key_container.exists()


def test_default_never_falls_back_to_a_configured_key(
    start: Start, fake_az: FakeAz, key_container: ContainerClient
) -> None:
    fake_az.answer_with_token(audience=WRONG_AUDIENCE)
    started = time.monotonic()
    service = start("default", key="connection-string", wait_ready=False)
    line = exits_with_one_clear_line(service, started)
    assert line.startswith(
        f"cannot start: cannot authenticate to {key_container.url}: storage refused "
        "DefaultAzureCredential (AzureCliCredential): Azure answered 403 AuthenticationFailed"
    )
    assert line.endswith("; APP_AZURE_AUTH=default uses DefaultAzureCredential only, with no fallback")
    assert "connection string" not in line
    assert not key_container.exists()


# --- key ---------------------------------------------------------------------------------


def test_key_never_builds_a_token_credential(
    start: Start, fake_az: FakeAz, folders: Folders, key_container: ContainerClient
) -> None:
    service = start("key", key="connection-string")
    upload_one_file(service, folders, key_container)
    assert any(m.endswith(f" with {CONNECTION_STRING}") for m in messages(service, "info"))
    assert fake_az.invocations() == []
    assert "DefaultAzureCredential" not in service.log()
    assert service.stop() == 0
    # Stronger: DefaultAzureCredential() raises on this value as soon as it is built, before
    # it could try anything; with APP_AZURE_AUTH=key the service does not even notice.
    service.env["AZURE_TOKEN_CREDENTIALS"] = "NoSuchCredential"
    service.start()
    assert fake_az.invocations() == []
    assert service.stop() == 0
    assert "DefaultAzureCredential" not in service.log()


def test_auto_with_an_invalid_token_credentials_setting_says_so(
    start: Start, fake_az: FakeAz
) -> None:
    started = time.monotonic()
    service = start("auto", key="connection-string", wait_ready=False,
                    AZURE_TOKEN_CREDENTIALS="NoSuchCredential")
    line = exits_with_one_clear_line(service, started)
    assert line.startswith(
        "cannot start: cannot build DefaultAzureCredential: Invalid value for "
        "AZURE_TOKEN_CREDENTIALS: nosuchcredential."
    )
    assert fake_az.invocations() == []


# --- in process: what a fallback closes ---------------------------------------------------


async def test_the_fallback_closes_the_refused_credential_and_client(
    oauth_azurite: Azurite,
    tls: CertificateFiles,
    fake_az: FakeAz,
    container_name: str,
    key_container: ContainerClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake_az.answer_with_token(audience=WRONG_AUDIENCE)
    monkeypatch.setenv("PATH", fake_az.path())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.cert))
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
    settings = Settings(
        azure_auth="auto",
        azure_account_url=oauth_azurite.account_url,
        azure_connection_string=oauth_azurite.connection_string(),
        azure_container=container_name,
        azure_retry_total=0,
        nfs_incoming_dir=tmp_path / "in",
        nfs_processing_root=tmp_path / "processing",
        local_staging_root=tmp_path / "staging",
    )
    built: list[Connection] = []
    closed: list[str] = []
    real = blobstore.connections_to_try

    def spy(*args: Any) -> Iterator[Connection]:
        for connection in real(*args):
            built.append(connection)
            for part in ("client", "credential"):
                target = getattr(connection, part)
                if target is not None:
                    close = target.close
                    label = f"{connection.description} {part}"
                    target.close = lambda close=close, label=label: (closed.append(label), close())
            yield connection

    monkeypatch.setattr(blobstore, "connections_to_try", spy)
    store = await blobstore.open_blob_store(settings, make_lanes(settings))
    assert [c.description for c in built] == ["DefaultAzureCredential", CONNECTION_STRING]
    assert closed == ["DefaultAzureCredential client", "DefaultAzureCredential credential"]
    assert store.connection is built[1]
    assert key_container.exists()
    store.close()
    assert closed[2:] == [f"{CONNECTION_STRING} client"]


# --- the one-line description of a chain's failure ---------------------------------------


def test_a_failing_chain_is_described_in_one_line_with_each_credentials_reason(
    fake_az: FakeAz, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several credentials, reasons on several lines (nothing here leaves the process)."""
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_USERNAME",
                 "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_TOKEN_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", fake_az.path())
    fake_az.answer_with("Please wait...\nnot json\n")
    chain = ChainedTokenCredential(EnvironmentCredential(), AzureCliCredential())
    with pytest.raises(ClientAuthenticationError) as caught:
        chain.get_token("https://storage.azure.com/.default")
    assert len(str(caught.value).splitlines()) > 3  # what the SDK says
    text = describe(caught.value)
    assert "\n" not in text and "\t" not in text and "  " not in text
    assert text.startswith(
        "ChainedTokenCredential failed to retrieve a token from the included credentials "
        "(EnvironmentCredential: EnvironmentCredential authentication unavailable. "
        "Environment variables are not fully configured."
    )
    assert "; AzureCliCredential: Unexpected output from Azure CLI: 'Please wait... not json '." in text
    assert text.endswith(")")
    assert "To mitigate this issue" not in text


def test_auto_with_a_plain_http_account_url_falls_back_without_asking_for_a_token(
    start: Start, fake_az: FakeAz, azurite: Azurite, container: ContainerClient, folders: Folders
) -> None:
    """The SDK never sends a token over http: that is the token credential's failure."""
    service = start(
        "auto", key=None, APP_AZURE_ACCOUNT_URL=azurite.account_url,
        APP_AZURE_CONNECTION_STRING=azurite.connection_string(),
    )
    upload_one_file(service, folders, container)
    assert messages(service, "warning") == [
        "DefaultAzureCredential needs an https:// APP_AZURE_ACCOUNT_URL: a token is never sent "
        f"over plain http; trying {CONNECTION_STRING}"
    ]
    assert fake_az.invocations() == []
