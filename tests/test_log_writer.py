"""BackgroundLineWriter: log lines leave the logging thread at once, whatever stderr does."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from uploader import log_writer, telemetry
from uploader.log_writer import BackgroundLineWriter
from uploader.telemetry import JsonFormatter, OncePerInterval


class StuckStream(io.StringIO):
    """A stderr whose reader went away: every write waits until ``unstick``."""

    def __init__(self) -> None:
        super().__init__()
        self.unstuck = threading.Event()
        self.writing = threading.Event()  # a write has begun (and waits)

    def write(self, text: str) -> int:
        self.writing.set()
        self.unstuck.wait()
        return super().write(text)


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("uploader.test", logging.INFO, __file__, 1, message, args, None)


@pytest.fixture
def stuck() -> Iterator[StuckStream]:
    stream = StuckStream()
    yield stream
    stream.unstuck.set()


def writer_on(stream: io.StringIO, capacity: int = 100) -> BackgroundLineWriter:
    writer = BackgroundLineWriter(stream, capacity=capacity)
    writer.setFormatter(JsonFormatter())
    return writer


def test_lines_are_written_in_order_one_json_object_each() -> None:
    stream = io.StringIO()
    writer = writer_on(stream)
    for i in range(50):
        writer.handle(record("line %d", i))
    writer.flush()
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        f"line {i}" for i in range(50)
    ]


def test_a_stuck_stream_drops_and_counts_what_does_not_fit_and_says_so_where(
    stuck: StuckStream,
) -> None:
    writer = writer_on(stuck, capacity=10)
    writer.handle(record("line %d", 0))
    assert stuck.writing.wait(5)  # the writer holds line 0, stuck on the stream
    started = time.monotonic()
    for i in range(1, 100):
        writer.handle(record("line %d", i))
    assert time.monotonic() - started < 1  # logging never waited for the stream
    dropped = writer.dropped()
    assert dropped == 89  # ten lines fit in the queue

    stuck.unstuck.set()
    writer.flush()
    writer.handle(record("after"))
    writer.flush()
    messages = [json.loads(line)["message"] for line in stuck.getvalue().splitlines()]
    kept = [m for m in messages if m.startswith("line ")]
    assert kept == [f"line {i}" for i in range(len(kept))]
    assert len(kept) + dropped == 100
    assert messages[len(kept):] == [
        f"{dropped} log lines were dropped: stderr was not taking them", "after",
    ]
    assert writer.dropped() == 0


def test_flush_and_close_give_up_on_a_stuck_stream(
    stuck: StuckStream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log_writer, "FLUSH_BUDGET_S", 0.2)
    writer = writer_on(stuck, capacity=2)
    for i in range(5):
        writer.handle(record("line %d", i))
    started = time.monotonic()
    writer.flush()  # gives up after the budget
    writer.flush()  # the stream has taken nothing since: no second wait
    writer.close()
    assert time.monotonic() - started < 0.6


def test_a_broken_stream_is_not_an_error_of_the_caller() -> None:
    stream = io.StringIO()
    stream.close()
    writer = writer_on(stream)
    writer.handle(record("nowhere to go"))
    writer.flush()
    writer.close()


def test_the_sdk_s_repeated_complaints_are_let_through_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: now[0])
    only = OncePerInterval(interval_s=60)

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, ("x",), None)

    exporter = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    failed = "Failed to export span batch code: %s"
    assert only.filter(record(exporter, failed))
    assert not any(only.filter(record(exporter, failed)) for _ in range(50))
    assert only.filter(record(exporter, "another message"))  # counted apart
    assert only.filter(record("uploader.worker", failed))  # the service's own lines all pass
    now[0] += 61
    again = record(exporter, failed)
    assert only.filter(again)
    assert again.held_back == 50  # type: ignore[attr-defined]


def test_complaints_about_different_things_are_held_back_apart() -> None:
    only = OncePerInterval(interval_s=60)
    processor = "opentelemetry.sdk._shared_internal"

    def dropping(what: str) -> logging.LogRecord:
        return logging.LogRecord(processor, logging.WARNING, __file__, 1, "Queue full, dropping %s.", (what,), None)

    assert only.filter(dropping("Span")) and only.filter(dropping("LogRecord"))
    assert not only.filter(dropping("Span"))
    long_error = "HTTPConnectionPool(host='collector', port=4318): Max retries exceeded"
    failing = logging.LogRecord(processor, logging.WARNING, __file__, 1, "Failed: %s", (long_error,), None)
    assert only.filter(failing)
    failing.args = (long_error + " (again)",)
    assert not only.filter(failing)  # the same complaint, however its text varies


@pytest.mark.parametrize("sampled", [True, False])
def test_a_line_carries_the_trace_ids_only_of_a_span_that_is_recorded(sampled: bool) -> None:
    """An unsampled span (OTEL_TRACES_SAMPLER=always_off, a ratio) is exported nowhere:
    its ids would lead nowhere."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    context = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "t"})
    with trace.use_span(NonRecordingSpan(context)):
        entry = json.loads(JsonFormatter().format(record))
    assert ("trace_id" in entry) is sampled and ("span_id" in entry) is sampled
    if sampled:
        assert entry["trace_id"] == format(0xABC, "032x")
