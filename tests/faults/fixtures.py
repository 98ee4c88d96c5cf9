"""Pytest fixtures for tests that run on a faultfs mount.

Use from a test module with:

    from tests.faults.fixtures import faultfs  # noqa: F401

The backing folder (`faultfs.source`) plays the NFS server's disk: a test may
arrange files there directly, and the code under test sees them through
`faultfs.mountpoint`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.faultfs import FaultFS, fuse_available


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
    """A live faultfs mount of tmp_path/"backing" at tmp_path/"mnt", unmounted at teardown."""
    reason = fuse_available()
    if reason is not None:
        pytest.skip(reason)
    source = tmp_path / "backing"
    mountpoint = tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    fs = FaultFS.mount(source, mountpoint)
    try:
        yield fs
    finally:
        fs.unmount()
