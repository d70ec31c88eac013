"""The state store behind Redis Sentinel and in a Redis Cluster, the tests' own deployments: the
gateway runs on both, and a Sentinel failover mid-run sends nothing twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.sandbox.state import FaultRule
from testkit import Bus, new_account_name, request
from testkit.redis_ha import RedisCluster, RedisSentinels
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


async def run_traffic(world: InProcess, name: str, n: int, during: object = None) -> Bus:
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"h{i}", to=f"+4850300{i:04d}")) for i in range(n)])
        if callable(during):
            await bus.wait_for(outcomes=n // 5, timeout=60)
            await during()
        await bus.wait_for(outcomes=n, timeout=120)
        await bus.settle(1.0)
    return bus


def assert_each_sent_once(world: InProcess, bus: Bus, n: int) -> None:
    final = {d["unique_id"]: d["status"] for d in bus.outcome_docs()}
    assert len(final) == n
    assert Counter(final.values()) == {"accepted": n}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
    assert world.state.ledger()["sends"] == n


async def test_a_sentinel_failover_mid_run_sends_nothing_twice(
    world: InProcess, redis_sentinels: RedisSentinels
) -> None:
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", latency_ms=40))  # a run long enough to fail over in
    await world.gateway([world.account(name, batch_size=20, linger_ms=20)], redis_url=redis_sentinels.url)
    before = redis_sentinels.master_port()

    async def failover() -> None:
        redis_sentinels.failover()
        deadline = time.monotonic() + 30
        while redis_sentinels.master_port() == before:
            assert time.monotonic() < deadline, "the Sentinels did not fail over"
            await asyncio.sleep(0.2)

    bus = await run_traffic(world, name, 600, during=failover)
    assert redis_sentinels.master_port() != before
    assert_each_sent_once(world, bus, 600)


async def test_the_gateway_runs_on_a_redis_cluster(world: InProcess, redis_cluster: RedisCluster) -> None:
    names = [new_account_name(), new_account_name(), new_account_name()]  # accounts land on different masters
    await world.gateway([world.account(n, linger_ms=20) for n in names], redis_url=redis_cluster.url)
    async with Bus.open(names) as bus:
        await bus.publish_many([(n, request(f"c{i}", to=f"+4850310{i:04d}")) for n in names for i in range(100)])
        await bus.publish(names[0], request("c0", text="the same id again"))  # dedupe on the cluster
        await bus.wait_for(outcomes=301, timeout=60)
        await bus.settle(0.5)
    statuses = Counter(d["status"] for d in bus.outcome_docs())
    assert statuses == {"accepted": 300, "duplicate": 1}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
