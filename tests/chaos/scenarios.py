"""Chaos scenarios. Each one builds its world, publishes, breaks one thing mid-run, lets the system
recover by itself, and returns the ledger. `Size` scales them: `CI` runs inside `make test`,
`FULL` is `make chaos`."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx

from gateway import contract as c
from gateway.bus import topology
from gateway.config import Account
from gateway.core import budgets
from gateway.providers.base import provider_ref
from gateway.state.redis import RedisStore
from testkit import start_sandbox as start_sandbox_process
from testkit.netcut import NetCut
from testkit.redis_ha import RedisSentinels
from tests.chaos.harness import RETRY_SCHEDULE_S, Ledger, RabbitNode, RedisServer, World, request_body


@dataclass(frozen=True)
class Size:
    name: str
    messages: int  # per scenario
    kill9_messages: int
    replicas: int
    kills: int
    noisy_backlog: int


CI = Size("ci", messages=600, kill9_messages=1500, replicas=2, kills=2, noisy_backlog=3000)
FULL = Size("full", messages=3000, kill9_messages=20000, replicas=3, kills=6, noisy_backlog=100_000)

Scenario = Callable[[Path, list[RabbitNode], RedisServer, Size], Awaitable[Ledger]]


def _account(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


async def _world(
    root: Path,
    nodes: list[RabbitNode],
    redis_server: RedisServer,
    accounts: list[str],
    replicas: int,
    settings: dict[str, object] | None = None,
    **acc: object,
) -> World:
    world = World(root, nodes[0], redis_server, accounts)
    world.settings.update(settings or {})
    for name in accounts:
        world.account_overrides[name] = dict(acc)
    world.start_sandbox()
    await world.start_observer()
    for i in range(replicas):
        await asyncio.to_thread(world.start_gateway, i)
    return world


async def _break(
    world: World, fault: Callable[[World], None], hold_s: float, heal: Callable[[World], None] | None
) -> float:
    """Apply the fault, hold it, heal it; returns when the fault ended (recovery counts from there)."""
    await asyncio.to_thread(fault, world)
    if hold_s:
        await asyncio.sleep(hold_s)
    if heal is not None:
        await asyncio.to_thread(heal, world)
    return time.monotonic()


def _items(account: str, prefix: str, n: int) -> list[tuple[str, str, bytes]]:
    return [(account, f"{prefix}{i}", request_body(f"{prefix}{i}", i)) for i in range(n)]


async def _finish(world: World, name: str, settle_timeout: float) -> Ledger:
    await world.wait_settled(settle_timeout)
    led = world.ledger(name)
    await world.close()
    return led


async def kill9(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """kill -9 of replicas at random moments, each restarted at once."""
    account = _account("k")
    # The shared rate keeps the drain long enough for the kills to land mid-flight.
    rate = max(200, size.kill9_messages // 12)
    world = await _world(root, nodes, redis_server, [account], size.replicas, rate_per_s=rate, burst=rate // 4)
    await world.publish(_items(account, "k", size.kill9_messages))
    last = time.monotonic()
    for _ in range(size.kills):
        await asyncio.sleep(world.rng.uniform(0.5, 2.5))
        victim = world.rng.choice(sorted(world.gateways))
        last = time.monotonic()
        world.kill(victim)
        await asyncio.to_thread(world.start_gateway, victim)  # as Kubernetes would restart it
    recovered = await world.wait_recovered(last, 60)
    led = await _finish(world, f"kill -9 x{size.kills} ({size.replicas} replicas)", 240)
    led.recovered_s = recovered
    return led


async def budget_kill9(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """kill -9 of replicas and a broker close while a daily budget of half the requests' parts
    runs out: no more than the budget is accepted, and the store's count of it is exactly what the
    provider's ledger holds (no hold of a killed replica counted twice, none leaked)."""
    account = _account("b")
    n = size.kill9_messages
    budget = n // 2  # every request is one part
    rate = max(200, n // 12)
    world = await _world(
        root,
        nodes,
        redis_server,
        [account],
        size.replicas,
        rate_per_s=rate,
        burst=rate // 4,
        budget_parts_per_day=budget,
    )
    await world.publish(_items(account, "b", n))
    for _ in range(size.kills):
        await asyncio.sleep(world.rng.uniform(0.5, 2.5))
        victim = world.rng.choice(sorted(world.gateways))
        world.kill(victim)
        await asyncio.to_thread(world.start_gateway, victim)
    await asyncio.to_thread(world.rabbit.ctl, "close_all_connections", "chaos: connections closed")
    last = time.monotonic()
    recovered = await world.wait_recovered(last, 90)
    led = await _finish(world, f"a budget of {budget:,} parts for {n:,}: kill -9 x{size.kills}, a broker close", 240)
    led.recovered_s = recovered
    store = RedisStore(redis_server.url)
    try:
        counters = budgets.counters_for(world_account(account, budget), None, time.time())
        (counted,) = await store.budget_use(account, counters)
    finally:
        await store.close()
    # What the provider holds: accepted, plus failed ones that may have gone out (none expected).
    sent = led.accepted + led.failed
    led.over_budget = max(0, led.accepted - budget) + abs(counted - sent)
    led.extra["budget_counted"] = counted
    led.notes.append(f"budget {budget}: {led.accepted} accepted, the store counted {counted}, {led.rejected} refused")
    return led


def world_account(name: str, budget: int) -> Account:
    """The account as the scenario configured it, for the budget's counter names."""
    return Account(name=name, provider="serwersms", base_url="http://x.invalid", token="t", budget_parts_per_day=budget)  # type: ignore[arg-type]


async def lanes(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """One account's three lanes (requests spread over urgent, normal and bulk) under kill -9 of
    replicas at random moments and a broker that closes every connection."""
    account = _account("l")
    rate = max(200, size.kill9_messages // 12)
    world = await _world(root, nodes, redis_server, [account], size.replicas, rate_per_s=rate, burst=rate // 4)
    spread = [
        (c.lane_key(account, c.LANES[i % 3]), u, b)
        for i, (_a, u, b) in enumerate(_items(account, "l", size.kill9_messages))
    ]
    await world.publish(spread)
    for _ in range(size.kills):
        await asyncio.sleep(world.rng.uniform(0.5, 2.5))
        victim = world.rng.choice(sorted(world.gateways))
        world.kill(victim)
        await asyncio.to_thread(world.start_gateway, victim)  # as Kubernetes would restart it
    await asyncio.sleep(world.rng.uniform(0.5, 1.5))
    await asyncio.to_thread(world.rabbit.ctl, "close_all_connections", "chaos: connections closed")
    last = time.monotonic()
    recovered = await world.wait_recovered(last, 90)
    consumers_back = await asyncio.to_thread(_consumers_back, nodes[0], [account])
    led = await _finish(world, f"three lanes: kill -9 x{size.kills} and a broker close", 240)
    led.recovered_s = recovered
    led.consumers_restored = consumers_back
    return led


async def sigterm(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """SIGTERM of one replica under load: it drains and exits 0; it is started again."""
    account = _account("t")
    rate = max(200, size.messages // 6)
    world = await _world(root, nodes, redis_server, [account], 2, rate_per_s=rate, burst=rate // 4)
    await world.publish(_items(account, "t", size.messages))
    await asyncio.sleep(1.0)
    code = await asyncio.to_thread(world.terminate, 0)
    await asyncio.to_thread(world.start_gateway, 0)
    since = time.monotonic()
    recovered = await world.wait_recovered(since, 60)
    led = await _finish(world, "SIGTERM under load", 120)
    led.recovered_s = recovered
    if code != 0:
        led.consumers_restored = False
        led.notes.append(f"SIGTERM exit code {code}")
    return led


async def _broker_fault(
    name: str,
    fault: Callable[[World], None],
    heal: Callable[[World], None] | None,
    root: Path,
    nodes: list[RabbitNode],
    redis_server: RedisServer,
    size: Size,
    hold_s: float = 0.0,
    settings: dict[str, object] | None = None,
) -> Ledger:
    account, ghost = _account("b"), _account("ghost")
    rate = max(200, size.messages // 6)
    world = await _world(root, nodes, redis_server, [account], 2, settings, rate_per_s=rate, burst=rate // 4)
    first = _items(account, "b", size.messages // 2)
    await world.publish(first)
    await asyncio.sleep(1.0)
    since = await _break(world, fault, hold_s, heal)
    # After the fault: the rest, and a request for an unknown account (the unroutable consumer).
    second = _items(account, "a", size.messages - len(first))
    await world.publish([*second, (ghost, "g0", request_body("g0", 0))])
    recovered = await world.wait_recovered(since, 90)
    consumers_back = await asyncio.to_thread(_consumers_back, nodes[0], [account])
    led = await _finish(world, name, 180)
    led.recovered_s = recovered
    led.consumers_restored = consumers_back
    return led


def _consumers_back(node: RabbitNode, accounts: list[str], timeout: float = 30) -> bool:
    """The broker's own view: a consumer on each account queue and on the unroutable queue."""
    want = {c.account_queue(a, lane) for a in accounts for lane in c.LANES} | {c.UNROUTABLE_QUEUE}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = json.loads(node.ctl("list_consumers", "-q", "queue_name", "--formatter", "json"))
        have = {r["queue_name"] for r in rows}
        if want <= have:
            return True
        time.sleep(1)
    return False


async def broker_close(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    def fault(w: World) -> None:
        w.rabbit.ctl("close_all_connections", "chaos: connections closed")

    return await _broker_fault("broker close_all_connections", fault, None, root, nodes, redis_server, size)


async def broker_restart(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    def fault(w: World) -> None:
        w.rabbit.ctl("stop_app")

    def heal(w: World) -> None:
        w.rabbit.ctl("start_app")

    return await _broker_fault("broker restart (stop_app/start_app)", fault, heal, root, nodes, redis_server, size, 3)


async def memory_alarm(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    def fault(w: World) -> None:
        w.rabbit.ctl("set_vm_memory_high_watermark", "0.000001")

    def heal(w: World) -> None:
        w.rabbit.ctl("set_vm_memory_high_watermark", "0.4")

    return await _broker_fault("broker memory alarm (5 s)", fault, heal, root, nodes, redis_server, size, 5)


async def _redis_fault(
    name: str,
    fault: Callable[[World], None],
    root: Path,
    nodes: list[RabbitNode],
    redis_server: RedisServer,
    size: Size,
    swallow: float = 0.0,
    settings: dict[str, object] | None = None,
    heal: Callable[[World], None] | None = None,
    hold_s: float = 0.0,
) -> Ledger:
    account = _account("r")
    rate = max(200, size.messages // 6)
    world = await _world(root, nodes, redis_server, [account], 2, settings, rate_per_s=rate, burst=rate // 4)
    assert world.sandbox is not None
    if swallow:
        world.sandbox.fault(match=f"token:tok-{account}", swallow=True, rate=swallow)
    await world.publish(_items(account, "r", size.messages))
    await asyncio.sleep(1.5)
    since = await _break(world, fault, hold_s, heal)
    if swallow:
        await asyncio.sleep(3)
        world.sandbox.clear_faults()
    recovered = await world.wait_recovered(since, 90)
    led = await _finish(world, name, 240)
    led.recovered_s = recovered
    return led


async def redis_empty(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _redis_fault(
        "Redis restarted empty", lambda w: w.redis.restart_empty(), root, nodes, redis_server, size
    )


async def redis_empty_swallow(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _redis_fault(
        "Redis restarted empty + 30% answers lost",
        lambda w: w.redis.restart_empty(),
        root,
        nodes,
        redis_server,
        size,
        swallow=0.3,
    )


async def redis_pause(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _redis_fault("Redis paused 5 s", lambda w: w.redis.pause(5), root, nodes, redis_server, size)


def _in_loop(loop: asyncio.AbstractEventLoop, act: Callable[[], None]) -> Callable[[World], None]:
    """A fault step run from a worker thread that acts on something living in the scenario's loop."""

    def step(_world: World) -> None:
        loop.call_soon_threadsafe(act)

    return step


async def broker_cut(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """The network to the broker cut the way a lost node cuts it (testkit.netcut): connections stay
    open, nothing answers, no reset. Only the heartbeat (the gateway's default) can tell."""
    loop = asyncio.get_running_loop()
    async with NetCut(nodes[0].port) as cut:
        return await _broker_fault(
            "broker unreachable 5 s (no reset: a lost node)",
            _in_loop(loop, cut.drop),
            _in_loop(loop, cut.heal),
            root,
            nodes,
            redis_server,
            size,
            5,
            {"amqp_url": f"amqp://guest:guest@127.0.0.1:{cut.port}/"},
        )


async def redis_cut(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """The network to Redis cut the same way; GATEWAY_REDIS_TIMEOUT_S (its default) notices."""
    loop = asyncio.get_running_loop()
    async with NetCut(redis_server.port) as cut:
        return await _redis_fault(
            "Redis unreachable 5 s (no reset: a lost node)",
            _in_loop(loop, cut.drop),
            root,
            nodes,
            redis_server,
            size,
            settings={"redis_url": f"redis://127.0.0.1:{cut.port}/0"},
            heal=_in_loop(loop, cut.heal),
            hold_s=5,
        )


async def failover(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """The primary provider (SerwerSMS) swallows a tenth of its answers after sending, then dies
    (connections reset, new ones refused) and comes back; a replica is killed -9 during the
    failover. The backup account (Mobizon, a sandbox of its own) takes what provably never reached
    the primary. Counted across both providers' ledgers: nothing sent twice, nothing lost."""
    home, other = _account("f"), _account("fb")
    n = 5000 if size.name == "full" else 1000
    rate = max(100, n // 8)
    world = World(root, nodes[0], redis_server, [home, other])
    world.settings.update({"failover.open_s": 2.0, "failover.failures": 3})
    world.start_sandbox()
    assert world.sandbox is not None
    backup_proc, backup = start_sandbox_process(root)
    cut = await NetCut(world.sandbox.port).start()
    try:
        limits = {"rate_per_s": rate, "burst": rate // 4}
        world.account_overrides[home] = {
            **limits,
            "base_url": f"http://127.0.0.1:{cut.port}",
            "failover_to": [other],
        }
        world.account_overrides[other] = {
            **limits,
            "provider": "mobizon",
            "base_url": backup.url,
            "token": None,
            "api_key": f"key-{other}",
        }
        await world.start_observer()
        for i in range(size.replicas):
            await asyncio.to_thread(world.start_gateway, i)
        world.sandbox.fault(match=f"token:tok-{home}", swallow=True, rate=0.1)
        await world.publish(_items(home, "f", n))
        await asyncio.sleep(2.0)
        await cut.refuse()  # the primary dies, with swallowed answers not yet reconciled
        down_at = time.monotonic()
        await asyncio.sleep(1.5)
        victim = world.rng.choice(sorted(world.gateways))
        world.kill(victim)  # a replica dies mid-failover
        await asyncio.to_thread(world.start_gateway, victim)
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - down_at)))
        swallowed = sum(f["fired"] for f in world.sandbox.faults())
        world.sandbox.clear_faults()
        await cut.listen()  # back: the swallowed ones are reconciled with it, traffic fails back
        last = time.monotonic()
        recovered = await world.wait_recovered(last, 90)
        await world.wait_settled(240)
        led = world.ledger(f"primary provider: 10% answers lost, down 5 s, kill -9 of a replica ({n:,} requests)")
        led.recovered_s = recovered
        primary_sends = world.sandbox.ledger()["by_unique_id"]
        backup_sends = backup.ledger()["by_recipient"]
        # The ledger above counted the primary's sends only: add the backup's, and count again.
        led.sent_twice = 0
        led.notes = [x for x in led.notes if "accepted but the provider has no send" not in x]
        accepted = world.accepted_keys()
        moved = 0
        for i in range(n):
            uid = f"f{i}"
            at_primary = int(primary_sends.get(provider_ref(home, uid), 0))
            at_backup = int(backup_sends.get(f"4851{i % 10_000_000:07d}", 0))
            moved += at_backup
            if at_primary + at_backup > 1:
                led.sent_twice += 1
            if f"{home}/{uid}" in accepted and at_primary + at_backup == 0:
                led.lost += 1  # an `accepted` that neither provider holds
                led.notes.append(f"{home}/{uid} accepted but neither provider has a send")
        led.extra.update({"sent_via_backup": moved, "swallowed": swallowed})
        led.notes.append(f"{moved} sent through the backup account; the primary swallowed {swallowed} answers")
        if moved == 0:
            led.notes.append("nothing moved to the backup: the failover was not exercised")
            led.lost += 1
    finally:
        await world.close()
        await cut.close()
        backup_proc.close()
    return led


async def provider_faults(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """Hangs, 5xx, resets and swallowed answers on a share of the provider calls, for a while."""
    account = _account("p")
    rate = max(200, size.messages // 6)
    world = await _world(root, nodes, redis_server, [account], 2, rate_per_s=rate, burst=rate // 4)
    assert world.sandbox is not None
    who = f"token:tok-{account}"
    for rule in ({"hang": True}, {"http_status": 503}, {"reset": True}, {"swallow": True}):
        world.sandbox.fault(match=who, rate=0.1, **rule)
    await world.publish(_items(account, "p", size.messages))
    await asyncio.sleep(4)
    fired = httpx.get(f"{world.sandbox.url}/_sandbox/faults", timeout=10).json()
    world.sandbox.clear_faults()
    since = time.monotonic()
    recovered = await world.wait_recovered(since, 90)
    led = await _finish(world, "provider hangs, 503, resets, lost answers (10% each)", 240)
    led.recovered_s = recovered
    led.notes.append("faults fired: " + ", ".join(f"{_fault_name(f)} {f['fired']}" for f in fired))
    return led


async def mobizon_throttle(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """A code-30 storm: the Mobizon account is configured faster than the provider allows, so it is
    throttled under load; the account slows down (AIMD), nothing is lost or sent twice."""
    account = _account("m")
    world = World(root, nodes[0], redis_server, [account])
    world.by_recipient.add(account)
    world.account_overrides[account] = {
        "provider": "mobizon",
        "api_key": f"key-{account}",
        "token": None,
        "rate_per_s": 400,
        "burst": 100,
        "batch_size": 10,  # small groups: concurrent single sends, each one rate-limited by Mobizon
    }
    world.start_sandbox()
    assert world.sandbox is not None
    httpx.post(f"{world.sandbox.url}/_sandbox/config", json={"mobizon_rate_per_s": 60}, timeout=10).raise_for_status()
    await world.start_observer()
    for i in range(2):
        await asyncio.to_thread(world.start_gateway, i)
    n = size.messages // 3
    await world.publish([(account, f"m{i}", request_body(f"m{i}", i, text=f"code {i} for you")) for i in range(n)])
    since = time.monotonic()
    recovered = await world.wait_recovered(since, 60)
    led = await _finish(world, "Mobizon code-30 storm (provider limit below the account's rate)", 300)
    led.recovered_s = recovered
    return led


# Delivery reports on, and soon: the sandbox ends each message 1-4 s after its send, the gateways
# poll 1 s after acceptance and then every 2 s at most.
DLR_SETTINGS: dict[str, object] = {"dlr_poll_after_s": 1.0, "dlr_poll_max_gap_s": 2.0}


async def _dlr_fault(
    name: str,
    fault: Callable[[World], None],
    heal: Callable[[World], None] | None,
    hold_s: float,
    root: Path,
    nodes: list[RabbitNode],
    redis_server: RedisServer,
    size: Size,
    *,
    provider_latency_ms: float = 0.0,
) -> Ledger:
    """A fault while delivery reports flow: every accepted SMS must still end in exactly one
    delivery event, and no request of the gateway's own may be answered `duplicate`."""
    account = _account("d")
    rate = max(200, size.messages // 6)
    acc: dict[str, object] = {"rate_per_s": rate, "burst": rate // 4}
    if provider_latency_ms:
        acc["http_timeout_s"] = 3 * provider_latency_ms / 1000
    world = await _world(root, nodes, redis_server, [account], 2, DLR_SETTINGS, **acc)
    world.check_reports = True
    assert world.sandbox is not None
    world.sandbox.configure(dlr={"delay_s": 1.0, "jitter_s": 3.0})
    if provider_latency_ms:
        world.sandbox.fault(match=f"token:tok-{account}", latency_ms=provider_latency_ms, rate=0.5)
    await world.publish(_items(account, "d", size.messages))
    await asyncio.sleep(2.5)  # sends under way, and the first reports polled
    since = await _break(world, fault, hold_s, heal)
    world.sandbox.clear_faults()
    recovered = await world.wait_recovered(since, 120)
    await world.wait_settled(240)
    await world.wait_reports(120)
    led = world.ledger(name)
    await world.close()
    led.recovered_s = recovered
    return led


async def dlr_redis_pause(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _dlr_fault(
        "reports on: Redis CLIENT PAUSE 20 s", lambda w: w.redis.pause(20), None, 20, root, nodes, redis_server, size
    )


async def dlr_redis_stop(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _dlr_fault(
        "reports on: Redis stopped (SIGSTOP) 20 s",
        lambda w: w.redis.stop(),
        lambda w: w.redis.cont(),
        20,
        root,
        nodes,
        redis_server,
        size,
    )


async def dlr_redis_empty(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _dlr_fault(
        "reports on: Redis restarted empty", lambda w: w.redis.restart_empty(), None, 0, root, nodes, redis_server, size
    )


async def dlr_broker_close(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    def fault(w: World) -> None:
        w.rabbit.ctl("close_all_connections", "chaos: connections closed")

    return await _dlr_fault(
        "reports on: broker connections closed during 2 s provider calls",
        fault,
        None,
        0,
        root,
        nodes,
        redis_server,
        size,
        provider_latency_ms=2000,
    )


async def _sentinel_failover(
    name: str, schedule: list[float] | None, root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size
) -> Ledger:
    """Redis behind Sentinel (a master, a replica, three Sentinels); the master is killed (-9)
    while claims are in flight, 10% of the provider's answers are lost after it took the message
    and every answer takes 300 ms; Sentinel promotes the replica. The default claim lease (60 s):
    claims the failover orphaned must be waited out, not failed as waits_exhausted."""
    ha_root = root / f"sentinel-{secrets.token_hex(3)}"
    ha_root.mkdir(parents=True)
    ha = RedisSentinels(ha_root)
    await asyncio.to_thread(ha.start)
    try:
        account = _account("s")
        settings: dict[str, object] = {"redis_url": ha.url, "claim_lease_s": 60}
        if schedule is not None:
            settings["retry_schedule_s"] = schedule
        rate = max(200, size.messages // 6)
        world = await _world(root, nodes, redis_server, [account], 2, settings, rate_per_s=rate, burst=rate // 4)
        assert world.sandbox is not None
        who = f"token:tok-{account}"
        world.sandbox.fault(match=who, latency_ms=300)
        world.sandbox.fault(match=who, swallow=True, rate=0.1)
        await world.publish(_items(account, "s", size.messages))
        await asyncio.sleep(2.0)
        master = ha.master_port()
        ha.procs[0].kill()  # the first server started is the master
        since = time.monotonic()
        await asyncio.to_thread(_wait_promoted, ha, master)
        await asyncio.sleep(3)
        world.sandbox.clear_faults()
        recovered = await world.wait_recovered(since, 180)
        led = await _finish(world, name, 300)
        led.recovered_s = recovered
        led.failed_allowed = False
        led.notes.append(f"master :{master} killed; promoted :{ha.master_port()}")
        return led
    finally:
        ha.stop()


def _wait_promoted(ha: RedisSentinels, old: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ha.master_port() == old:
        if time.monotonic() > deadline:
            raise RuntimeError("Sentinel promoted no replica")
        time.sleep(0.2)


async def sentinel_failover(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _sentinel_failover(
        "Sentinel failover (master kill -9), default retry schedule", None, root, nodes, redis_server, size
    )


async def sentinel_failover_short(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    return await _sentinel_failover(
        "Sentinel failover (master kill -9), retry schedule 1,1,2 s", [1, 1, 2], root, nodes, redis_server, size
    )


def _fault_name(rule: dict[str, object]) -> str:
    return next((k for k in ("hang", "reset", "swallow") if rule.get(k)), f"http {rule.get('http_status')}")


HOSTILE: dict[str, bytes] = {
    "surrogate-text": b'{"unique_id":"X","to":"+48500600700","text":"\\ud800 x"}',
    "surrogate-meta": b'{"unique_id":"X","to":"+48500600700","text":"x","meta":{"k":"\\ud800"}}',
    "deep": b'{"unique_id":"X","to":"1","text":"x","meta":' + b"[" * 400 + b"]" * 400 + b"}",
    "bracket-bomb": b"[" * 60_000,
    "digits": b'{"unique_id":"X","to":"1","text":"x","v":' + b"7" * 5000 + b"}",
    "nan": b'{"unique_id":"X","to":"+48500600700","text":"{a}","vars":{"a":NaN}}',
    "format-spec": b'{"unique_id":"X","to":"+48500600700","text":"{a:>2000000}","vars":{"a":1}}',
    "far-future": b'{"unique_id":"X","to":"+48500600700","text":"x","expires_at":"9999-12-31T23:59:59-14:00"}',
    "not-json": b"\xff\xfe not json",
}


async def poison(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """Hostile bodies mixed into normal traffic, to a configured account and to an unknown one."""
    account, ghost = _account("x"), _account("ghost")
    world = await _world(root, nodes, redis_server, [account], 2, linger_ms=200)
    good = _items(account, "x", size.messages)
    bad = []
    for n, (kind, body) in enumerate(HOSTILE.items()):
        for target in (account, ghost):
            uid = f"{kind}-{target}-{n}"
            bad.append((target, uid, body.replace(b'"X"', json.dumps(uid).encode())))
    mixed = good[: len(good) // 2] + bad + good[len(good) // 2 :]
    await world.publish(mixed, message_ids=True)
    since = time.monotonic()
    recovered = await world.wait_recovered(since, 60)
    led = await _finish(world, "poison messages", 120)
    led.recovered_s = recovered
    expected_invalid = len(bad)
    if led.invalid != expected_invalid or led.accepted != len(good):
        led.notes.append(f"expected {len(good)} accepted and {expected_invalid} invalid")
    return led


async def noisy_neighbour(
    root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size, *, fair: bool = True
) -> Ledger:
    """An account with a large backlog beside a quiet one: the quiet one's latency (p99), with the
    process's fair admission on (`fair`) or off, the baseline of the same run."""
    noisy, quiet = _account("n"), _account("q")
    world = World(root, nodes[0], redis_server, [noisy, quiet])
    world.settings["fair_admission"] = fair
    world.account_overrides[noisy] = {"rate_per_s": 3000, "burst": 3000}
    world.start_sandbox()
    await world.start_observer()
    await world.publish(_items(noisy, "n", size.noisy_backlog))  # the backlog is there before any gateway
    for i in range(2):
        await asyncio.to_thread(world.start_gateway, i)
    # Measured from when both replicas say they are ready (every consumer started): a request
    # that waits for a replica's start-up is not waiting for its neighbour.
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(world.all_ready):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateways did not get ready within 60 s")
        await asyncio.sleep(0.1)
    n_quiet = 100 if size is CI else 1000  # one every 50 ms: within the full backlog's minute of drain
    world.keys |= {f"{quiet}/q{i}" for i in range(n_quiet)}  # published by the probe, settled in the ledger too
    # The quiet account's producer is a process of its own with its own outcome queue (probe.py).
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.chaos.probe",
        world.rabbit.url,
        quiet,
        "q",
        str(n_quiet),
        "0.05",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await probe.communicate()
    admission = "fair admission" if fair else "no fair admission"
    name = f"noisy neighbour ({size.noisy_backlog:,} backlog) beside a quiet account, {admission}"
    led = await _finish(world, name, 600)
    answered = [x for x in json.loads(out)["latency_ms"] if x is not None] if probe.returncode == 0 else []
    lat = sorted(answered)
    if lat:
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        led.extra["quiet_p50_ms"] = round(lat[len(lat) // 2], 1)
        led.extra["quiet_p99_ms"] = round(p99, 1)
        led.notes.append(f"quiet account latency p50 {lat[len(lat) // 2]:.0f} ms, p99 {p99:.0f} ms")
        doc = json.loads(out)
        latencies, back = doc["latency_ms"], doc["back_ms"]
        slowest = sorted((x, i) for i, x in enumerate(latencies) if x is not None)[-10:][::-1]
        # When in the run the slowest ones were published (a start-up stall and a steady tail
        # differ), and how much of each came after the gateway wrote its outcome.
        led.notes.append(
            "slowest: "
            + ", ".join(f"{x:.0f} ms at {i * 0.05:.1f} s ({back[i] or 0:.0f} ms after the outcome)" for x, i in slowest)
        )
    if len(answered) != n_quiet:
        led.notes.append(f"the quiet producer saw {len(answered)} of {n_quiet} outcomes")
    return led


async def cluster_failover(root: Path, nodes: list[RabbitNode], redis_server: RedisServer, size: Size) -> Ledger:
    """Three nodes; the account queue's leader on node 2, the gateways connected to node 1; node 2 is
    stopped mid-run and started again after."""
    assert len(nodes) >= 3, "the cluster scenario needs three nodes"
    account = _account("c")
    # Declared through node 2 first, so the quorum queue's leader lives there.
    connection = await aio_pika.connect(nodes[1].url)
    async with connection:
        await topology.declare(await connection.channel(), [account], RETRY_SCHEDULE_S)
    rate = max(200, size.messages // 6)
    world = await _world(root, nodes, redis_server, [account], 2, DLR_SETTINGS, rate_per_s=rate, burst=rate // 4)
    world.check_reports = True  # delivery events through the failover too, and no own copy answered duplicate
    await world.publish(_items(account, "c", size.messages))
    await asyncio.sleep(1.5)
    leaders = json.loads(nodes[0].ctl("list_queues", "-q", "name", "leader", "--formatter", "json"))
    leader = next(r["leader"] for r in leaders if r["name"] == c.account_queue(account))
    await asyncio.to_thread(nodes[1].ctl, "stop_app")
    since = time.monotonic()
    recovered = await world.wait_recovered(since, 90)
    await world.wait_settled(240)
    await world.wait_reports(120)
    led = world.ledger("3-node cluster, queue leader's node stopped")
    await world.close()
    await asyncio.to_thread(nodes[1].ctl, "start_app")
    led.recovered_s = recovered
    led.notes.append(f"queue leader was on {leader}, stopped node {nodes[1].node}")
    if leader != nodes[1].node:
        led.consumers_restored = False
        led.notes.append("the leader was not on the stopped node: the scenario did not test a failover")
    return led


SINGLE_NODE: dict[str, Scenario] = {
    "kill9": kill9,
    "sigterm": sigterm,
    "broker_close": broker_close,
    "broker_restart": broker_restart,
    "memory_alarm": memory_alarm,
    "broker_cut": broker_cut,
    "redis_pause": redis_pause,
    "redis_empty": redis_empty,
    "redis_empty_swallow": redis_empty_swallow,
    "redis_cut": redis_cut,
    "provider_faults": provider_faults,
    "mobizon_throttle": mobizon_throttle,
    "poison": poison,
    "noisy_neighbour_unfair": functools.partial(noisy_neighbour, fair=False),
    "noisy_neighbour": noisy_neighbour,
    "lanes": lanes,
    "budget_kill9": budget_kill9,
    "failover": failover,
    "dlr_redis_pause": dlr_redis_pause,
    "dlr_redis_stop": dlr_redis_stop,
    "dlr_redis_empty": dlr_redis_empty,
    "dlr_broker_close": dlr_broker_close,
    "sentinel_failover": sentinel_failover,
    "sentinel_failover_short": sentinel_failover_short,
}
CLUSTER: dict[str, Scenario] = {"cluster_failover": cluster_failover}
CI_SCENARIOS = [
    "kill9",
    "lanes",
    "budget_kill9",
    "failover",
    "broker_close",
    "broker_restart",
    "redis_empty",
    "poison",
    "dlr_redis_pause",
    "dlr_redis_empty",
    "dlr_broker_close",
    "sentinel_failover_short",
]
