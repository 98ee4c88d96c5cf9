"""Azurite for the benchmarks: the test suite's ``run_azurite``, plus what only they need.

Each run gets a fresh process (``run_azurite`` from ``tests/support``), because Azurite's
in-memory store frees the bytes of deleted blobs only in a GC pass every 10 minutes: reusing
one process across 36 runs of up to 2 GiB each would pile them up.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from benchmarks.common import REPO_ROOT
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite, free_port, run_azurite

__all__ = ["Azurite", "azurite_version", "container_sas_url", "free_port", "run_azurite"]


def azurite_version() -> str:
    try:
        meta = json.loads((REPO_ROOT / "node_modules" / "azurite" / "package.json").read_text())
        return str(meta["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def container_sas_url(azurite: Azurite, container: str) -> str:
    """A URL with a container SAS: how rclone 1.60 reaches Azurite (its emulator setting fails)."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        ACCOUNT_NAME,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(
            read=True, add=True, create=True, write=True, delete=True, list=True
        ),
        expiry=datetime.now(UTC) + timedelta(hours=6),
    )
    return f"{azurite.account_url}/{container}?{sas}"
