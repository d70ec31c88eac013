"""The adaptive in-flight limit in a real gateway: it grows while a slow provider leaves work
waiting, it halves when the provider fails, and nothing is sent twice on the way; a lone request
is sent without waiting for the linger."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika
import pytest

from gateway import contract as c
from gateway.bus import queue as gq
from gateway.bus.consumer import close_wedged
from gateway.bus.queue import QueueConsumer
from gateway.obs import metrics as m
from gateway.sandbox.state import FaultRule
from testkit import AMQP_URL, Bus, close_broker_connections, consumers_on, eventually, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


def limit_of(name: str) -> float:
    return float(m.INFLIGHT_LIMIT.labels(name, "normal")._value.get())


def prefetch_of(name: str) -> float:
    return float(m.PREFETCH.labels(name, "normal")._value.get())


async def test_a_slow_provider_gets_more_calls_in_flight_and_a_failing_one_fewer(world: InProcess) -> None:
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", latency_ms=300))
    account = world.account(name, concurrency=2, max_concurrency=12, batch_size=20, rate_per_s=100_000, burst=100_000)
    gw = await world.gateway([account])
    worker = gw.worker(name)
    assert limit_of(name) == 2
    assert prefetch_of(name) == 20 * (2 + 1)
    n = 1200
    most_unsettled = 0

    async def watch() -> None:
        nonlocal most_unsettled
        while True:
            most_unsettled = max(most_unsettled, worker.unsettled)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"s{i}", to=f"+4850095{i:04d}")) for i in range(n)])
        await bus.wait_for(outcomes=n, timeout=60)
        watcher.cancel()
        grown = limit_of(name)
        assert grown > 4, f"the limit stayed at {grown} with {n} requests waiting on a 300 ms provider"
        assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": n}
        # The prefetch followed the limit, and the broker applied it: more deliveries were open at
        # once than the starting prefetch allows. The swapped consumers left exactly one behind.
        assert prefetch_of(name) >= 20 * (grown + 1) / 2
        assert most_unsettled > 20 * (2 + 1), most_unsettled
        queue = await bus.channel.declare_queue(c.account_queue(name), passive=True)
        assert queue.declaration_result.consumer_count == 1

        # The provider starts failing: the limit is cut (halved, at most once a second).
        world.state.faults.clear()
        world.state.faults.add(FaultRule(match=f"token:tok-{name}", http_status=503, count=3))
        await bus.publish_many([(name, request(f"f{i}", to=f"+4850096{i:04d}")) for i in range(60)])
        await bus.wait_for(outcomes=n + 60, timeout=60)
        assert limit_of(name) < grown
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}


async def test_a_lone_request_does_not_wait_for_the_linger(world: InProcess) -> None:
    """With a 60 s linger, an outcome within 30 s means the request did not wait for it."""
    name = new_account_name()
    await world.gateway([world.account(name, linger_ms=60_000)])
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("otp-1"))
        await bus.wait_for(outcomes=1, timeout=30)
    assert bus.outcome_docs()[0]["status"] == "accepted"


# aiormq leaves the socket of a connection the broker closed to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_prefetch_resizes_racing_a_lost_connection_leave_one_consumer_and_send_once(world: InProcess) -> None:
    """The limit grows (consumers swapped for bigger prefetches) while the broker closes the
    gateway's connection twice: every request ends accepted, sent once, and the queue has exactly
    one consumer afterwards (no consumer left behind by a swap cut in half)."""
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", latency_ms=200))
    account = world.account(name, concurrency=1, max_concurrency=12, batch_size=10, rate_per_s=100_000, burst=100_000)
    gw = await world.gateway([account])
    n = 600
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"r{i}", to=f"+4850097{i:04d}")) for i in range(n)])
        for _ in range(2):
            await eventually(lambda: gw.queues_without_consumer() == [], 30, "consuming")
            await asyncio.sleep(0.7)  # the limit grows meanwhile: consumers are swapped
            # (Right after a reconnect the broker may not list the new connection yet.)
            await eventually(lambda: close_broker_connections(gw._owner) == 1, 15, "the gateway's connection closed")
        # A request whose ack the cut lost is delivered again and answered again (at least once;
        # without a message_id it cannot be told from a producer's copy: `duplicate`). Every id is
        # accepted, and the provider saw each once.
        ids = {f"r{i}" for i in range(n)}

        def accepted() -> set[str]:
            return {d["unique_id"] for d in bus.outcome_docs() if d["status"] == "accepted"}

        await eventually(lambda: accepted() >= ids, 90, "every id accepted")
        assert {d["status"] for d in bus.outcome_docs()} <= {"accepted", "duplicate"}
    await eventually(lambda: consumers_on(c.account_queue(name)) == 1, 30, "one consumer on the account queue")
    assert gw.queues_without_consumer() == []
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}
    # The gauge shows the prefetch the consumer runs with, also after a resize the cut failed.
    await eventually(lambda: gw.worker(name).prefetch == prefetch_of(name), 10, "the prefetch gauge caught up")


async def test_a_resize_cut_short_before_the_old_consumer_is_cancelled_leaves_one_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resize's time runs out between the new consume and the old one's cancel, on a channel
    that stays up: the watchdog cancels the replaced consumer, so its prefetch does not linger."""
    monkeypatch.setattr(gq, "RESIZE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(gq, "WATCH_INTERVAL_S", 0.2)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"test.resize.{new_account_name()}", auto_delete=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        consumer = QueueConsumer(channel, queue.name, on_message, 10)
        await consumer.start(wanted=lambda: True)
        assert consumer._queue is not None
        kind = type(consumer._queue)
        real_cancel = kind.cancel
        calls = 0

        async def slow_first_cancel(self: object, tag: str, *args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(5)  # CancelOk does not come in time
            return await real_cancel(self, tag, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(kind, "cancel", slow_first_cancel)  # the queue's class has slots
        with pytest.raises(TimeoutError):
            await consumer.resize(20)
        assert consumer.prefetch == 20
        assert consumer.live
        assert consumers_on(queue.name) == 2
        await eventually(lambda: consumers_on(queue.name) == 1, 15, "the replaced consumer cancelled")
        assert consumer.live
        await consumer.close()
    finally:
        await connection.close()


async def test_a_cancel_that_runs_out_of_time_gives_the_channel_up_to_the_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiormq closes a channel whose RPC was cancelled, though it reads as open until the close-ok:
    the worker is told (`on_lost`), so its ack tracker writes nothing more to it. An ack written
    after the broker freed the channel closes the whole connection (504 CHANNEL_ERROR)."""
    monkeypatch.setattr(gq, "CANCEL_TIMEOUT_S", 0.3)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"test.cancel.{new_account_name()}", auto_delete=True)
        lost: list[object] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        consumer = QueueConsumer(channel, queue.name, on_message, 10, on_lost=lost.append)
        wanted = [True]
        await consumer.start(wanted=lambda: wanted[0])
        wanted[0] = False  # no watchdog consume after the cancel
        assert consumer._queue is not None
        underlay = consumer._underlay
        assert underlay is not None
        kind = type(consumer._queue)

        async def hanging_cancel(self: object, tag: str, *args: object, **kwargs: object) -> object:
            await asyncio.sleep(5)  # CancelOk does not come in time
            return None

        monkeypatch.setattr(kind, "cancel", hanging_cancel)  # the queue's class has slots
        await consumer.cancel()
        assert lost == [underlay]
        await consumer.close()
    finally:
        await connection.close()


async def test_a_consumer_channel_given_up_as_wedged_is_closed_and_consumed_again(world: InProcess) -> None:
    """What the ack tracker's `on_wedged` sets off when no ack goes out on the current consumer
    channel: the channel is closed (the broker requeues what it held), the robust channel reopens,
    and the watchdog consumes again, every lane of the account (they share the channel); requests
    still go through, each sent once."""
    name = new_account_name()
    gw = await world.gateway([world.account(name)])
    worker = gw.worker(name)
    assert worker._consumer is not None
    underlay = await worker._consumer._channel.get_underlay_channel()
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"w{i}", to=f"+4850098{i:04d}")) for i in range(20)])
        close_wedged(underlay, name)
        await eventually(lambda: underlay.is_closed, 10, "the wedged channel closed")
        await eventually(lambda: all(w.consuming for w in gw.workers), 30, "every lane consuming again")
        await bus.publish_many([(name, request(f"v{i}", to=f"+4850099{i:04d}")) for i in range(20)])
        await bus.publish(f"{name}.urgent", request("u1", to="+48500990999"))
        ids = {f"w{i}" for i in range(20)} | {f"v{i}" for i in range(20)} | {"u1"}
        await eventually(lambda: {d["unique_id"] for d in bus.outcome_docs()} >= ids, 60, "every id answered")
    assert [consumers_on(c.account_queue(name, lane)) for lane in c.LANES] == [1, 1, 1]
    assert set(world.state.ledger()["by_unique_id"].values()) == {1}


async def test_work_held_back_by_a_saturated_process_does_not_grow_the_lanes_limit(
    world: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process counts as saturated whatever its lag: admission holds the lane to one batch in
    flight, so its four slots are never all taken, and its limit (and prefetch) stay where they
    started although work waits all the time."""
    from gateway.core import admission

    monkeypatch.setattr(admission, "LAG_HIGH_S", -1.0)
    name = new_account_name()
    world.state.faults.add(FaultRule(match=f"token:tok-{name}", latency_ms=200))
    account = world.account(name, concurrency=4, max_concurrency=12, batch_size=20, rate_per_s=100_000, burst=100_000)
    m.ADMISSION_LIMIT.set(-1)  # the gauge is the process's: the value this gateway reports is awaited
    gw = await world.gateway([account])
    await eventually(lambda: m.ADMISSION_LIMIT._value.get() == admission.FLOOR, 10, "saturated")
    n = 600
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(f"h{i}", to=f"+4850098{i:04d}")) for i in range(n)])
        await bus.wait_for(outcomes=n, timeout=90)
    assert Counter(d["status"] for d in bus.outcome_docs()) == {"accepted": n}
    assert gw.worker(name).unsettled == 0
    assert limit_of(name) == 4
    assert prefetch_of(name) == 20 * (4 + 1)
