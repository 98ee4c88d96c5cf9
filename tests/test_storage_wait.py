"""Start-up waiting for storage says so, on Trio's virtual clock."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from uploader import service
from uploader.config import load_settings


async def test_start_up_waiting_for_storage_logs_every_fifteen_seconds(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings = load_settings(
        azure_container="abc", azure_auth="key", azure_connection_string="UseDevelopmentStorage=true",
        nfs_incoming_dir=tmp_path / "in", nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "staging", azure_retry_total=3, azure_read_timeout_s=60,
    )
    with caplog.at_level(logging.WARNING, logger="uploader.service"), trio.move_on_after(46):
        await service.say_still_waiting_for_storage(settings)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"still waiting for Azure Blob Storage after {s} s (each request: up to 4 tries, 60 s read timeout each)"
        for s in (15, 30, 45)
    ]
