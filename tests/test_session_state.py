"""Unit tests for the stored session state (encode_state, decode_state, read_state) and for
when SessionControl records it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from uploader.lanes import ThreadLane
from uploader.layout import Layout
from uploader.session import (
    SessionControl,
    SessionState,
    StateFile,
    decode_state,
    encode_state,
    read_state,
)

ACTIVE = SessionState(
    active=True,
    session_name="run-1",
    date_prefix="20240102",
    started_at="2024-01-02T03:04:05+00:00",
)
STOPPED = SessionState(
    active=False,
    session_name="run-1",
    date_prefix="20240102",
    started_at="2024-01-02T03:04:05+00:00",
    stopped_at="2024-01-02T05:00:00+00:00",
)


@pytest.mark.parametrize(
    "state", [ACTIVE, STOPPED, SessionState()], ids=["active", "stopped", "none"]
)
def test_encode_decode_round_trip(state: SessionState) -> None:
    assert decode_state(encode_state(state)) == state


def test_encode_state_is_a_json_object_with_every_field() -> None:
    data = json.loads(encode_state(ACTIVE))
    assert data == {
        "active": True,
        "session_name": "run-1",
        "date_prefix": "20240102",
        "started_at": "2024-01-02T03:04:05+00:00",
        "stopped_at": None,
    }


@pytest.mark.parametrize("state", [ACTIVE, STOPPED], ids=["active", "stopped"])
def test_read_state_round_trip(tmp_path: Path, state: SessionState) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(encode_state(state))
    assert read_state(path) == state


def test_read_state_missing_file_is_inactive(tmp_path: Path) -> None:
    assert read_state(tmp_path / "session.json") == SessionState()


def test_decode_state_without_name_and_date_is_inactive() -> None:
    assert decode_state(b'{"active": true}') == SessionState()


UNUSABLE = [
    pytest.param(b"", id="empty"),
    pytest.param(b'{"active": true, "session_na', id="truncated"),
    pytest.param(b"\x00\x00\x00\x00", id="zeros"),
    pytest.param(b"\xff\xfe garbage", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"run-1"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="number"),
    pytest.param(
        b'{"active": true, "session_name": "../x", "date_prefix": "20240102"}',
        id="name-dotdot-slash",
    ),
    pytest.param(
        b'{"active": true, "session_name": "..", "date_prefix": "20240102"}', id="name-dotdot"
    ),
    pytest.param(
        b'{"active": true, "session_name": "", "date_prefix": "20240102"}', id="name-empty"
    ),
    pytest.param(
        b'{"active": true, "session_name": 7, "date_prefix": "20240102"}', id="name-number"
    ),
    pytest.param(b'{"active": true, "date_prefix": "20240102"}', id="name-missing"),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "2024-01-02"}', id="date-dashes"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "20241302"}', id="date-month-13"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": "../../x"}', id="date-path"
    ),
    pytest.param(
        b'{"active": true, "session_name": "run-1", "date_prefix": 20240102}', id="date-number"
    ),
    pytest.param(b'{"active": true, "session_name": "run-1"}', id="date-missing"),
]


@pytest.mark.parametrize("raw", UNUSABLE)
def test_decode_state_refuses_unusable_content(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_state(raw)


@pytest.mark.parametrize("raw", UNUSABLE)
def test_read_state_unusable_content_is_inactive(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(raw)
    assert read_state(path) == SessionState()


def test_read_state_logs_unusable_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b'{"active": true, "session_name": "../x", "date_prefix": "20240102"}')
    with caplog.at_level(logging.ERROR, logger="uploader.session"):
        read_state(path)
    assert any(
        record.levelno == logging.ERROR and str(path) in record.getMessage()
        for record in caplog.records
    )


def test_read_state_leaves_unusable_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"not json")
    read_state(path)
    assert path.read_bytes() == b"not json"


def test_read_state_deeply_nested_json_is_inactive(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"[" * 100_000)
    assert read_state(path) == SessionState()


async def test_stop_has_recorded_the_stopped_state_when_it_answers(tmp_path: Path) -> None:
    """A crash right after a stop's answer must not resume the session."""
    layout = Layout(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")

    async def watch(date: str, session: str, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    control = SessionControl(layout, ThreadLane("nfs", 2), watch, nfs_timeout_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        await control.start("run-1")
        assert read_state(layout.state_file).active is True
        await control.stop()
        assert read_state(layout.state_file).active is False
        nursery.cancel_scope.cancel()


def test_a_state_write_that_ends_late_never_puts_an_older_state_back(tmp_path: Path) -> None:
    """A stop's write abandoned on a slow share, then a start's write: the start's state stays."""
    state_file = StateFile(tmp_path / "session.json")
    stopped, started = state_file.writer(STOPPED), state_file.writer(ACTIVE)
    started()
    stopped()  # the abandoned write ends last
    assert read_state(tmp_path / "session.json") == ACTIVE
