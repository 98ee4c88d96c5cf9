"""Logs (one JSON object per line), traces and metrics."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics, trace

_STANDARD_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
NOISY_LOGGERS = ("azure", "urllib3", "hypercorn.access", "hypercorn.error", "quart.serving")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when there is a span."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        for name, value in vars(record).items():
            if name not in _STANDARD_RECORD_FIELDS and not name.startswith("otel"):
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Metrics:
    files_processed: metrics.Counter
    files_failed: metrics.Counter
    files_quarantined: metrics.Counter
    upload_duration: metrics.Histogram
    file_size: metrics.Histogram
    bytes_sent: metrics.Counter
    in_flight: metrics.UpDownCounter

    @classmethod
    def create(cls, meter: metrics.Meter | None = None) -> Metrics:
        meter = meter or metrics.get_meter("uploader")
        return cls(
            files_processed=meter.create_counter(
                "files.processed", unit="{file}", description="Files uploaded, verified and completed"
            ),
            files_failed=meter.create_counter(
                "files.failed", unit="{file}", description="Failed attempts (each retried or quarantined)"
            ),
            files_quarantined=meter.create_counter(
                "files.quarantined", unit="{file}", description="Files moved to the failed folder"
            ),
            upload_duration=meter.create_histogram(
                "upload.duration", unit="s", description="Time to upload and verify one file"
            ),
            file_size=meter.create_histogram(
                "file.size", unit="By", description="Size of each completed file"
            ),
            bytes_sent=meter.create_counter(
                "bytes.uploaded", unit="By", description="Bytes sent to blob storage"
            ),
            in_flight=meter.create_up_down_counter(
                "files.in_flight", unit="{file}", description="Files inside a worker"
            ),
        )
