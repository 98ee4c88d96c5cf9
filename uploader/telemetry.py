"""Logs, traces and metrics: configured only through the standard ``OTEL_*`` variables.

- Logs: one JSON object per line on stderr (written by a thread of their own), with ``trace_id`` and ``span_id`` inside a span
  (when traces are exported); exported over OTLP through the logging bridge when an
  endpoint is set.
- Traces: a server span per API request (not the probes) and a span per file with child
  spans for each step; exported over OTLP/HTTP when an endpoint is set.
- Metrics: exported over OTLP/HTTP when an endpoint is set, and always scrapeable at
  ``GET /metrics`` in Prometheus text format.

With no endpoint set, nothing is exported and nothing complains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from opentelemetry import _logs, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from uploader.config import redact
from uploader.errors import Disposition
from uploader.http_session import CollectorSession
from uploader.log_writer import BackgroundLineWriter, own_stderr
from uploader.otel_settings import SIGNALS

P = ParamSpec("P")
T = TypeVar("T")


def untraced(task: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A task that outlives the request that starts it (a watcher, a drain, a write in the
    background), run outside any trace: trio hands a new task a copy of its starter's
    context, so its spans and log lines would belong to a request long answered."""

    @wraps(task)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        token = otel_context.attach(otel_context.Context())
        try:
            return await task(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run


_STANDARD_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
NOISY_LOGGERS = ("azure", "urllib3", "hypercorn.access", "quart.serving")
SHUTDOWN_BUDGET_S = 3.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when there is a span."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid and context.trace_flags.sampled:  # (else no span has that id)
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        for name, value in vars(record).items():
            if name not in _STANDARD_RECORD_FIELDS and not name.startswith("otel"):
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class OncePerInterval(logging.Filter):
    """At most one line per logger and message per ``interval_s`` from the loggers under
    ``prefix``. The OpenTelemetry SDK logs every failed export: a collector that is down or
    refuses makes several lines a second, for as long as it lasts. The next line let through
    says how many like it were held back (``held_back``)."""

    def __init__(self, prefix: str = "opentelemetry", interval_s: float = 60.0) -> None:
        super().__init__()
        self.prefix, self.interval_s = prefix, interval_s
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        # Short words filled in name what a message is about ("Queue full, dropping %s":
        # Span or LogRecord); longer ones (an error's text) and numbers only vary it.
        args = record.args if isinstance(record.args, tuple) else ()
        what = tuple(arg for arg in args if isinstance(arg, str) and len(arg) <= 20)
        key, now = (record.name, str(record.msg), *what), time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-math.inf, 0))
            if now - last < self.interval_s:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) > 1000:  # messages are templates: a handful in practice
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            record.held_back = held
        return True


def setup_logging(level: int = logging.INFO) -> None:
    handler = BackgroundLineWriter(own_stderr())
    handler.setFormatter(JsonFormatter())
    handler.addFilter(OncePerInterval())
    logging.captureWarnings(True)  # as JSON lines too, and never a write from the event loop
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"  # as the SDK reads it


