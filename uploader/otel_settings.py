"""The OTEL_* variables this service reads, checked before OpenTelemetry is imported.

The SDK reads some of them when it is imported (span limits, propagators) and stops with a
traceback on a bad value; it only logs others (and exports to an invalid URL for ever, say).
Here every bad value becomes one phrase that names the variable, reported with the APP_
settings (``python -m uploader`` exits 2). Nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from urllib.parse import urlsplit

from uploader.config import is_host

SIGNALS = ("traces", "metrics", "logs")
# The exporter names OTEL_{TRACES,METRICS,LOGS}_EXPORTER may list (comma-separated), as the
# specification and the SDK know them. This service exports over OTLP/HTTP unless the value
# is "none"; /metrics stands in for "prometheus".
EXPORTERS = (
    "otlp", "none", "console", "logging", "prometheus", "zipkin", "jaeger",
    "otlp_proto_http", "otlp_proto_grpc",
)
# The samplers the SDK knows by name (opentelemetry.sdk.trace.sampling); for any other it
# warns once and samples everything.
SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
# Read as int(...) by the batch span and log record processors, in milliseconds (the
# delays and timeouts) or records; float(...) by the metric reader (milliseconds) and the
# OTLP exporters (seconds). On a bad value the SDK logs and uses its default, or fails.
_INTEGER_VARIABLES = tuple(
    f"OTEL_{kind}_{name}"
    for kind in ("BSP", "BLRP")
    for name in ("SCHEDULE_DELAY", "EXPORT_TIMEOUT", "MAX_QUEUE_SIZE", "MAX_EXPORT_BATCH_SIZE")
)
_NUMBER_VARIABLES = (
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    *(f"OTEL_EXPORTER_OTLP_{signal.upper()}_TIMEOUT" for signal in SIGNALS),
)
_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    *(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT" for signal in SIGNALS),
)
# What the OTLP/HTTP exporters compress with (opentelemetry.exporter.otlp.proto.http.Compression).
COMPRESSIONS = ("gzip", "deflate", "none")
_COMPRESSION_VARIABLES = (
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    *(f"OTEL_EXPORTER_OTLP_{signal.upper()}_COMPRESSION" for signal in SIGNALS),
)
# Files the exporters open for TLS at every export (and fail, each time, if they cannot).
_FILE_VARIABLES = tuple(
    f"OTEL_EXPORTER_OTLP_{part}{name}"
    for part in ("", *(f"{signal.upper()}_" for signal in SIGNALS))
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY")
)
_SDK_DEFAULT_QUEUE_SIZE, _SDK_DEFAULT_BATCH_SIZE = 2048, 512  # both processors
# Limits on attributes, events and links: whole numbers from 0, or the SDK stops start-up.
_LIMIT_VARIABLES = (
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT", "OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT",
)
# The only OTLP protocol the exporters in use speak.
OTLP_PROTOCOL = "http/protobuf"
# OTEL_EXPORTER_OTLP_*HEADERS: name=value pairs, comma-separated, as the OTLP exporter
# specification and the SDK (opentelemetry.util.re, liberal: spaces allowed in values) read
# them. The SDK logs a malformed pair, whole, and drops it: the header, a credential most
# often, would be in the log and missing from every export.
_HEADER_NAME = r"[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+"
_HEADER = re.compile(rf"[ \t]*{_HEADER_NAME}[ \t]*=[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*")
_HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")
_HEADER_VARIABLES = (
    "OTEL_EXPORTER_OTLP_HEADERS",
    *(f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS" for signal in SIGNALS),
)
# Components the SDK looks up by name among installed entry points, and fails on with a
# traceback (at import, for the context) when there is none of that name.
_COMPONENT_VARIABLES = {
    "OTEL_PYTHON_CONTEXT": "opentelemetry_context",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "opentelemetry_otlp_credential_provider",
    **{
        f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal.upper()}_CREDENTIAL_PROVIDER": "opentelemetry_otlp_credential_provider"
        for signal in SIGNALS
    },
}
EXEMPLAR_FILTERS = ("always_on", "always_off", "trace_based")
# Read by the OTLP metric exporter: TEMPORALITY in any case, AGGREGATION exactly as written;
# on any other value it logs a warning and uses the first.
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
HISTOGRAM_AGGREGATIONS = ("explicit_bucket_histogram", "base2_exponential_bucket_histogram")


def tidy_otel_variables(environ: MutableMapping[str, str]) -> None:
    """Strip the blanks around every OTEL_* value, and drop the variables left empty, before
    OpenTelemetry reads them: it reads them as written, so an endpoint from a YAML block
    (its line break kept) or of spaces only was taken for one and failed every export."""
    for name in [name for name in environ if name.startswith("OTEL_")]:
        value = environ[name].strip()
        if value:
            environ[name] = value
        else:
            del environ[name]


def _installed(group: str) -> list[str]:
    from importlib.metadata import entry_points

    return sorted({entry.name for entry in entry_points(group=group)})


def _installed_propagators() -> list[str]:
    return sorted({*_installed("opentelemetry_propagator"), "none"})


def resource_attribute_problem(raw: str) -> str | None:
    """Why OTEL_RESOURCE_ATTRIBUTES is not ``key=value,...`` as the SDK splits it (it logs
    each bad entry as raw text, before logging is set up, and drops it), or None."""
    for item in raw.split(","):
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            shown = repr(item.strip()) if item.strip() else "an empty entry"
            return (
                f"OTEL_RESOURCE_ATTRIBUTES: {shown} is not key=value; give a comma-separated "
                "list such as deployment.environment=prod,service.namespace=lab"
            )
    return None


def otel_setting_problems(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with the OTEL_* variables this service reads, one phrase each, naming
    the variable. The SDK would only log a bad value (and export to an invalid URL for ever,
    say), or fail with a traceback. A blank variable counts as not set."""
    problems: list[str] = []

    def value(name: str) -> str:
        return environ.get(name, "").strip()

    # Read whatever else is off: the resource is made, and the context chosen, regardless.
    if value("OTEL_RESOURCE_ATTRIBUTES") and (problem := resource_attribute_problem(value("OTEL_RESOURCE_ATTRIBUTES"))):
        problems.append(problem)
    for name, group in _COMPONENT_VARIABLES.items():
        if value(name) and value(name) not in (known := _installed(group)):
            problems.append(
                f"{name}: {value(name)!r} is not installed here"
                + (f" (use {', '.join(known)})" if known else " (none is)")
            )
    disabled = value("OTEL_SDK_DISABLED").lower()
    if disabled not in ("", "true", "false"):
        # The SDK takes anything but "true" for false: "1" or "yes" would leave it on.
        problems.append(f"OTEL_SDK_DISABLED: must be true or false, not {value('OTEL_SDK_DISABLED')!r}")
    if disabled == "true":
        return problems  # nothing else of it is read

    for name in _HEADER_VARIABLES:
        pairs = [p for p in _HEADER_DELIMITER.split(value(name)) if p]
        if any(not _HEADER.fullmatch(pair.strip()) for pair in pairs):
            # Not echoed: it carries credentials.
            problems.append(f"{name}: must be name=value pairs separated by commas, such as api-key=<key>")
    filter_ = value("OTEL_METRICS_EXEMPLAR_FILTER")
    if filter_ and filter_.lower() not in EXEMPLAR_FILTERS:
        problems.append(f"OTEL_METRICS_EXEMPLAR_FILTER: must be one of {', '.join(EXEMPLAR_FILTERS)} (got {filter_!r})")

    for name in _ENDPOINT_VARIABLES:
        if value(name):
            try:
                parts = urlsplit(value(name))
                host = parts.hostname or ""
                valid = (
                    parts.scheme.lower() in ("http", "https")
                    and not any(c.isspace() for c in value(name))
                    # A placeholder left in a manifest (<collector-host>, ${HOST}) fails here,
                    # not in a DNS lookup at every export.
                    and (is_host(host) or (":" in host and is_host(f"[{host}]")))
                )
                if parts.port == 0 or parts.netloc.endswith(":"):  # (ValueError: no number, too large)
                    valid = False  # 0 or none after the colon: the exporters would send to port 80
            except ValueError:
                valid = False
            if not valid:  # not echoed: a URL may carry credentials
                problems.append(f"{name}: must be an http(s) URL with a host name or IP address, "
                                "such as http://collector:4318")
    temporality = value("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
    if temporality and temporality.lower() not in TEMPORALITIES:
        problems.append(
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE: must be one of "
            f"{', '.join(t.upper() for t in TEMPORALITIES)} (got {temporality!r})"
        )
    aggregation = value("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION")
    if aggregation and aggregation not in HISTOGRAM_AGGREGATIONS:
        problems.append(
            "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION: must be one of "
            f"{', '.join(HISTOGRAM_AGGREGATIONS)} (got {aggregation!r})"
        )
    for name in _COMPRESSION_VARIABLES:
        if value(name) and value(name).lower() not in COMPRESSIONS:
            problems.append(f"{name}: must be one of {', '.join(COMPRESSIONS)} (got {value(name)!r})")
    for name in _FILE_VARIABLES:
        if value(name) and not os.access(value(name), os.R_OK):
            problems.append(f"{name}: there is no file this user can read at {value(name)}")
    for signal in SIGNALS:
        name = f"OTEL_{signal.upper()}_EXPORTER"
        unknown = [e for e in value(name).lower().split(",") if e.strip() not in EXPORTERS]
        if value(name) and unknown:
            problems.append(
                f"{name}: {unknown[0].strip()!r} is not an exporter; use otlp or none"
            )
    sampler = value("OTEL_TRACES_SAMPLER").lower()
    if sampler and sampler not in SAMPLERS:
        problems.append(
            f"OTEL_TRACES_SAMPLER: must be one of {', '.join(SAMPLERS)} (got {value('OTEL_TRACES_SAMPLER')!r})"
        )
    if sampler in RATIO_SAMPLERS and value("OTEL_TRACES_SAMPLER_ARG"):
        ratio = _parse_number(value("OTEL_TRACES_SAMPLER_ARG"), float)
        if ratio is None or not 0 <= ratio <= 1:
            problems.append(
                "OTEL_TRACES_SAMPLER_ARG: must be a sampling ratio from 0 to 1 "
                f"(got {value('OTEL_TRACES_SAMPLER_ARG')!r})"
            )
    for names, kind, convert in (
        (_INTEGER_VARIABLES, "a whole number", int),
        (_NUMBER_VARIABLES, "a number", float),
    ):
        for name in names:
            if value(name):
                number = _parse_number(value(name), convert)
                if number is None or not number > 0:
                    problems.append(f"{name}: must be {kind} greater than 0 (got {value(name)!r})")
    for name in _LIMIT_VARIABLES:
        if value(name):
            number = _parse_number(value(name), int)
            if number is None or number < 0:
                problems.append(f"{name}: must be a whole number from 0 (got {value(name)!r})")
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", *(f"OTEL_EXPORTER_OTLP_{s.upper()}_PROTOCOL" for s in SIGNALS)):
        if value(name) and value(name).lower() != OTLP_PROTOCOL:
            problems.append(f"{name}: this service exports over {OTLP_PROTOCOL} only (got {value(name)!r})")
    if value("OTEL_PROPAGATORS"):
        known = _installed_propagators()
        # As the SDK looks them up: by their exact names, only "none" in any case.
        requested = [p.strip() for p in value("OTEL_PROPAGATORS").split(",")]
        unknown = [n for n in requested if n not in known and n.lower() != "none"]
        if unknown:
            problems.append(
                f"OTEL_PROPAGATORS: {unknown[0]!r} is not a propagator installed here (use {', '.join(known)})"
            )
    for kind in ("BSP", "BLRP"):
        queue = _parse_number(value(f"OTEL_{kind}_MAX_QUEUE_SIZE") or str(_SDK_DEFAULT_QUEUE_SIZE), int)
        batch = _parse_number(value(f"OTEL_{kind}_MAX_EXPORT_BATCH_SIZE") or str(_SDK_DEFAULT_BATCH_SIZE), int)
        if queue is not None and batch is not None and 0 < queue < batch:  # the SDK raises
            problems.append(
                f"OTEL_{kind}_MAX_EXPORT_BATCH_SIZE: must not be larger than "
                f"OTEL_{kind}_MAX_QUEUE_SIZE ({queue})"
            )
    return problems


def _parse_number(text: str, convert: Callable[[str], float]) -> float | None:
    try:
        number = convert(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
