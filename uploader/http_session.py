"""The HTTP session of the service's outgoing requests: to storage, and to the collector."""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.utils import get_environ_proxies

# An OTLP answer is a few bytes (a partial-success message at most): more is not kept.
MAX_COLLECTOR_ANSWER_BYTES = 64 * 1024
COLLECTOR_READ_BYTES = 16 * 1024


class EnvironmentOnceSession(requests.Session):
    """A requests session that reads the proxy and CA-bundle variables once per host.

    With ``trust_env``, requests reads them again for every request: two scans of the whole
    environment (about 0.2 ms of CPU, holding the GIL, with 35 variables; a pod has more),
    and a look for ``~/.netrc``, whose Basic auth would replace the credential the
    request carries (the storage key or token, a collector's token).
    Here they are read like every other setting, once, and keep their meaning:
    ``HTTPS_PROXY``/``HTTP_PROXY`` unless ``NO_PROXY`` names the host, and
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` for certificates.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self._environment: dict[tuple[str, str], tuple[dict[str, str], str | None]] = {}

    def _environment_for(self, url: str) -> tuple[dict[str, str], str | None]:
        origin = urlsplit(url)[:2]
        found = self._environment.get(origin)
        if found is None:
            ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            found = self._environment[origin] = (dict(get_environ_proxies(url)), ca_bundle)
        return found

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        if proxies and "no_proxy" in proxies:  # a per-request exception: as requests does it
            environ_proxies: dict[str, str] = get_environ_proxies(url, proxies["no_proxy"])
            ca_bundle = self._environment_for(url)[1]
        else:
            environ_proxies, ca_bundle = self._environment_for(url)
        proxies = {**environ_proxies, **(proxies or {})}
        if ca_bundle and (verify is True or verify is None):
            verify = ca_bundle
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


class CollectorSession(EnvironmentOnceSession):
    """The session of the OTLP exporters: an answer must come whole within the request's
    timeout, and only its first MAX_COLLECTOR_ANSWER_BYTES are kept.

    requests reads a whole answer into memory, and its timeout bounds each read, not the
    answer: a collector that trickles its answer held the exporter's thread (and so all
    export of that signal) for good, one that answered a gigabyte cost a gigabyte.
    """

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        timeout = kwargs.get("timeout")
        deadline = time.monotonic() + (timeout if isinstance(timeout, int | float) else 10.0)
        kwargs["stream"] = True
        kwargs["allow_redirects"] = False  # (requests would read a redirect's body whole)
        response = super().request(method, url, *args, **kwargs)
        body, whole = bytearray(), False
        try:
            while len(body) < MAX_COLLECTOR_ANSWER_BYTES:
                if time.monotonic() > deadline:
                    raise requests.exceptions.ReadTimeout(
                        f"the collector's answer did not come whole within {timeout} s", response=response
                    )
                try:
                    chunk = response.raw.read1(COLLECTOR_READ_BYTES, decode_content=True)  # what has come
                except urllib3.exceptions.ReadTimeoutError as exc:
                    raise requests.exceptions.ReadTimeout(exc, response=response) from None
                except urllib3.exceptions.HTTPError as exc:  # cut off, or not in its encoding
                    raise requests.exceptions.ConnectionError(exc, response=response) from None
                if not chunk:
                    whole = True
                    break
                body += chunk
        finally:
            response._content_consumed = whole  # then the connection serves the next export
            response.close()
        # What response.content and .text give, as if requests had read it all.
        response._content = bytes(body[:MAX_COLLECTOR_ANSWER_BYTES])
        response._content_consumed = True
        return response
