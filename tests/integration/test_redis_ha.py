"""The state store behind Redis Sentinel and in a Redis Cluster, the tests' own deployments: the
gateway runs on both, and a Sentinel failover mid-run sends nothing twice."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.sandbox.state import FaultRule
from testkit import Bus, new_account_name, redis_ha, request, services
from testkit.redis_ha import RedisCluster, RedisSentinels
from testkit.services import bindable, free_ports, port_open
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


def test_a_port_held_by_an_outgoing_connection_is_not_free(tmp_path: Path) -> None:
    """CI once lost the Cluster because a node's port was the local end of an outgoing connection:
    nothing listened there, so a connect test called it free, and `redis-server` could not bind it."""
    with socket.create_connection(("127.0.0.1", 6379)) as held:
        port = held.getsockname()[1]
        assert not port_open(port)
        assert not bindable(port)
        assert all(p < port for p in free_ports(5, offset=10000))  # below the ephemeral range
    # closed by this side first, it lingers in TIME_WAIT, and still cannot be bound for a minute
    assert not bindable(port)


def test_a_server_that_cannot_bind_costs_a_retry_not_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = socket.create_connection(("127.0.0.1", 6379))
    taken = held.getsockname()[1]
    calls: list[list[int]] = []

    def ports_first_taken(n: int, offset: int = 0) -> list[int]:
        ports = services.free_ports(n, offset)
        if not calls:
            ports[-1] = taken
        calls.append(ports)
        return ports

    monkeypatch.setattr(redis_ha, "free_ports", ports_first_taken)
    deployment = RedisSentinels(tmp_path)
    try:
        deployment.start()
        assert len(calls) == 2
        assert taken not in calls[1]
        assert f"127.0.0.1:{taken}" not in deployment.url
        assert "Address already in use" in (tmp_path / "redis-4.log").read_text()  # the first try's sentinel
        assert deployment.master_port() == calls[1][0]
    finally:
        deployment.stop()
        held.close()
