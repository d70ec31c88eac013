"""OpenTelemetry tracing: the publisher's `traceparent` is continued through consume, batch, the
provider HTTP call and the outcome publish.

Span ids are always minted (they go on every log line and into the outcome's `traceparent`);
spans are recorded and exported over OTLP only when the standard variables ask for it
(`OTEL_TRACES_EXPORTER=otlp`, or an `OTEL_EXPORTER_OTLP_*ENDPOINT` with no
`OTEL_TRACES_EXPORTER=none`). Nothing is recorded or exported by default.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

TRACE_HEADERS = ("traceparent", "tracestate")


def otlp_wanted(env: Mapping[str, str] = os.environ) -> bool:
    exporter = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter:
        return "otlp" in exporter.split(",")
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing() -> None:
    """Install the SDK tracer provider once per process (the CLI calls this; tests install their own)."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "sms-gateway")})
    if not otlp_wanted():
        # Nothing exports: don't record spans, only mint their ids (for the log lines and the
        # outcome's traceparent, which keeps the publisher's trace id).
        trace.set_tracer_provider(TracerProvider(resource=resource, sampler=ALWAYS_OFF))
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (default parent-based)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


@functools.cache
def tracer() -> trace.Tracer:
    """One tracer per process (a proxy until a provider is installed, then the provider's)."""
    return trace.get_tracer("gateway")


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The publisher's trace context from AMQP headers (values may arrive as bytes)."""
    carrier: dict[str, str] = {}
    for key in TRACE_HEADERS:
        value = (headers or {}).get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        if isinstance(value, str):
            carrier[key] = value
    return propagate.extract(carrier)


def inject(span: trace.Span | None, into: dict[str, Any]) -> dict[str, Any]:
    """Write `traceparent` (and `tracestate`) for `span` into a header dict."""
    if span is not None:
        propagate.inject(into, context=trace.set_span_in_context(span))
    return into
