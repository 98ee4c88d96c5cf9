"""The blob client's HTTP session reads the proxy and certificate variables once.

No request is sent here: the tests look at what the session would use for one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from uploader.auth import _PooledTransport
from uploader.http_session import EnvironmentOnceSession

ACCOUNT = "https://account.blob.example.invalid/container/blob"


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def settings_for(session: requests.Session, url: str = ACCOUNT) -> dict[str, object]:
    # What azure-core's transport passes: no proxies of its own, verify=True.
    return session.merge_environment_settings(url, None, None, True, None)


def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.invalid:3128")
    assert settings_for(EnvironmentOnceSession())["proxies"] == {
        "https": "http://proxy.example.invalid:3128"
    }


def test_no_proxy_naming_the_host_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.invalid:3128")
    monkeypatch.setenv("NO_PROXY", ".example.invalid")
    assert settings_for(EnvironmentOnceSession())["proxies"] == {}


def test_the_environment_is_read_once_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    session = EnvironmentOnceSession()
    monkeypatch.setenv("HTTPS_PROXY", "http://first.example.invalid:3128")
    settings_for(session)
    monkeypatch.setenv("HTTPS_PROXY", "http://second.example.invalid:3128")
    assert settings_for(session)["proxies"] == {"https": "http://first.example.invalid:3128"}
    other_host = "https://other.example.invalid/container/blob"
    assert settings_for(session, other_host)["proxies"] == {
        "https": "http://second.example.invalid:3128"
    }


def test_a_ca_bundle_from_the_environment_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    session = EnvironmentOnceSession()
    assert settings_for(session)["verify"] == "/etc/ssl/private-ca.pem"
    unverified = session.merge_environment_settings(ACCOUNT, None, None, False, None)
    assert unverified["verify"] is False


def test_netrc_never_replaces_the_storage_credential(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine account.blob.example.invalid login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    request = requests.Request("PUT", ACCOUNT, headers={"Authorization": "SharedKey a:b"})
    prepared = EnvironmentOnceSession().prepare_request(request)
    assert prepared.headers["Authorization"] == "SharedKey a:b"


def test_the_transport_uses_such_a_session_after_every_open() -> None:
    transport = _PooledTransport(4)
    for _ in range(2):
        transport.open()
        assert isinstance(transport.session, EnvironmentOnceSession)
        assert transport.session.trust_env is False
        assert transport.session.get_adapter("https://x.example.invalid")._pool_maxsize == 4
        transport.close()
