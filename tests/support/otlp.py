"""A real OTLP/HTTP receiver on loopback: decodes what the service exports, for assertions."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    error: bool = False  # its status is ERROR


@dataclass(frozen=True)
class LogRecordRecord:
    body: Any
    trace_id: str
    span_id: str
    severity: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    spans: list[SpanRecord] = field(default_factory=list)
    logs: list[LogRecordRecord] = field(default_factory=list)
    # metric name -> the data points of the latest export (cumulative), as dicts
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)  # one per request
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.authorizations.append(self.headers.get("Authorization"))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                answer = receiver.receive(self.path, body)
                if answer is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                payload = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def receive(self, path: str, body: bytes) -> Message | None:
        with self.lock:
            self.requests += 1
            if path == "/v1/traces":
                self._traces(ExportTraceServiceRequest.FromString(body))
                return ExportTraceServiceResponse()
            if path == "/v1/metrics":
                self._metrics(ExportMetricsServiceRequest.FromString(body))
                return ExportMetricsServiceResponse()
            if path == "/v1/logs":
                self._logs(ExportLogsServiceRequest.FromString(body))
                return ExportLogsServiceResponse()
        return None

    def _traces(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        SpanRecord(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            error=span.status.code == Status.STATUS_CODE_ERROR,
                        )
                    )

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    points = []
                    for point in getattr(metric, kind).data_points:
                        entry: dict[str, Any] = {"attributes": _attributes(point.attributes)}
                        if kind == "histogram":
                            entry.update(count=point.count, sum=point.sum)
                        else:
                            entry["value"] = getattr(point, point.WhichOneof("value"))
                        points.append(entry)
                    self.metrics[metric.name] = points

    def _logs(self, request: ExportLogsServiceRequest) -> None:
        for resource_logs in request.resource_logs:
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    self.logs.append(
                        LogRecordRecord(
                            body=_value(record.body),
                            trace_id=record.trace_id.hex(),
                            span_id=record.span_id.hex(),
                            severity=record.severity_text,
                            attributes=_attributes(record.attributes),
                        )
                    )

    def total(self, metric: str) -> float:
        """Sum (or count, for histograms) over every data point of ``metric``."""
        with self.lock:
            points = self.metrics.get(metric, [])
            return sum(p.get("value", p.get("count", 0)) for p in points)