def _endpoint_set(signal: str) -> bool:
    """Whether OTLP export of ``signal`` (traces, metrics, logs) is configured and wanted."""
    if _sdk_disabled():
        return False
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    logger_provider: LoggerProvider
    scrape_reader: InMemoryMetricReader
    exporting: dict[str, bool] = field(default_factory=dict)
    # OTEL_SDK_DISABLED=true makes the SDK's providers no-ops: no metrics to scrape either.
    sdk_disabled: bool = False

    def prometheus_text(self) -> str:
        return render_prometheus(self.scrape_reader.get_metrics_data())

    def shutdown(self) -> None:
        """Flush and stop the exporters, giving up after a few seconds (a dead collector
        must not hold up the exit)."""

        def stop() -> None:
            for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
                with contextlib.suppress(Exception):  # best effort on the way out
                    provider.shutdown()
            # Calls abandoned in their threads may still end spans: nothing to say about them
            # after the service said "stopped".
            logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.WARNING)

        stopper = threading.Thread(target=stop, name="telemetry-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_BUDGET_S)


def setup_telemetry() -> Telemetry:
    """Install the SDK providers globally; OTLP exporters only where an endpoint is set."""
    # Service name and attributes come from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES;
    # where neither names the service, the SDK says "unknown_service".
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "uploader"}))
    exporting = {signal: _endpoint_set(signal) for signal in SIGNALS}

    tracer_provider = TracerProvider(resource=resource)
    if exporting["traces"]:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(session=CollectorSession())))
        trace.set_tracer_provider(tracer_provider)
    # Otherwise the API's no-op tracer stays: spans nobody receives would cost every file
    # a dozen span objects (and logs carry no trace ids, which would lead nowhere).

    scrape_reader = InMemoryMetricReader()
    readers: list[MetricReader] = [scrape_reader]
    if exporting["metrics"]:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(session=CollectorSession())))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, views=[HTTP_SERVER_METRICS_VIEW]
    )
    metrics.set_meter_provider(meter_provider)

    logger_provider = LoggerProvider(resource=resource)
    if exporting["logs"]:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.instrumentation.logging.handler import LoggingHandler

        logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(session=CollectorSession())))
        bridge = LoggingHandler(level=logging.INFO, logger_provider=logger_provider)
        # The exporter's own complaints go to stderr only, never back into the export.
        bridge.addFilter(lambda record: not record.name.startswith("opentelemetry"))
        logging.getLogger().addHandler(bridge)
    _logs.set_logger_provider(logger_provider)
    return Telemetry(
        tracer_provider, meter_provider, logger_provider, scrape_reader, exporting, _sdk_disabled()
    )


# The ASGI middleware labels its HTTP server metrics with the request's Host header (as
# ``http.server_name``) and the server's address: a client that sends many Host values
# would grow a series for each, in memory for the process's life and in every scrape. Only
# labels with a bounded set of values are kept (the middleware folds unknown methods into
# ``_OTHER``); the old and the new semantic conventions' names are both listed.
HTTP_SERVER_METRICS_VIEW = View(
    instrument_name="http.server.*",
    attribute_keys={
        "http.method", "http.scheme", "http.flavor", "http.status_code",
        "http.request.method", "http.response.status_code", "http.route", "url.scheme",
        "network.protocol.version", "error.type",
    },
)

# The SDK's default boundaries (0 to 10,000) fit milliseconds: every file over 10 kB would
# land in +Inf and every upload in the first bucket.
FILE_SIZE_BUCKETS_BYTES = [float(4**power * 1024) for power in range(14)]  # 1 KiB .. 64 GiB
UPLOAD_DURATION_BUCKETS_S = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
]


