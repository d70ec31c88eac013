"""Faults of the infrastructure and of single messages, against the real broker and Redis:
the broker drops the gateway's connection, the store fails or forgets mid-flight, one message of
a batch cannot be sent or answered, an unknown-account body is hostile."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis.asyncio as aioredis

from gateway import contract as c
from gateway.config import Account
from gateway.providers import build_adapter
from gateway.providers.base import ProviderAdapter, provider_ref
from gateway.sandbox.state import FaultRule
from testkit import (
    REDIS_URL,
    Bus,
    close_broker_connections,
    consumers_on,
    eventually,
    new_account_name,
    request,
)
from testkit.netcut import NetCut
from tests.conftest import InProcess
from tests.fakes import BuggyAdapter, FailingStore

pytestmark = pytest.mark.integration


def sends_of(world: InProcess, account: str, uid: str) -> int:
    return int(world.state.ledger()["by_unique_id"].get(provider_ref(account, uid), 0))


# aiormq leaves the socket of a connection the broker closed to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_consumers_come_back_after_the_broker_closes_the_connection(world: InProcess) -> None:
    name = new_account_name()
    ghost = new_account_name("ghost")
    gw = await world.gateway([world.account(name)])
    queue = c.account_queue(name)
    async with Bus.open([name, ghost]) as bus:
        await bus.publish(name, request("before"))
        await bus.wait_for(outcomes=1)
        assert gw.queues_without_consumer() == []

        assert close_broker_connections(gw._owner) == 1
        # Honest meanwhile: not ready while the consumers are gone.
        await eventually(lambda: gw.queues_without_consumer() != [], 5, "unready after the connection closed")
        await eventually(lambda: gw.queues_without_consumer() == [], 30, "consuming again")
        assert gw._workers[0]._consumer is not None
        assert gw._workers[0]._consumer.restored >= 1
        # The broker's own view.
        await eventually(lambda: consumers_on(queue) == 1, 30, "one consumer on the account queue")
        assert consumers_on(c.UNROUTABLE_QUEUE) >= 1

        await bus.publish(name, request("after"))
        await bus.publish(ghost, request("after-ghost"))
        # "before" may come twice: acked after the close, it is redelivered and answered again.
        await eventually(lambda: {"after", "after-ghost"} <= {d["unique_id"] for d in bus.outcome_docs()}, 30, "after")
        await bus.wait_for(dead=1, timeout=30)
    statuses = {d["unique_id"]: d["status"] for d in bus.outcome_docs()}
    assert statuses == {"before": "accepted", "after": "accepted", "after-ghost": "invalid"}
    assert sends_of(world, name, "after") == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_the_gateways_own_redelivery_gets_the_same_outcome_never_duplicate(world: InProcess) -> None:
    """The broker closes the gateway's connections while a provider call is under way: the
    redeliveries find the first attempt's claim, wait, and when it ends get `accepted` with the same
    provider id. A producer's second copy of one of them still gets `duplicate`."""
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", latency_ms=6000, count=1))
    gw = await world.gateway([world.account(name, linger_ms=100, http_timeout_s=15)])
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"r{i}", to=f"+4850070{i:04d}")) for i in range(10)])
        await asyncio.sleep(1.0)  # the batch is at the provider, which answers after 6 s
        assert close_broker_connections(gw._owner) == 1
        await bus.wait_for(outcomes=10, timeout=60)
        await bus.settle(2.0)
        first = {d["unique_id"]: d for d in bus.outcome_docs()}
        await bus.publish(name, request("r0", to="+48500700000"))  # a stranger's copy, later
        await bus.wait_for(outcomes=len(bus.outcome_docs()) + 1, timeout=30)
        await bus.settle(0.5)
    docs = bus.outcome_docs()
    assert {d["status"] for d in docs[:-1]} == {"accepted"}, Counter(d["status"] for d in docs)
    assert {d["unique_id"] for d in docs[:-1]} == {f"r{i}" for i in range(10)}
    for d in docs[:-1]:  # every repeat carries the first attempt's provider id
        assert d["provider_message_id"] == first[d["unique_id"]]["provider_message_id"]
    assert docs[-1]["status"] == "duplicate"
    assert docs[-1]["unique_id"] == "r0"
    assert all(sends_of(world, name, f"r{i}") == 1 for i in range(10))


