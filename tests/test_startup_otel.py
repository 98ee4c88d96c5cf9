"""The OTEL_* variables the service reads are checked at start-up (otel_settings.otel_setting_problems):
a bad one is named in one phrase, and ``python -m uploader`` stops with exit 2 (test_lifecycle_e2e)."""

from __future__ import annotations

import pytest

from uploader.otel_settings import otel_setting_problems, tidy_otel_variables

GOOD = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector.example/v1/traces",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://[::1]:4318/v1/logs",
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_METRICS_EXPORTER": "prometheus",
    "OTEL_LOGS_EXPORTER": "otlp,console",
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": "0.25",
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_METRIC_EXPORT_TIMEOUT": "2500.5",
    "OTEL_EXPORTER_OTLP_TIMEOUT": "10",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1024",
    "OTEL_BLRP_SCHEDULE_DELAY": "100",
    "OTEL_BLRP_EXPORT_TIMEOUT": "5000",
    "OTEL_PROPAGATORS": "tracecontext,baggage",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "0",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "4096",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "none",
    "OTEL_EXPORTER_OTLP_CERTIFICATE": __file__,  # any file this user can read
}


def test_the_sdk_is_disabled_or_enabled_in_any_case() -> None:
    assert otel_setting_problems({"OTEL_SDK_DISABLED": "TRUE"}) == []
    assert otel_setting_problems({"OTEL_SDK_DISABLED": "False"}) == []


def test_good_values_pass() -> None:
    assert otel_setting_problems(GOOD) == []


def test_none_selects_no_exporter() -> None:
    assert otel_setting_problems({"OTEL_TRACES_EXPORTER": "NONE", "OTEL_LOGS_EXPORTER": " none "}) == []


def test_nothing_is_checked_when_the_sdk_is_disabled() -> None:
    assert otel_setting_problems({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "bogus"}) == []


def test_blank_values_count_as_not_set() -> None:
    assert otel_setting_problems({name: "" for name in GOOD}) == []


def test_metric_temporality_and_histogram_aggregation_take_what_the_exporter_knows() -> None:
    assert otel_setting_problems({
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "base2_exponential_bucket_histogram",
    }) == []


def test_blanks_around_otel_values_are_stripped_and_blank_ones_dropped_before_the_sdk_reads_them() -> None:
    """A YAML block keeps its line break; a value of spaces is no endpoint."""
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318\n",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "   ",
        "OTEL_SERVICE_NAME": " lab-uploader ",
        "APP_PORT": " 8080 ",  # not OpenTelemetry's: left to the settings
    }
    tidy_otel_variables(environ)
    assert environ == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_SERVICE_NAME": "lab-uploader",
        "APP_PORT": " 8080 ",
    }
    assert otel_setting_problems(environ) == []


def test_variables_the_service_does_not_read_are_not_checked() -> None:
    assert otel_setting_problems({"OTEL_EXPORTER_ZIPKIN_ENDPOINT": "%%%", "OTEL_SERVICE_NAME": ""}) == []


def test_the_sampler_argument_is_not_checked_for_a_sampler_that_does_not_read_it() -> None:
    assert otel_setting_problems({"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "x"}) == []


BAD = [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "notaurl"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://collector:4317"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:port"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://"),
    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "notaurl"),
    ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "notaurl"),
    ("OTEL_TRACES_EXPORTER", "bogus"),
    ("OTEL_METRICS_EXPORTER", "otlp,bogus"),
    ("OTEL_TRACES_SAMPLER", "bogus"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "abc"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
    ("OTEL_METRIC_EXPORT_TIMEOUT", "-5"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
    ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "10s"),
    ("OTEL_BSP_SCHEDULE_DELAY", "100.5"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
    ("OTEL_BLRP_EXPORT_TIMEOUT", "soon"),
    ("OTEL_PROPAGATORS", "b3"),  # a name of the specification, but not installed here
    ("OTEL_PROPAGATORS", "tracecontext,bogus"),
    ("OTEL_PROPAGATORS", "TraceContext"),  # the SDK looks names up as they are written
    ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "-3"),
    ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "abc"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
    ("OTEL_RESOURCE_ATTRIBUTES", "foo"),
    ("OTEL_RESOURCE_ATTRIBUTES", "a=b,,c=d"),
    ("OTEL_RESOURCE_ATTRIBUTES", "=value"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization: Bearer s3cr3t"),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key"),
    ("OTEL_PYTHON_CONTEXT", "bogus"),
    ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_METRICS_CREDENTIAL_PROVIDER", "nope"),
    ("OTEL_METRICS_EXEMPLAR_FILTER", "x"),
    # Placeholders left in a manifest: refused at start, not looked up at every export.
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://<collector-host>:4318"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://${COLLECTOR_HOST}:4318"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://col lector:4318/v1/traces"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
    ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "zstd"),
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
    ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/nonexistent/client.key"),
    ("OTEL_SDK_DISABLED", "1"),  # the SDK would take it for false and stay on
    ("OTEL_SDK_DISABLED", "yes"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:0"),  # the exporters would use port 80
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:/v1/traces"),  # so would they here
    ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "sometimes"),
    ("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "Explicit_Bucket_Histogram"),
]


@pytest.mark.parametrize(("variable", "value"), BAD)
def test_a_bad_value_is_one_phrase_naming_the_variable(variable: str, value: str) -> None:
    problems = otel_setting_problems({variable: value})
    assert len(problems) == 1
    assert problems[0].startswith(f"{variable}: ")
    assert "\n" not in problems[0]


def test_a_ratio_outside_zero_to_one_is_named() -> None:
    problems = otel_setting_problems({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"})
    assert [p.split(":")[0] for p in problems] == ["OTEL_TRACES_SAMPLER_ARG"]


def test_a_batch_larger_than_the_default_queue_is_named() -> None:
    """The SDK raises ValueError (a traceback at start-up) for it."""
    problems = otel_setting_problems({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"})
    assert [p.split(":")[0] for p in problems] == ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]


def test_headers_are_not_echoed() -> None:
    problems = otel_setting_problems({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization: Bearer s3cr3t"})
    assert "s3cr3t" not in problems[0]


def test_well_formed_headers_and_resource_attributes_pass() -> None:
    assert otel_setting_problems({
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc, authorization=Bearer tok%20x",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod, service.namespace = lab",
    }) == []


def test_the_resource_and_context_are_checked_even_when_the_sdk_is_disabled() -> None:
    problems = otel_setting_problems(
        {"OTEL_SDK_DISABLED": "true", "OTEL_RESOURCE_ATTRIBUTES": "foo", "OTEL_PYTHON_CONTEXT": "x"}
    )
    assert [p.split(":")[0] for p in problems] == ["OTEL_RESOURCE_ATTRIBUTES", "OTEL_PYTHON_CONTEXT"]


def test_an_endpoint_is_not_echoed() -> None:
    problems = otel_setting_problems({"OTEL_EXPORTER_OTLP_ENDPOINT": "user:s3cret@collector"})
    assert "s3cret" not in problems[0]
