"""One gateway process through every outcome path: its /metrics numbers and its logs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from testkit import (
    ROOT,
    Bus,
    Process,
    Sandbox,
    account_doc,
    delete_account_queues,
    new_account_name,
    request,
    start_gateway,
)

pytestmark = pytest.mark.e2e

TEXT = "Hidden text {n} must never reach a log"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_and_logs_after_every_outcome_path(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox]
) -> None:
    _, sandbox = sandbox_process
    ok, bad, down, ghost = (new_account_name(p) for p in ("ok", "bad", "down", "ghost"))
    sandbox.fault(match=f"token:tok-{bad}", code=3106)
    sandbox.fault(match=f"token:tok-{down}", http_status=503)
    accounts = [account_doc(n, sandbox.port) for n in (ok, bad, down)]
    proc, port = start_gateway(tmp_path, accounts, max_attempts=2, retry_schedule_s=[0.2], log_format="json")
    phones = [f"+4850111{i:04d}" for i in range(10)]
    try:
        async with Bus.open([ok, bad, down, ghost]) as bus:
            await bus.publish_many([(ok, request(f"a{i}", to=phones[i], text=TEXT.format(n=i))) for i in range(5)])
            await bus.wait_for(outcomes=5)
            await bus.publish(ok, request("a0", to=phones[0], text=TEXT.format(n=0)))  # duplicate
            await bus.publish(ok, request("v1", to=phones[5], text="Hi {name}", vars={}))  # invalid: missing var
            await bus.publish(ok, request("e1", to=phones[6], text=TEXT.format(n=6), expires_at="2001-01-01T00:00:00Z"))
            await bus.publish(bad, request("r1", to=phones[7], text=TEXT.format(n=7)))  # rejected
            await bus.publish(down, request("f1", to=phones[8], text=TEXT.format(n=8)))  # failed after retries
            await bus.publish(ghost, request("u1", to=phones[9], text=TEXT.format(n=9)))  # unknown account
            await bus.wait_for(outcomes=11, dead=5, timeout=30)
            await bus.settle(0.5)
        schema = Draft202012Validator(json.loads((ROOT / "contract" / "outcome.schema.json").read_text()))
        for doc in bus.outcome_docs():  # every outcome path against the published contract
            schema.validate(doc)
        statuses = Counter((d["account"], d["status"]) for d in bus.outcome_docs())
        assert statuses == {
            (ok, "accepted"): 5,
            (ok, "duplicate"): 1,
            (ok, "invalid"): 1,
            (ok, "expired"): 1,
            (bad, "rejected"): 1,
            (down, "failed"): 1,
            (ghost, "invalid"): 1,
        }
        metrics = scrape(port)

        def value(name: str, **labels: str) -> float:
            return metrics.get((name, frozenset(labels.items())), 0.0)

        assert value("sms_outcomes_total", account=ok, status="accepted", code="") == 5
        assert value("sms_outcomes_total", account=ok, status="duplicate", code="") == 1
        assert value("sms_outcomes_total", account=ok, status="invalid", code="missing_var") == 1
        assert value("sms_outcomes_total", account=ok, status="expired", code="expired") == 1
        assert value("sms_outcomes_total", account=bad, status="rejected", code="3106") == 1
        assert value("sms_outcomes_total", account=down, status="failed", code="http_503") == 1
        assert value("sms_outcomes_total", account="(unknown)", status="invalid", code="unknown_account") == 1
        assert value("sms_dead_letters_total", account=bad, reason="rejected") == 1
        assert value("sms_dead_letters_total", account=down, reason="retries_exhausted") == 1
        assert value("sms_dead_letters_total", account="(unknown)", reason="unknown_account") == 1
        assert value("sms_retries_total", account=down, kind="retry") == 1
        assert value("sms_in_flight", account=ok) == 0
        assert metrics[("sms_account_paused", frozenset({"account": bad, "lane": "normal"}.items()))] == 0
        assert value("sms_batch_size_sum", account=ok) == 5
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        assert proc.terminate() == 0
        proc.close()
        await delete_account_queues([ok, bad, down])

    log = proc.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    per_message = [x for x in lines if x.get("event") == "sms"]
    assert len(per_message) == 11
    assert all(x.get("trace_id") and x.get("span_id") for x in per_message)
    for phone in phones:
        assert phone not in log
        assert phone.lstrip("+") not in log
        assert phone[3:] not in log  # the national number
    assert "Hidden text" not in log
    assert "Hi {name}" not in log
    assert "tok-" not in log