async def test_one_unencodable_message_does_not_wedge_its_batch(world: InProcess) -> None:
    name = new_account_name()
    bad_text = b'{"unique_id":"bad-text","to":"+48500600700","text":"\\ud800 x"}'
    bad_meta = b'{"unique_id":"bad-meta","to":"+48500600701","text":"x","meta":{"k":"\\ud800"}}'
    acc = world.account(name, linger_ms=300, batch_size=100)
    async with Bus.open([name]) as bus:
        # Queued before the gateway starts, so the bad ones share a batch with the good ones.
        await world.gateway([acc])
        good = [(name, request(f"g{i}", to=f"+4850070{i:04d}")) for i in range(60)]
        await bus.publish_many([*good[:30], (name, bad_text), *good[30:], (name, bad_meta)])
        await bus.wait_for(outcomes=62, dead=2, timeout=30)
        await bus.settle(0.5)
    docs = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert Counter(d["status"] for d in docs.values()) == {"accepted": 60, "invalid": 2}
    assert docs["bad-text"]["error"]["code"] == "bad_unicode"
    assert docs["bad-meta"]["error"]["code"] == "bad_unicode"
    assert sorted(d.headers[c.H_REASON] for d in bus.dead) == ["invalid", "invalid"]
    assert world.state.ledger()["sends"] == 60


async def test_inputs_that_crashed_the_handler_end_invalid_with_an_outcome(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name)])
    bodies = {
        "deep": b'{"unique_id":"deep","to":"1","text":"x","meta":' + b"[" * 500 + b"]" * 500 + b"}",
        "digits": b'{"unique_id":"digits","to":"1","text":"x","v":' + b"7" * 5000 + b"}",
        "spec": request("spec", text="{a:d}", vars={"a": 1}),
        "nested-spec": request("nested-spec", text="{a:{b}}", vars={"a": 1, "b": 2}),
        "conversion": request("conversion", text="{a!x}", vars={"a": 1}),
        "far-future": request("far-future", expires_at="9999-12-31T23:59:59-14:00"),
        "grow": request("grow", text="{a:>2000000}", vars={"a": 1}),
        "nan": b'{"unique_id":"nan","to":"+48500600700","text":"{a}","vars":{"a":NaN}}',
    }
    async with Bus.open([name]) as bus:
        for uid, body in bodies.items():
            # Nesting is refused before parsing, so only the message_id property can name that one.
            await bus.publish(name, body, message_id=uid)
        await bus.publish(name, request("after"))
        await bus.wait_for(outcomes=len(bodies) + 1, dead=len(bodies), timeout=30)
        await bus.settle(0.5)
    docs = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert docs.pop("after")["status"] == "accepted"
    assert {uid: d["status"] for uid, d in docs.items()} == dict.fromkeys(bodies, "invalid")
    assert {d.headers[c.H_REASON] for d in bus.dead} == {"invalid"}
    assert world.state.ledger()["sends"] == 1


async def test_unknown_account_worker_survives_hostile_bodies(world: InProcess) -> None:
    name = new_account_name()
    ghost = new_account_name("ghost")
    await world.gateway([world.account(name)])
    async with Bus.open([ghost]) as bus:
        for i in range(60):
            await bus.publish(ghost, b"[" * 60_000, message_id=f"deep{i}")
        await bus.publish(ghost, b'{"unique_id":"surrogate","to":"1","text":"\\ud800"}', message_id=None)
        await bus.publish(ghost, request("plain"))
        await bus.wait_for(outcomes=62, dead=62, timeout=60)
    assert {d.headers[c.H_REASON] for d in bus.dead} == {"unknown_account"}
    assert {d["unique_id"] for d in bus.outcome_docs()} == {*(f"deep{i}" for i in range(60)), "surrogate", "plain"}
    # Metrics name no producer-chosen routing key: one bounded label for every unknown account.
    from gateway.obs import metrics as m

    rendered = m.render().decode()
    assert ghost not in rendered
    assert 'sms_dead_letters_total{account="(unknown)",reason="unknown_account"}' in rendered