@dataclass(frozen=True)
class Metrics:
    files_processed: metrics.Counter
    files_failed: metrics.Counter
    files_quarantined: metrics.Counter
    upload_duration: metrics.Histogram
    file_size: metrics.Histogram
    bytes_uploaded: metrics.Counter
    in_flight: metrics.UpDownCounter

    @classmethod
    def create(
        cls,
        meter: metrics.Meter | None = None,
        *,
        queue_depth: Callable[[], int] = lambda: 0,
        retry_waiting: Callable[[], int] = lambda: 0,
        claimed: Callable[[], int] = lambda: 0,
        incoming: Callable[[], int] = lambda: 0,
        stuck_calls: Callable[[], dict[str, int]] = dict,
    ) -> Metrics:
        """The instruments; the callables are read when metrics are collected (in the
        exporter's or the scrape's thread: reads of ints and lengths only)."""
        meter = meter or metrics.get_meter("uploader")

        def gauge(name: str, read: Callable[[], int], description: str) -> None:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                yield Observation(read())

            meter.create_observable_up_down_counter(
                name, callbacks=[observe], unit="{file}", description=description
            )

        gauge("queue.depth", queue_depth, "Stable files waiting for a worker (retries included)")
        gauge("files.retry_waiting", retry_waiting, "Failed files waiting out their backoff")
        gauge("files.claimed", claimed, "Files taken from incoming and not yet completed or quarantined")
        gauge("files.incoming", incoming, "Files the last scan of the active session's folder found")

        def observe_stuck(options: CallbackOptions) -> Iterable[Observation]:
            for lane, stuck in stuck_calls().items():
                yield Observation(stuck, {"lane": lane})

        meter.create_observable_up_down_counter(
            "calls.stuck", callbacks=[observe_stuck], unit="{call}",
            description="Blocking calls running longer than their lane's stuck threshold (a hung NFS share)",
        )
        made = cls(
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
                "upload.duration", unit="s", description="Time to upload and verify one file",
                explicit_bucket_boundaries_advisory=UPLOAD_DURATION_BUCKETS_S,
            ),
            file_size=meter.create_histogram(
                "file.size", unit="By", description="Size of each completed file",
                explicit_bucket_boundaries_advisory=FILE_SIZE_BUCKETS_BYTES,
            ),
            bytes_uploaded=meter.create_counter(
                "bytes.uploaded", unit="By", description="Bytes of completed files"
            ),
            in_flight=meter.create_up_down_counter(
                "files.in_flight", unit="{file}", description="Files inside a worker"
            ),
        )
        # Every series from the start, at 0: an alert on failures must see 0, not no data.
        for counter in (made.files_processed, made.files_quarantined, made.bytes_uploaded):
            counter.add(0)
        for disposition in Disposition:
            made.files_failed.add(0, {"disposition": disposition.value})
        made.in_flight.add(0)
        return made


# --- Prometheus text exposition ----------------------------------------------------------

_UNIT_SUFFIXES = {"s": "seconds", "By": "bytes", "ms": "milliseconds"}


def _identifier(text: str) -> str:
    """A Prometheus metric or label name: anything but letters and digits becomes '_'."""
    return "".join(c if c.isalnum() else "_" for c in text)


def prometheus_name(name: str, unit: str) -> str:
    base = _identifier(name)
    suffix = _UNIT_SUFFIXES.get(unit)
    if suffix and suffix not in base.split("_"):
        base = f"{base}_{suffix}"
    return base


def _labels(attributes: Any, extra: dict[str, str] | None = None) -> str:
    pairs = {**{str(k): str(v) for k, v in dict(attributes or {}).items()}, **(extra or {})}
    if not pairs:
        return ""
    escaped = (
        f'{_identifier(key)}="'
        + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        + '"'
        for key, value in sorted(pairs.items())
    )
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_prometheus(data: MetricsData | None) -> str:
    lines: list[str] = []
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                name = prometheus_name(metric.name, metric.unit or "")
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    kind, name = "counter", f"{name}_total"
                elif isinstance(points, Sum | Gauge):
                    kind = "gauge"
                elif isinstance(points, Histogram):
                    kind = "histogram"
                else:  # exponential histograms are not used here
                    continue
                lines.append(f"# HELP {name} {metric.description}")
                lines.append(f"# TYPE {name} {kind}")
                for point in points.data_points:
                    if isinstance(point, HistogramDataPoint):
                        cumulative = 0
                        bounds = [*point.explicit_bounds, math.inf]
                        for bound, count in zip(bounds, point.bucket_counts, strict=True):
                            cumulative += count
                            label = _labels(point.attributes, {"le": _number(float(bound))})
                            lines.append(f"{name}_bucket{label} {cumulative}")
                        lines.append(f"{name}_sum{_labels(point.attributes)} {_number(point.sum)}")
                        lines.append(f"{name}_count{_labels(point.attributes)} {point.count}")
                    elif isinstance(point, NumberDataPoint):
                        lines.append(f"{name}{_labels(point.attributes)} {_number(point.value)}")
    return "\n".join(lines) + "\n"
