"""Budgets in SMS parts end to end: two replicas sharing Redis, twenty producers at once, against
the sandbox's ledger. Exactly the budget goes out, the rest is `rejected` / `quota_exceeded`."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika
import pytest

from gateway import contract as c
from gateway.obs import metrics as m
from testkit import AMQP_URL, REDIS_URL, Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def produce(
    account: str, producer: int, count: int, app_id: str | None = None, lane: c.Lane = c.Lane.NORMAL
) -> None:
    """One producer: its own connection, publishing its requests as fast as the broker confirms."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE)
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(request(f"p{producer}-{i}", to=f"+48501{producer:02d}{i:04d}"), app_id=app_id),
                    routing_key=c.lane_key(account, lane),
                )
                for i in range(count)
            )
        )


def accepted_parts(world: InProcess, account: str) -> int:
    from gateway.providers.base import provider_ref

    refs = {provider_ref(account, f"p{p}-{i}") for p in range(20) for i in range(100)}
    return sum(r.parts for r in world.state.sends if r.unique_id in refs)


async def test_two_replicas_and_twenty_producers_send_exactly_the_daily_budget(world: InProcess) -> None:
    name = new_account_name()
    account = world.account(name, budget_parts_per_day=500, batch_size=50, linger_ms=20)
    for _ in range(2):  # two replicas: separate connections, one shared Redis
        await world.gateway([account], redis_url=REDIS_URL)
    async with Bus.open([name]) as bus:
        await asyncio.gather(*(produce(name, p, 50) for p in range(20)))  # 1,000 requests of one part
        await bus.wait_for(outcomes=1000, timeout=120)
    docs = bus.outcome_docs()
    statuses = Counter(d["status"] for d in docs)
    assert statuses == {"accepted": 500, "rejected": 500}, statuses
    assert {d["error"]["code"] for d in docs if d["status"] == "rejected"} == {"quota_exceeded"}
    assert accepted_parts(world, name) == 500  # the provider's ledger: not one part over
    assert not bus.dead
    assert (
        m.REGISTRY.get_sample_value("sms_budget_used_parts", {"account": name, "scope": "account", "period": "day"})
        == 500
    )


async def test_an_application_budget_limits_its_application_only_and_urgent_codes_pass(world: InProcess) -> None:
    name = new_account_name()
    account = world.account(
        name, app_budgets={"campaigns": {"budget_parts_per_day": 30}}, budget_parts_per_month=100, linger_ms=20
    )
    for _ in range(2):
        await world.gateway([account], redis_url=REDIS_URL)
    async with Bus.open([name]) as bus:
        await asyncio.gather(*(produce(name, p, 10, app_id="campaigns") for p in range(5)))  # 50 of one part
        await bus.wait_for(outcomes=50, timeout=60)
        by_app = Counter(d["status"] for d in bus.outcome_docs())
        assert by_app == {"accepted": 30, "rejected": 20}, by_app
        await asyncio.gather(*(produce(name, p, 10, app_id="billing") for p in range(5, 12)))  # 70 more
        await bus.wait_for(outcomes=120, timeout=60)
        assert Counter(d["status"] for d in bus.outcome_docs()[50:]) == {"accepted": 70}  # the month's 100
        await produce(name, 12, 5, app_id="billing")  # the account's month is spent
        await produce(name, 13, 3, app_id="billing", lane=c.Lane.URGENT)  # codes are counted, not refused
        await bus.wait_for(outcomes=128, timeout=60)
    tail = {d["unique_id"]: d for d in bus.outcome_docs()[120:]}
    assert Counter(d["status"] for uid, d in tail.items() if uid.startswith("p12-")) == {"rejected": 5}
    assert Counter(d["status"] for uid, d in tail.items() if uid.startswith("p13-")) == {"accepted": 3}
    msg = next(d for uid, d in tail.items() if uid.startswith("p12-"))["error"]["message"]
    assert msg == "the account's monthly budget of 100 parts is spent"


async def test_a_message_the_provider_refuses_gives_its_parts_back(world: InProcess) -> None:
    from gateway.sandbox.state import FaultRule

    name = new_account_name()
    account = world.account(name, budget_parts_per_day=2, linger_ms=20)
    await world.gateway([account], redis_url=REDIS_URL)
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", code=3005, count=1))  # one permanent refusal
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("r-1"))
        await bus.wait_for(outcomes=1)
        for i in range(3):
            await bus.publish(name, request(f"r-{i + 2}", to=f"+4850060070{i}"))
        await bus.wait_for(outcomes=4)
    statuses = [d["status"] for d in bus.outcome_docs()]
    assert statuses[0] == "rejected"
    assert bus.outcome_docs()[0]["error"]["code"] == "3005"
    assert Counter(statuses[1:]) == {"accepted": 2, "rejected": 1}  # the refused one's part came back