async def test_a_store_that_fails_briefly_after_the_send_holds_the_results_until_they_are_stored(
    world: InProcess,
) -> None:
    """The batch's record (results and delivery tracking in one step) fails a few times: it is
    tried again, and only then are the outcomes published; every accepted SMS is tracked."""
    name = new_account_name()
    flaky = FailingStore({"record"}, times=3)
    await world.gateway([world.account(name, linger_ms=200)], stores=flaky.around, dlr_poll_after_s=0.5)
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"s{i}", to=f"+4850080{i:04d}")) for i in range(20)])
        await bus.wait_for(outcomes=40, timeout=30)  # accepted, then delivered/undelivered (polled)
        await bus.settle(1.0)
    assert flaky.failed == 3
    statuses = Counter((d["unique_id"], d["status"]) for d in bus.outcome_docs())
    assert {k[1] for k in statuses} <= {"accepted", "delivered", "undelivered"}
    assert Counter(k[1] for k in statuses)["accepted"] == 20
    per_id = Counter(uid for uid, status in statuses if status != "accepted")
    assert len(per_id) == 20
    assert set(statuses.values()) == {1}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}


async def test_a_store_that_stays_away_after_the_send_makes_the_copies_reconcile_not_resend(
    world: InProcess,
) -> None:
    """The record fails for longer than the batch waits for it: nothing is published for the sent
    messages; they wait in the broker and their next copies reconcile with the provider. Each gets
    `accepted` (never `duplicate`), each is tracked, and nothing reaches the provider twice."""
    name = new_account_name()
    flaky = FailingStore({"record"}, times=2)  # the batch tries twice within half the lease
    # One batch of all ten (a group waits the whole linger): both failures meet the same batch.
    account = world.account(name, linger_ms=1000, quiet_ms=1000)
    await world.gateway([account], stores=flaky.around, claim_lease_s=0.6, dlr_poll_after_s=0.5)
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"h{i}", to=f"+4850081{i:04d}")) for i in range(10)])
        await bus.wait_for(outcomes=20, timeout=60)
        await bus.settle(1.0)
    assert flaky.failed == 2
    docs = bus.outcome_docs()
    assert Counter(d["status"] for d in docs if d["status"] not in ("delivered", "undelivered")) == {"accepted": 10}
    assert len({d["unique_id"] for d in docs if d["status"] in ("delivered", "undelivered")}) == 10
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
    from gateway.obs import metrics as m

    assert m.RETRIES.labels(name, "wait")._value.get() >= 10


async def test_a_retry_copy_is_reconciled_even_when_the_store_forgot_it(world: InProcess) -> None:
    """The provider took the message but its answer was lost; while the retry copy waits in the
    broker, Redis loses everything. The copy must be reconciled with the provider, not resent."""
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", swallow=True, count=1))
    await world.gateway(
        [world.account(name, http_timeout_s=0.5)], redis_url=REDIS_URL, retry_schedule_s=[3.0], store_recovery_s=0
    )
    client = aioredis.Redis.from_url(REDIS_URL)
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("lost-1"))
        key = f"smsgw:{{{name}}}:d:lost-1"
        started = time.monotonic()
        while b"unknown" not in (await client.get(key) or b""):  # the retry copy is parked now
            assert time.monotonic() - started < 10, "the ambiguous send was never recorded"
            await asyncio.sleep(0.05)
        await client.delete(*[k async for k in client.scan_iter(match=f"smsgw:{{{name}}}:*")])
        await bus.wait_for(outcomes=1, timeout=30)
        await bus.settle(0.5)
    await client.aclose()
    (doc,) = bus.outcome_docs()
    assert doc["status"] == "accepted"
    assert sends_of(world, name, "lost-1") == 1


