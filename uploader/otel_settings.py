"""The OTEL_* variables this service reads, checked before OpenTelemetry is imported.

The SDK reads some of them when it is imported (span limits, propagators) and stops with a
traceback on a bad value; it only logs others (and exports to an invalid URL for ever, say).
Here every bad value becomes one phrase that names the variable, reported with the APP_
settings (``python -m uploader`` exits 2). Nothing here imports OpenTelemetry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

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


def _installed_propagators() -> list[str]:
    from importlib.metadata import entry_points

    return sorted({entry.name for entry in entry_points(group="opentelemetry_propagator")} | {"none"})


def otel_setting_problems(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with the OTEL_* variables this service reads, one phrase each, naming
    the variable. The SDK would only log a bad value (and export to an invalid URL for ever,
    say), or fail with a traceback. A blank variable counts as not set."""
    problems: list[str] = []

    def value(name: str) -> str:
        return environ.get(name, "").strip()

    if value("OTEL_SDK_DISABLED").lower() == "true":
        return problems  # nothing of it is read

    for name in _ENDPOINT_VARIABLES:
        if value(name):
            try:
                parts = urlsplit(value(name))
                valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number
            except ValueError:
                valid = False
            if not valid:  # not echoed: a URL may carry credentials
                problems.append(f"{name}: must be an http(s) URL such as http://collector:4318")
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
