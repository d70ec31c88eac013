"""Gateway and sandbox as separate processes: replicas sharing Redis, kill -9, SIGTERM, rate limits."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from gateway.providers.base import provider_ref
from testkit import (
    REDIS_URL,
    Bus,
    Process,
    Sandbox,
    account_doc,
    eventually,
    new_account_name,
    request,
    start_gateway,
)
from testkit.netcut import NetCut

pytestmark = pytest.mark.e2e


def by_uid(bus: Bus) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for doc in bus.outcome_docs():
        out[doc["unique_id"]].append(doc["status"])
    return out


async def test_same_id_three_times_through_two_replicas_sends_once(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    # Latency keeps the first send in flight while the other copies arrive at the other replica.
    sandbox.fault(match=f"token:tok-{name}", latency_ms=300)
    acc = [account_doc(name, sandbox.port, linger_ms=0)]
    for i in range(2):
        proc, _ = start_gateway(tmp_path / f"g{i}", acc, redis_url=REDIS_URL, retry_schedule_s=[0.2])
        procs.append(proc)
    async with Bus.open([name]) as bus:
        await asyncio.gather(*(bus.publish(name, request("same-id")) for _ in range(3)))
        await bus.wait_for(outcomes=3, timeout=30)
        await bus.settle(1.0)
    statuses = Counter(d["status"] for d in bus.outcome_docs())
    assert statuses == {"accepted": 1, "duplicate": 2}
    assert sandbox.sends_of(name, "same-id") == 1
    dup = next(d for d in bus.outcome_docs() if d["status"] == "duplicate")
    assert dup["original"]["status"] == "accepted"


async def test_kill_9_with_500_in_flight_then_restart(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    sandbox.fault(match=f"token:tok-{name}", latency_ms=150, jitter_ms=100)
    acc = [account_doc(name, sandbox.port, batch_size=20, concurrency=4, linger_ms=20)]
    settings = {"redis_url": REDIS_URL, "claim_lease_s": 2, "retry_schedule_s": [0.5]}
    first, _ = start_gateway(tmp_path / "a", acc, **settings)
    procs.append(first)
    uids = [f"k{i}" for i in range(500)]
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(u, to=f"+4850070{i:04d}")) for i, u in enumerate(uids)])
        await bus.wait_for(outcomes=100, timeout=60)
        first.kill()  # SIGKILL: no drain, unacked work goes back to the queue
        killed_at = len(bus.outcomes)
        assert killed_at < 500, "the kill came too late to interrupt anything"
        second, _ = start_gateway(tmp_path / "b", acc, **settings)
        procs.append(second)
        deadline = time.monotonic() + 90
        while len(by_uid(bus)) < 500 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await bus.settle(2.0)
    seen = by_uid(bus)
    assert set(seen) == set(uids), f"missing outcomes: {sorted(set(uids) - set(seen))[:10]}"
    # One terminal result per request; a crash between confirm and ack may repeat the same outcome.
    assert {u: set(s) for u, s in seen.items() if set(s) != {"accepted"}} == {}
    ledger = sandbox.ledger()["by_unique_id"]
    counts = Counter(ledger.get(provider_ref(name, u), 0) for u in uids)
    assert counts == {1: 500}, f"sends per request: {counts}"


async def test_two_replicas_share_one_rate_limit(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    warm = new_account_name("warm")
    accounts_cleanup.append(warm)
    rate, burst = 20, 5
    acc = [account_doc(name, sandbox.port, rate_per_s=rate, burst=burst, linger_ms=50), account_doc(warm, sandbox.port)]
    for i in range(2):
        proc, _ = start_gateway(tmp_path / f"r{i}", acc, redis_url=REDIS_URL)
        procs.append(proc)
    async with Bus.open([name, warm]) as bus:
        # Warm both processes' HTTP stacks first (lazy imports), through another account, so the
        # sandbox's clock measures the limiter rather than a cold start.
        await bus.publish_many([(warm, request(f"w{i}")) for i in range(6)])
        await bus.wait_for(outcomes=6)
        bus.outcomes.clear()
        await bus.publish_many([(name, request(f"rl{i}", to=f"+4850080{i:04d}")) for i in range(200)])
        await bus.wait_for(outcomes=200, timeout=60)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 200}
    times = sorted(r["t"] for r in sandbox.ledger()["records"] if r["who"] == f"token:tok-{name}")
    assert len(times) == 200
    # Sliding 1 s windows: never more than one second of rate plus the burst.
    worst = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    # The limiter holds exactly at the moment tokens are granted; the sandbox clocks arrivals, and a
    # request delayed between its grant and its arrival (a busy core) lands closer to the next
    # one. Measured here: 24 on a quiet machine, 27 while another test suite ran alongside. The
    # allowance for that jitter is 10% of the rate; the limiter itself is tested exactly in
    # tests/integration/test_store.py.
    jitter = max(2, round(rate * 0.1))
    assert worst <= rate + burst + jitter, f"{worst} sends in one second"
    observed = (len(times) - burst) / (times[-1] - times[0])
    assert observed >= 0.9 * rate, f"observed {observed:.1f}/s"


def rate_factor(port: int, account: str) -> float:
    """The account's slow-down as one gateway process reports it (1.0 until it has seen one)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = re.search(rf'^sms_rate_factor{{account="{account}"}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 1.0


async def test_a_throttle_slows_the_account_on_every_replica(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    """One replica gets HTTP 429; the account's combined rate at the provider halves, because the
    slow-down lives with the account's bucket in the store, not in the replica that was told."""
    _, sandbox = sandbox_process
    name, warm = new_account_name(), new_account_name("warm")
    accounts_cleanup += [name, warm]
    rate = 60
    acc = [
        account_doc(name, sandbox.port, rate_per_s=rate, burst=5, linger_ms=20, batch_size=10),
        account_doc(warm, sandbox.port),
    ]
    ports = []
    for i in range(2):
        proc, port = start_gateway(tmp_path / f"r{i}", acc, redis_url=REDIS_URL, retry_schedule_s=[0.2])
        procs.append(proc)
        ports.append(port)
    who = f"token:tok-{name}"

    def sent() -> list[float]:
        return sorted(r["t"] for r in sandbox.ledger()["records"] if r["who"] == who)

    async with Bus.open([name, warm]) as bus:
        await bus.publish_many([(warm, request(f"w{i}")) for i in range(6)])
        await bus.wait_for(outcomes=6)
        bus.outcomes.clear()
        await bus.publish_many([(name, request(f"th{i}", to=f"+4850081{i:04d}")) for i in range(600)])
        await eventually(lambda: len(sent()) >= 150, 60, "150 sends (2.5 s at the full rate)")
        sandbox.fault(match=who, http_status=429, count=1)
        await eventually(lambda: not sandbox.faults(), 60, "the 429 answered")
        fired = time.time()
        await asyncio.sleep(0.3)
        factors = [rate_factor(port, name) for port in ports]
        await bus.wait_for(outcomes=600, timeout=90)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 600}
    # Both replicas run slower, also the one that never saw the 429.
    assert all(f < 0.7 for f in factors), factors
    times = sent()
    before = sum(1 for t in times if fired - 1.5 <= t < fired - 0.5)
    after = sum(1 for t in times if fired <= t < fired + 1.0)
    print(f"throttle: {before} sends/s before, {after} after; factors {factors}")  # shown with -s
    assert before >= 0.8 * rate, f"{before} sends in the second before the throttle"
    # Halved, climbing back 0.1 per second: about 0.55 of the rate over the first second.
    assert after <= 0.7 * before, f"{before} sends in a second before the throttle, {after} after"


async def test_sigterm_while_busy_drains_and_exits_0(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    sandbox.fault(match=f"token:tok-{name}", latency_ms=400)
    acc = [account_doc(name, sandbox.port, batch_size=10, concurrency=2)]
    drain = 10.0
    proc, _ = start_gateway(tmp_path / "s", acc, drain_timeout_s=drain)
    procs.append(proc)
    uids = [f"s{i}" for i in range(300)]
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(u, to=f"+4850090{i:04d}")) for i, u in enumerate(uids)])
        await bus.wait_for(outcomes=20, timeout=30)
        started = time.monotonic()
        code = await asyncio.to_thread(proc.terminate, drain + 10)
        took = time.monotonic() - started
        assert code == 0, proc.log()[-2000:]
        assert took < drain + 2
        assert "gateway_stopped" in proc.log()
        at_stop = len(bus.outcomes)
        assert at_stop < 300, "nothing was left to drain"
        # Whatever the first process did not finish is still queued: a new process finishes it.
        proc2, _ = start_gateway(tmp_path / "s2", acc)
        procs.append(proc2)
        sandbox.clear_faults()
        deadline = time.monotonic() + 60
        while len(by_uid(bus)) < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    seen = by_uid(bus)
    assert set(seen) == set(uids)
    assert all(s == ["accepted"] for s in seen.values()), "a drained request was answered twice"
    ledger = sandbox.ledger()["by_unique_id"]
    assert all(ledger.get(provider_ref(name, u)) == 1 for u in uids)


