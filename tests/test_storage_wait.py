"""Start-up waiting for storage says so, on Trio's virtual clock."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from uploader import service
from uploader.config import Settings, load_settings
from uploader.progress import Progress


def settings_for(tmp_path: Path) -> Settings:
    return load_settings(
        azure_container="abc", azure_auth="key", azure_connection_string="UseDevelopmentStorage=true",
        nfs_incoming_dir=tmp_path / "in", nfs_processing_root=tmp_path / "proc",
        local_staging_root=tmp_path / "staging", azure_retry_total=3, azure_read_timeout_s=60,
    )


async def test_start_up_waiting_for_storage_logs_every_fifteen_seconds(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="uploader.service"), trio.move_on_after(46):
        await service.say_still_waiting_for_storage(settings_for(tmp_path), Progress())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"still waiting for Azure Blob Storage after {s} s (each request: up to 4 tries, 60 s read timeout each)"
        for s in (15, 30, 45)
    ]


async def test_start_up_waiting_for_storage_is_the_status_s_last_error_while_it_lasts(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    progress = Progress()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.say_still_waiting_for_storage, settings_for(tmp_path), progress)
        await trio.sleep(16)
        assert progress.last_error is not None
        assert progress.last_error.startswith("still waiting for Azure Blob Storage after 15 s")
        nursery.cancel_scope.cancel()  # storage answered
    assert progress.last_error is None
