from __future__ import annotations

import pytest

from gateway.obs.tracing import extract, otlp_wanted


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_otlp_export_only_when_the_standard_variables_ask(env: dict[str, str], wanted: bool) -> None:
    assert otlp_wanted(env) is wanted


def test_traceparent_is_read_from_bytes_or_str_headers() -> None:
    from opentelemetry import trace

    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for value in (tp, tp.encode()):
        ctx = trace.get_current_span(extract({"traceparent": value})).get_span_context()
        assert format(ctx.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert not trace.get_current_span(extract({"traceparent": "garbage"})).get_span_context().is_valid