async def test_sigusr2_logs_what_each_task_waits_on_and_changes_nothing(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    sandbox.fault(match=f"token:tok-{name}", latency_ms=1500)  # provider calls in flight at the dump
    acc = [account_doc(name, sandbox.port, batch_size=10, concurrency=2)]
    proc, _ = start_gateway(tmp_path / "u", acc)
    procs.append(proc)
    uids = [f"u{i}" for i in range(40)]
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(u, to=f"+4850091{i:04d}")) for i, u in enumerate(uids)])
        await asyncio.sleep(1.0)
        proc.popen.send_signal(signal.SIGUSR2)
        await bus.wait_for(outcomes=40, timeout=60)
    assert proc.popen.poll() is None  # still running
    lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    dump = [e for e in lines if e.get("event") == "task_dump"]
    waits = [e for e in lines if e.get("event") == "task_waits"]
    assert len(dump) == 1
    assert sum(e["count"] for e in waits) == dump[0]["tasks"]
    assert any("AccountWorker" in e["chain"] for e in waits), [e["chain"] for e in waits]
    assert not any("4850091" in json.dumps(e) for e in waits)
    assert sorted(by_uid(bus)) == sorted(uids)
    assert all(s == ["accepted"] for s in by_uid(bus).values())


async def test_a_broker_that_vanishes_without_a_word_is_left_within_the_heartbeat(
    tmp_path: Path,
    sandbox_process: tuple[Process, Sandbox],
    procs: list[Process],
    accounts_cleanup: list[str],
) -> None:
    """The network to the broker is cut the way a lost node cuts it (`testkit.netcut`): the
    connection stays open and nothing answers, not even a reset. Only AMQP heartbeats can tell;
    with aiormq's default (60 s, given up after three missed: 183 s) the gateway sat that long
    looking ready. With `amqp_heartbeat_s` it reconnects within about three heartbeats, every
    request goes out once, and a SIGTERM while the broker cannot be reached at all still drains."""
    _, sandbox = sandbox_process
    name = new_account_name()
    accounts_cleanup.append(name)
    async with NetCut(5672) as cut:
        proc, _port = await asyncio.to_thread(  # the proxy runs in this loop: keep it turning
            start_gateway,
            tmp_path / "v",
            [account_doc(name, sandbox.port, linger_ms=20)],
            amqp_url=f"amqp://guest:guest@127.0.0.1:{cut.port}/",
            amqp_heartbeat_s=2,
            publish_timeout_s=5,
            drain_timeout_s=5,
        )
        procs.append(proc)

        async with Bus.open([name]) as bus:
            await bus.publish_many([(name, request(f"a{i}", to=f"+4850072{i:04d}")) for i in range(10)])
            await bus.wait_for(outcomes=10, timeout=30)
            cut.drop()
            await bus.publish_many([(name, request(f"b{i}", to=f"+4850073{i:04d}")) for i in range(10)])
            await asyncio.sleep(1.0)
            cut.heal()  # new connections go through; the one that lived through the cut stays dead
            started = time.monotonic()
            while proc.log().count("consumer_restored") < 2:  # the account's queue and the unroutable one
                assert time.monotonic() - started < 30, "the dead connection was never given up"
                await asyncio.sleep(0.2)
            noticed = time.monotonic() - started + 1.0
            await bus.wait_for(outcomes=20, timeout=60)
            await bus.settle(1.0)
    print(f"consuming again {noticed:.1f} s after the cut")
    final = {d["unique_id"]: d["status"] for d in bus.outcome_docs()}
    assert Counter(final.values()) == {"accepted": 20}
    assert all(sandbox.sends_of(name, u) == 1 for u in final)
    # The proxy is gone: the broker cannot be reached at all. SIGTERM still ends the process.
    code = await asyncio.to_thread(proc.terminate, 60)
    assert code == 0, proc.log()[-2000:]
