"""Traces continue the publisher's trace; metrics count what happened."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from gateway.obs import metrics as m
from gateway.sandbox.state import FaultRule
from testkit import Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_publisher_trace_reaches_the_provider_call_and_the_outcome(world: InProcess, span_exporter: Any) -> None:
    name = new_account_name()
    await world.gateway([world.account(name)])
    span_exporter.clear()
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("tr-1"), headers={"traceparent": TRACEPARENT})
        await bus.wait_for(outcomes=1)
    (outcome,) = bus.outcomes
    assert outcome.headers["traceparent"].split("-")[1] == TRACE_ID
    spans = [s for s in span_exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]
    names = {s.name for s in spans}
    assert {"sms.send process", "sms.batch", "POST messages/send_sms"} <= names
    http = next(s for s in spans if s.name == "POST messages/send_sms")
    assert http.kind is SpanKind.CLIENT
    assert http.attributes is not None
    assert http.attributes["http.response.status_code"] == 200
    assert "tok-" not in str(http.attributes)
    # The provider received the trace context: the HTTP call's span, in the publisher's trace.
    assert list(world.state.traceparents) == [f"00-{TRACE_ID}-{format(http.context.span_id, '016x')}-01"]


def sample(name: str, labels: dict[str, str]) -> float:
    value = m.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_metrics_count_outcomes_retries_dead_letters_and_batches(world: InProcess) -> None:
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", http_status=429, count=1))
    await world.gateway([world.account(name, linger_ms=100)])
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"mt{i}", to=f"+4850060{i:04d}")) for i in range(20)])
        await bus.publish(name, request("bad", to="12"))
        await bus.wait_for(outcomes=21, dead=1)
        await bus.settle(0.5)
    assert sample("sms_outcomes_total", {"account": name, "status": "accepted", "code": ""}) == 20
    assert sample("sms_outcomes_total", {"account": name, "status": "invalid", "code": "invalid_number"}) == 1
    assert sample("sms_dead_letters_total", {"account": name, "reason": "invalid"}) == 1
    assert sample("sms_retries_total", {"account": name, "kind": "retry"}) >= 1
    assert sample("sms_batch_size_sum", {"account": name}) >= 20
    assert sample("sms_in_flight", {"account": name}) == 0
    assert (
        sample(
            "sms_provider_request_seconds_count",
            {"account": name, "provider": "serwersms", "operation": "messages/send_sms", "result": "ok"},
        )
        >= 1
    )


async def test_the_time_a_request_waited_in_its_queue_is_measured_from_its_timestamp(world: InProcess) -> None:
    from datetime import UTC, datetime, timedelta

    name = new_account_name()
    await world.gateway([world.account(name)])
    async with Bus.open([name]) as bus:
        published = datetime.now(UTC) - timedelta(seconds=42)  # as if it had waited 42 s in the queue
        await bus.publish(name, request("wait-1"), timestamp=published)
        await bus.publish(name, request("no-stamp"))  # no timestamp: nothing to measure
        await bus.wait_for(outcomes=2)
    assert sample("sms_queue_wait_seconds_count", {"account": name, "lane": "normal"}) == 1
    assert 42 <= sample("sms_queue_wait_seconds_sum", {"account": name, "lane": "normal"}) < 60


async def test_a_quiet_account_shows_zeros_where_alerts_and_panels_read(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name)])
    for metric, labels in [
        *(("sms_account_paused", {"account": name, "lane": lane}) for lane in ("urgent", "normal", "bulk")),
        ("sms_lane_outcomes_total", {"account": name, "lane": "urgent", "status": "accepted"}),
        ("sms_in_flight", {"account": name}),
        ("sms_rate_limit_wait_seconds_total", {"account": name}),
        ("sms_retries_total", {"account": name, "kind": "retry"}),
        ("sms_retries_total", {"account": name, "kind": "wait"}),
        ("sms_retries_total", {"account": name, "kind": "defer"}),
        ("sms_dead_letters_total", {"account": name, "reason": "rejected"}),
        ("sms_dlr_events_total", {"account": name, "status": "undelivered"}),
    ]:
        assert m.REGISTRY.get_sample_value(metric, labels) == 0.0, metric  # a sample, not None