async def test_a_copy_that_waits_past_the_lease_and_grace_fails_instead_of_looping(world: InProcess) -> None:
    from gateway.state.sqlite import SqliteStore

    name = new_account_name()
    # Another worker holds the id's claim and never finishes (a lease far longer than the waits).
    other = SqliteStore(world.tmp / "state.sqlite3")
    claims, _ = await other.claim_and_acquire(name, ["held"], "someone-else", 600, 1e6, 10**6)
    await other.close()
    assert claims["held"].state.value == "new"
    # The claim's lease is far longer than the copy's patience (lease 1 s + grace 1 s).
    await world.gateway([world.account(name)], claim_lease_s=1, wait_grace_s=1)
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("held"))
        await bus.wait_for(outcomes=1, dead=1, timeout=30)
    (doc,) = bus.outcome_docs()
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "waits_exhausted"
    assert bus.dead[0].headers[c.H_REASON] == "retries_exhausted"
    assert sends_of(world, name, "held") == 0


async def test_a_failed_claim_parks_the_batch_as_delayed_copies_not_requeues(world: InProcess) -> None:
    from gateway.obs import metrics as m

    name = new_account_name()
    flaky = FailingStore({"claim_and_acquire"}, times=1)
    await world.gateway([world.account(name, linger_ms=200)], stores=flaky.around)
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"c{i}", to=f"+4850090{i:04d}")) for i in range(10)])
        await bus.wait_for(outcomes=10, timeout=30)
        await bus.settle(0.5)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 10}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
    # The failed batch (the first one: the requests of the first event-loop turn) went back
    # through the retry queues; a requeue would count towards the queue's delivery limit instead
    # and count no wait.
    assert 1 <= m.RETRIES.labels(name, "wait")._value.get() <= 10


async def test_an_adapter_that_raises_after_sending_is_reconciled_not_resent(world: InProcess) -> None:
    """A bug in an adapter surfaces as an exception, possibly after the request went out: the chunk
    is ambiguous (reconciled before any resend), not the batch's end."""
    name = new_account_name()
    buggy: list[BuggyAdapter] = []

    def adapters(account: Account) -> ProviderAdapter:
        buggy.append(BuggyAdapter(build_adapter(account), raise_after_send=1))
        return buggy[-1]

    await world.gateway([world.account(name, linger_ms=200)], adapters=adapters)
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"a{i}", to=f"+4850091{i:04d}")) for i in range(10)])
        await bus.wait_for(outcomes=10, timeout=30)
        await bus.settle(0.5)
    assert buggy[0].raised == 1
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": 10}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}


async def test_redis_vanishing_without_a_word_stalls_the_account_only_while_it_is_gone(world: InProcess) -> None:
    """The network to Redis is cut the way a lost node cuts it: connections stay open and nothing
    answers, not even a reset (`testkit.netcut`). Without a socket timeout every store call hung
    for good, connections made after the cut too. Now calls fail after `redis_timeout_s`, the
    batches wait as delayed copies, and once Redis is reachable again every request goes out once."""
    name = new_account_name()
    async with NetCut(6379) as cut:
        gw = await world.gateway(
            [world.account(name, linger_ms=20)],
            redis_url=f"redis://127.0.0.1:{cut.port}/0",
            redis_timeout_s=1.0,
            retry_schedule_s=[0.5, 1.0],
            claim_lease_s=2.0,
        )
        async with Bus.open([name]) as bus:
            await bus.publish_many([(name, request(f"a{i}", to=f"+4850070{i:04d}")) for i in range(20)])
            await bus.wait_for(outcomes=20, timeout=30)
            cut.drop()
            await bus.publish_many([(name, request(f"b{i}", to=f"+4850071{i:04d}")) for i in range(20)])
            await eventually(lambda: cut.dropped_bytes > 0, 10, "store calls into the cut")
            problems = await gw.problems()
            assert any(p.startswith("state store") for p in problems), problems
            await asyncio.sleep(3.0)
            assert len(bus.outcomes) == 20  # nothing is decided without the store
            cut.heal()
            await bus.wait_for(outcomes=40, timeout=60)
            await bus.settle(1.0)
    final = {d["unique_id"]: d["status"] for d in bus.outcome_docs()}
    assert Counter(final.values()) == {"accepted": 40}
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
