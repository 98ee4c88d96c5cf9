"""A fake Azure CLI (``az``) for AzureCliCredential, and the JWTs it hands out.

AzureCliCredential runs ``az account get-access-token --output json --resource <resource>``
and parses ``accessToken`` and ``expires_on`` (epoch seconds; ``expiresOn``, a naive local
time, when ``expires_on`` is missing). The script below answers as the real CLI does, or
fails as it does, and appends each invocation's arguments to ``calls``. What it does is read
from files at each invocation, so a test can change it between two starts of the service.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

STORAGE_AUDIENCE = "https://storage.azure.com"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"  # any GUID will do for Azurite


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking JWT: Azurite's basic OAuth decodes it but never checks the signature."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-key"}
    return ".".join(
        [
            _b64url(json.dumps(header, separators=(",", ":")).encode()),
            _b64url(json.dumps(claims, separators=(",", ":")).encode()),
            _b64url(b"not-a-real-signature"),
        ]
    )


def storage_token(
    *, audience: str = STORAGE_AUDIENCE, tenant: str = TENANT_ID, lifetime_s: int = 3600
) -> tuple[str, int]:
    """A token for Azure Storage as Entra ID issues it, and its expiry (epoch seconds)."""
    now = int(time.time())
    expires_on = now + lifetime_s
    claims = {
        "aud": audience,
        "iss": f"https://sts.windows.net/{tenant}/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": expires_on,
        "oid": str(uuid.uuid4()),
        "tid": tenant,
        "sub": "fake-subject",
        "scp": "user_impersonation",
        "ver": "1.0",
    }
    return jwt(claims), expires_on


@dataclass(frozen=True)
class FakeAz:
    folder: Path

    @property
    def executable(self) -> Path:
        return self.folder / "az"

    @property
    def calls(self) -> Path:
        return self.folder / "calls.log"

    @property
    def _answer(self) -> Path:
        return self.folder / "answer.json"

    @property
    def _error(self) -> Path:
        return self.folder / "error.txt"

    def path(self, base: str | None = None) -> str:
        """A PATH with this fake ``az`` first."""
        base = os.environ.get("PATH", "/usr/bin:/bin") if base is None else base
        return f"{self.folder}{os.pathsep}{base}"

    def answer_with_token(self, *, audience: str = STORAGE_AUDIENCE, lifetime_s: int = 3600) -> str:
        """From now on, print a token for ``audience`` (what it prints is returned)."""
        token, expires_on = storage_token(audience=audience, lifetime_s=lifetime_s)
        answer = {
            "accessToken": token,
            "expiresOn": datetime.fromtimestamp(expires_on).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "expires_on": expires_on,
            "subscription": "00000000-0000-0000-0000-000000000000",
            "tenant": TENANT_ID,
            "tokenType": "Bearer",
        }
        self.answer_with(json.dumps(answer, indent=2) + "\n")
        return token

    def answer_with(self, stdout: str) -> None:
        """From now on, print ``stdout`` and exit 0."""
        self._error.unlink(missing_ok=True)
        self._answer.write_text(stdout)

    def fail(self, stderr: str, *, exit_code: int = 1) -> None:
        """From now on, print ``stderr`` and exit with ``exit_code``, as the CLI does on errors."""
        self._answer.unlink(missing_ok=True)
        self._error.write_text(f"{exit_code}\n{stderr}")

    def invocations(self) -> list[str]:
        """The arguments of every invocation so far, one string each."""
        if not self.calls.exists():
            return []
        return self.calls.read_text().splitlines()


def install_fake_az(folder: Path) -> FakeAz:
    """Write the fake ``az`` into ``folder`` (answering with a good storage token at first)."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = FakeAz(folder)
    calls, answer, error = (shlex.quote(str(p)) for p in (fake.calls, fake._answer, fake._error))
    fake.executable.write_text(
        f"""#!/bin/sh
# A fake Azure CLI written by tests/support/fake_az.py.
printf '%s\\n' "$*" >> {calls}
if [ -f {error} ]; then
    code=$(head -n 1 {error})
    tail -n +2 {error} >&2
    exit "$code"
fi
cat {answer}
"""
    )
    fake.executable.chmod(0o755)
    fake.answer_with_token()
    return fake
