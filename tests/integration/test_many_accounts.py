"""Many accounts on one replica, against the real broker: what grows with their number."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable

import aio_pika
import pytest

from gateway import app as app_module
from gateway import contract as c
from gateway.app import Gateway
from testkit import AMQP_URL, AMQP_VHOST, Bus, eventually, new_account_name, rabbitmqctl, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def test_consumers_spread_over_connections_when_one_is_full(world: InProcess) -> None:
    """An account's lanes consume on one channel; past `channels_per_connection` the next accounts
    go on a connection of their own (3,000 accounts would pass RabbitMQ's channel_max, 2,047)."""
    names = [new_account_name() for _ in range(3)]
    gw = await world.gateway([world.account(n) for n in names], channels_per_connection=2)
    assert len(gw._consumer_connections) == 2  # 3 account channels: 2 + 1
    for n in names:
        assert len({id(w._consumer._channel) for w in gw.workers if w.account.name == n and w._consumer}) == 1
    assert await gw.problems() == []
    async with Bus.open(names) as bus:
        for n in names:
            await bus.publish(n, request(f"{n}-1"))
        await bus.wait_for(outcomes=3)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 3}
    await gw.stop()
    world.gateways.remove(gw)
    assert all(c.is_closed for c, _ in gw._consumer_connections)


def consumers_of(queues: set[str]) -> list[dict[str, object]]:
    out = rabbitmqctl(
        "list_consumers", "-q", "-p", AMQP_VHOST, "queue_name", "channel_pid", "prefetch_count", "--formatter", "json"
    )
    return [r for r in json.loads(out) if r["queue_name"] in queues]


async def test_an_accounts_lanes_share_one_channel_each_consumer_with_its_own_prefetch(world: InProcess) -> None:
    """The lanes consume on one channel. The broker gives a consumer the channel's last basic.qos,
    so lanes that consume again at once (resizes, or the watchdog after a reconnect) must each
    still get their own prefetch."""
    name = new_account_name()
    gw = await world.gateway([world.account(name)])
    wanted = {c.Lane.URGENT: 7, c.Lane.NORMAL: 90, c.Lane.BULK: 33}
    consumers = {lane: gw.worker(name, lane)._consumer for lane in c.LANES}
    await asyncio.gather(*(consumer.resize(wanted[lane]) for lane, consumer in consumers.items() if consumer))
    queues = {c.account_queue(name, lane): lane for lane in c.LANES}
    rows = consumers_of(set(queues))
    assert {queues[str(r["queue_name"])]: r["prefetch_count"] for r in rows} == wanted
    assert len(rows) == 3
    assert len({r["channel_pid"] for r in rows}) == 1
    async with Bus.open([name]) as bus:
        for lane in c.LANES:
            await bus.publish(c.lane_key(name, lane), request(f"{name}-{lane}"))
        await bus.wait_for(outcomes=3)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 3}


async def test_an_account_whose_queues_the_broker_refuses_keeps_itself_out_not_the_others(
    world: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone made one account's bulk queue by hand, without the contract's arguments: the broker
    refuses the gateway's declaration (406). That account is not consumed and /readyz says why;
    the others start and send. Once the queue is deleted, the account comes up by itself."""
    monkeypatch.setattr(app_module, "REFUSED_RETRY_S", 0.3)
    bad, good = new_account_name(), new_account_name()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(c.account_queue(bad, c.Lane.BULK), durable=True)
    gw = await world.gateway([world.account(bad), world.account(good)])
    problems = await gw.problems()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"account {bad}: the broker refused its queues: PRECONDITION_FAILED")
    assert {w.account.name for w in gw.workers} == {good}
    async with Bus.open([good]) as bus:
        await bus.publish(good, request(f"{good}-1"))
        await bus.wait_for(outcomes=1)
        assert [d["status"] for d in bus.outcome_docs()] == ["accepted"]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(c.account_queue(bad, c.Lane.BULK))
    await eventually(_ready(gw), 15, "the account consuming once its queue was deleted")
    assert sorted(w.lane for w in gw.workers if w.account.name == bad) == sorted(c.LANES)
    async with Bus.open([bad]) as bus:
        await bus.publish(f"{bad}.bulk", request(f"{bad}-1"))
        await bus.wait_for(outcomes=1)
        assert [d["status"] for d in bus.outcome_docs()] == ["accepted"]


def _ready(gw: Gateway) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        return await gw.problems() == []

    return ready
