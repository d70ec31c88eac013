"""Delivery reports against the real broker and Redis, with the sandbox's lifecycle and webhooks:
every accepted message ends as exactly one `delivered` or `undelivered` event."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.config import Account
from gateway.obs import metrics as m
from gateway.sandbox.dlr import DlrConfig, Webhook
from gateway.sandbox.dlr import sign as sandbox_sign
from testkit import REDIS_URL, Bus, eventually, free_port, new_account_name, request
from tests.conftest import InProcess
from tests.fakes import FailingStore

pytestmark = pytest.mark.integration

SECRET = "hook-secret"


def mobizon(world: InProcess, name: str, **overrides: Any) -> Account:
    return world.account(
        name, provider="mobizon", api_key=f"key-{name}", token=None, webhook_secret=SECRET, **overrides
    )


def finals(bus: Bus) -> list[dict[str, Any]]:
    return [d for d in bus.outcome_docs() if d["status"] in ("delivered", "undelivered")]


async def wait_finals(bus: Bus, n: int, timeout: float = 60) -> None:
    """Until at least `n` final events arrived; fails when they do not within `timeout`."""
    await eventually(lambda: len(finals(bus)) >= n, timeout, f"{n} final events")


async def test_mobizon_webhooks_end_each_message_exactly_once(world: InProcess) -> None:
    name = new_account_name()
    port = free_port()
    world.state.lifecycle.config = DlrConfig(
        delay_s=0.3,
        jitter_s=0.5,
        mix={"delivered": 0.8, "undelivered": 0.1, "expired": 0.05, "rejected": 0.05},
        webhooks={f"key-{name}": Webhook(url=f"http://127.0.0.1:{port}/dlr/mobizon/{name}", secret=SECRET)},
        retry_share=0.2,
        duplicate_share=0.05,
        early_share=0.1,
        retry_gap_s=0.3,
    )
    await world.gateway([mobizon(world, name, linger_ms=50)], http_port=port, redis_url=REDIS_URL)
    n = 200
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"w{i}", to=f"+7701{i:07d}", text=f"code {i}")) for i in range(n)])
        await bus.wait_for(outcomes=n, timeout=60)
        await wait_finals(bus, n)
        await bus.settle(1.5)  # retries and duplicates still coming must publish nothing more
    events = finals(bus)
    per_id = Counter(d["unique_id"] for d in events)
    assert len(per_id) == n
    assert set(per_id.values()) == {1}, [u for u, k in per_id.items() if k > 1][:5]
    fates = Counter(d["status"] for d in events)
    assert fates["delivered"] > 0
    assert fates["undelivered"] > 0
    sample = next(d for d in events if d["status"] == "undelivered")
    assert sample["provider_status"] in {"UNDELIV", "EXPIRED", "REJECTD"}
    assert sample["error"]["retryable"] is False
    assert sample["status_at"]
    assert sample["to"].startswith("+7701")
    hooks = world.state.ledger()["webhooks"]
    assert hooks["events"] == n
    assert hooks["posts"] > n  # retries and duplicates were sent, and came to nothing
    assert m.REGISTRY.get_sample_value(
        "sms_dlr_reports_total", {"account": name, "source": "webhook", "result": "parked"}
    )
    # A webhook only makes the poll due: every event came from the provider's own answer.
    assert (
        m.REGISTRY.get_sample_value("sms_dlr_reports_total", {"account": name, "source": "poll", "result": "published"})
        == n
    )


async def test_a_captured_webhook_rewritten_to_another_message_publishes_nothing(world: InProcess) -> None:
    """An attacker holds one genuinely signed webhook and rewrites its message id, status and
    webhook id (none of them signed): refused; the genuine report still ends its message."""
    name = new_account_name()
    port = free_port()
    world.state.lifecycle.config = DlrConfig(delay_s=0.2)  # final (delivered) soon; no webhooks of its own
    await world.gateway([mobizon(world, name, linger_ms=20)], http_port=port)
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("real", to="+77010000001"))
        await bus.publish(name, request("victim", to="+77010000002"))
        await bus.wait_for(outcomes=2)
        ids = {d["unique_id"]: d["provider_message_id"] for d in bus.outcome_docs()}
        await asyncio.sleep(0.5)  # both are delivered at the provider now
        created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        genuine = {
            "eventId": 4242,
            "eventType": "sms-delivery-report",
            "eventCreateTs": created,
            "webhookId": 1,
            "attempt": 1,
            "data": {"messageId": int(ids["real"]) if ids["real"].isdigit() else ids["real"], "status": "DELIVRD"},
            "sign": sandbox_sign(4242, 1, created, SECRET),
        }
        forged = {**genuine, "webhookId": 9, "data": {"messageId": ids["victim"], "status": "UNDELIV"}}
        url = f"http://127.0.0.1:{port}/dlr/mobizon/{name}"
        async with httpx.AsyncClient(timeout=5) as client:
            first = await client.post(url, json=genuine)
            forgeries = [(await client.post(url, json=forged)).status_code for _ in range(20)]
        await wait_finals(bus, 1, timeout=20)
        await bus.settle(1.0)
    assert first.status_code == 200
    assert forgeries == [409] * 20
    events = finals(bus)
    assert [(d["unique_id"], d["status"]) for d in events] == [("real", "delivered")]
    assert (
        m.REGISTRY.get_sample_value(
            "sms_dlr_webhooks_rejected_total", {"provider": "mobizon", "reason": "event_rewritten"}
        )
        or 0
    ) >= 20


async def test_an_announcement_the_store_failed_is_tried_again_and_the_event_follows(world: InProcess) -> None:
    """The store fails the worker's first announcements (a pause right after the batch's record):
    the hold is ended on a later try, and the delivery event comes within seconds, after
    `accepted`, not when the hold runs out minutes later."""
    name = new_account_name()
    flaky = FailingStore({"announce"}, times=2)
    world.state.lifecycle.config = DlrConfig(delay_s=0.2)
    await world.gateway([world.account(name)], stores=flaky.around, dlr_poll_after_s=0.3, dlr_poll_max_gap_s=0.6)
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("an-1"))
        await wait_finals(bus, 1, timeout=30)
    assert flaky.failed == 2
    assert [d["status"] for d in bus.outcome_docs()] == ["accepted", "delivered"]


async def test_serwersms_is_polled_until_final(world: InProcess) -> None:
    name = new_account_name()
    world.state.lifecycle.config = DlrConfig(delay_s=0.2, jitter_s=1.0, mix={"delivered": 0.7, "undelivered": 0.3})
    await world.gateway([world.account(name, linger_ms=50)], dlr_poll_after_s=0.3, dlr_poll_max_gap_s=0.6)
    n = 100
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"p{i}", to=f"+4850070{i:04d}")) for i in range(n)])
        await bus.wait_for(outcomes=n, timeout=60)
        await wait_finals(bus, n)
        await bus.settle(1.0)
    events = finals(bus)
    assert Counter(Counter(d["unique_id"] for d in events).values()) == {1: n}
    undelivered = [d for d in events if d["status"] == "undelivered"]
    assert undelivered
    assert all(d["reason"] == "wrong_number" for d in undelivered)
    assert all(d["provider_status"] in ("delivered", "undelivered") for d in events)
    polls = world.state.ledger()["polled"]
    assert set(polls) == {d["provider_message_id"] for d in events}
    assert max(polls.values()) >= 2  # some were still in flight at their first poll


async def test_a_message_without_a_final_status_ends_undelivered_unknown_when_its_window_ends(
    world: InProcess,
) -> None:
    name = new_account_name()
    world.state.lifecycle.config = DlrConfig(delay_s=3600)  # never final within the test
    await world.gateway(
        [world.account(name, linger_ms=50)], dlr_poll_after_s=0.2, dlr_poll_max_gap_s=0.3, dlr_window_s=1.0
    )
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("slow-1"))
        await bus.wait_for(outcomes=1)
        await wait_finals(bus, 1, timeout=15)
    (event,) = finals(bus)
    assert (event["status"], event["reason"], event["provider_status"]) == ("undelivered", "unknown", "unknown")


async def test_bad_webhooks_get_4xx_are_counted_and_the_gateway_goes_on(world: InProcess) -> None:
    name = new_account_name()
    port = free_port()
    await world.gateway([mobizon(world, name)], http_port=port)
    url = f"http://127.0.0.1:{port}/dlr/mobizon"
    good = {
        "eventId": 1,
        "eventType": "sms-delivery-report",
        "eventCreateTs": "2026-01-15 11:42:28",
        "webhookId": 1,
        "attempt": 1,
        "data": {"messageId": 5, "status": "DELIVRD", "to": "77010000000"},
        "sign": "0" * 40,
    }
    async with httpx.AsyncClient(timeout=5) as client:
        answers = [
            (await client.post(f"{url}/{name}", json=good)).status_code,  # wrong sign
            (await client.post(f"{url}/nobody", json=good)).status_code,
            (await client.post(f"http://127.0.0.1:{port}/dlr/serwersms/{name}", json=good)).status_code,
            (await client.post(f"{url}/{name}", content=b'{"eventId": ')).status_code,
            (await client.post(f"{url}/{name}", json={**good, "data": []})).status_code,
            (await client.post(f"{url}/{name}", content=b"[" * 100_000)).status_code,
        ]
        health = (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
    assert answers == [403, 404, 404, 400, 400, 400]
    assert health == 200

    def rejected(provider: str, reason: str) -> float:
        return (
            m.REGISTRY.get_sample_value("sms_dlr_webhooks_rejected_total", {"provider": provider, "reason": reason})
            or 0
        )

    assert rejected("mobizon", "bad_signature") >= 1
    assert rejected("mobizon", "unknown_account") >= 1
    assert rejected("serwersms", "unknown_account") >= 1
    assert rejected("mobizon", "malformed") >= 2
    assert rejected("mobizon", "oversized") >= 1
    assert json.dumps(good)  # the good body itself is well formed: only the sign was wrong


async def test_a_webhook_is_answered_503_while_the_store_is_down_and_taken_when_it_is_back(
    world: InProcess,
) -> None:
    name = new_account_name()
    port = free_port()
    flaky = FailingStore({"hint"}, times=1)
    world.state.lifecycle.config = DlrConfig(
        delay_s=0.2,
        webhooks={f"key-{name}": Webhook(url=f"http://127.0.0.1:{port}/dlr/mobizon/{name}", secret=SECRET)},
        retry_gap_s=0.3,
    )
    await world.gateway([mobizon(world, name)], http_port=port, stores=flaky.around)
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("down-1", to="+77010000009"))
        await wait_finals(bus, 1, timeout=20)
    assert flaky.failed == 1
    assert world.state.ledger()["webhooks"]["answers"] == {"503": 1, "200": 1}  # Mobizon's retry got through
    assert [d["status"] for d in finals(bus)] == ["delivered"]


async def test_delivery_tracking_lost_with_the_store_is_rebuilt_from_the_broker(world: InProcess) -> None:
    """Redis loses every key of the account while reports are pending (a restart without
    persistence): the tracking comes back from the sms.tracking stream, every accepted SMS still
    ends in exactly one delivery event, and those that had theirs already get no second one."""
    name = new_account_name()
    world.state.lifecycle.config = DlrConfig(delay_s=1.0, jitter_s=8.0, mix={"delivered": 0.8, "undelivered": 0.2})
    await world.gateway(
        [world.account(name, linger_ms=20)], redis_url=REDIS_URL, dlr_poll_after_s=0.5, dlr_poll_max_gap_s=1.0
    )
    n = 30
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with Bus.open([name]) as bus:
            await bus.publish_many([(name, request(f"t{i}", to=f"+4850060{i:04d}")) for i in range(n)])
            await bus.wait_for(outcomes=n, timeout=30)
            await wait_finals(bus, 3, timeout=20)  # some have their event already, most do not
            before = len(finals(bus))
            assert before < n
            await client.delete(*[k async for k in client.scan_iter(match=f"smsgw:{{{name}}}:*")])
            # The next claim meets the new epoch (without one, the desk's own look finds it within 30 s).
            await bus.publish(name, request("after", to="+48500609999"))
            await wait_finals(bus, n + 1, timeout=60)
            await bus.settle(2.0)
    finally:
        await client.aclose()
    per_id = Counter(d["unique_id"] for d in finals(bus))
    assert len(per_id) == n + 1, f"{n + 1 - len(per_id)} accepted SMS got no delivery event ({before} had one before)"
    assert set(per_id.values()) == {1}
    assert m.REGISTRY.get_sample_value("sms_store_epoch_resets_total", {"account": name}) == 1


async def test_webhooks_past_the_rate_are_answered_503_before_their_body_is_read(world: InProcess) -> None:
    name = new_account_name()
    port = free_port()
    await world.gateway([mobizon(world, name)], http_port=port, webhook_rate_per_s=3)
    url = f"http://127.0.0.1:{port}/dlr/mobizon/{name}"
    async with httpx.AsyncClient(timeout=5) as client:
        posts = [client.post(url, content=b"not even JSON") for _ in range(20)]
        answers = Counter(r.status_code for r in await asyncio.gather(*posts))
        health = (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
    # A second's worth is read at once and a second's worth waits its turn (each refused as
    # malformed once read); the rest never had their body read.
    assert 3 <= answers[400] <= 7
    assert answers[503] == 20 - answers[400]
    assert health == 200
    assert m.REGISTRY.get_sample_value("sms_dlr_webhooks_rejected_total", {"provider": "(any)", "reason": "busy"})


async def test_the_tracking_stream_says_which_events_the_broker_routed(services: None) -> None:
    """What the desk asks after a publish whose confirm was lost: the events routed to sms.outcomes
    since then are in the sms.tracking stream, read up to a marker."""
    import time

    import aio_pika

    from gateway import contract as c
    from gateway.bus import topology
    from gateway.dlr import tracking
    from testkit import AMQP_URL, delete_account_queues

    account, other = new_account_name(), new_account_name()
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, [account], [1])
        since = time.time()
        outcomes = await channel.get_exchange(c.OUTCOMES_EXCHANGE)
        for status, name, message_id in [
            ("delivered", account, "m-routed"),
            ("undelivered", account, "m-undelivered"),
            ("delivered", other, "m-other-account"),
            ("accepted", account, "m-not-final"),
        ]:
            body = c.outcome_body(
                unique_id="u", account=name, to=None, status=c.Status(status), provider="mobizon",
                provider_message_id=message_id,
            )  # fmt: skip
            await outcomes.publish(aio_pika.Message(body), routing_key=f"{status}.{name}")
        wanted = ["m-routed", "m-undelivered", "m-other-account", "m-not-final", "m-never"]
        found = await tracking.events_published(connection, account, wanted, since)
        assert found == {"m-routed", "m-undelivered"}
    finally:
        await connection.close()
        await delete_account_queues([account])
