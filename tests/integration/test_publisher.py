"""The publisher against the real broker: what a returned (unroutable) publish does."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aiormq.exceptions import PublishError

from gateway import contract as c
from gateway.bus import topology
from gateway.bus.publisher import Publisher
from gateway.errors import PublishTimeout
from testkit import AMQP_URL, Bus, delete_account_queues, new_account_name, request

pytestmark = pytest.mark.integration


async def test_a_retry_copy_no_queue_takes_fails_instead_of_vanishing() -> None:
    account = new_account_name()
    try:
        await _retry_copies(account)
    finally:
        await delete_account_queues([account])


async def _retry_copies(account: str) -> None:
    async with Bus.open([account]) as bus:
        await topology.declare(bus.channel, [account], [1])
        await bus.publish(account, request("lost-1"))
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(c.account_queue(account))
            original = await queue.get(timeout=10)
            assert original is not None
            publisher = Publisher(await connection.channel(publisher_confirms=True, on_return_raises=True))
            # 1 s has a retry queue; 7 s does not: the broker returns the copy and the publish fails,
            # so the consumer requeues the request instead of acking it.
            await publisher.publish(publisher.retry(original, routing_key=account, delay_ms=1000, attempts=1, waits=0))
            with pytest.raises(PublishError):
                await publisher.publish(
                    publisher.retry(original, routing_key=account, delay_ms=7000, attempts=1, waits=0)
                )
            # An outcome nobody listens for is not an error: it is dropped by the broker, by design.
            await publisher.outcome(account="nobody-listens", status="accepted", body=b"{}", unique_id="x")
            await original.ack()


async def test_a_publish_that_is_never_confirmed_times_out_and_the_channel_is_replaced() -> None:
    """A wedged channel (seen after a lost connection: publishes queued behind the channel's lock
    or a confirm that never came) fails its publishes after `timeout_s` instead of holding their
    requests forever, and the next publishes go out on a fresh channel."""
    account = new_account_name()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, Bus.open([account]) as bus:

        async def confirming_channel() -> aio_pika.abc.AbstractChannel:
            return await connection.channel(publisher_confirms=True, on_return_raises=True)

        first = await confirming_channel()
        wedged = await first.get_underlay_channel()
        gate = asyncio.Event()  # never set: the broker "never confirms" on this channel

        async def never_confirmed(*_: object, **__: object) -> None:
            await gate.wait()

        wedged.basic_publish = never_confirmed  # type: ignore[method-assign]
        publisher = Publisher(first, timeout_s=0.5, reopen=confirming_channel)
        with pytest.raises(PublishTimeout):
            await publisher.outcome(account=account, status="accepted", body=b'{"n":1}', unique_id="w-1")
        # The replacement is under way; a publish meanwhile waits for it, then goes out.
        await publisher.outcome(account=account, status="accepted", body=b'{"n":2}', unique_id="w-2")
        await bus.wait_for(outcomes=1, timeout=10)
        assert publisher.replaced == 1
        assert [d["n"] for d in bus.outcome_docs()] == [2]


async def test_a_batch_past_its_bound_keeps_what_the_broker_confirmed_and_fails_the_rest() -> None:
    """The publishes of a batch share one deadline: one confirmed before it stands (its request is
    acked, not published again by a redelivery), one never confirmed fails with PublishTimeout."""
    account = new_account_name()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, Bus.open([account]) as bus:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        real = underlay.basic_publish
        gate = asyncio.Event()  # never set: the broker "never confirms" the one publish

        async def one_never_confirmed(body: bytes, **kwargs: object) -> object:
            if body == b'{"n":1}':
                await gate.wait()
            return await real(body, **kwargs)  # type: ignore[arg-type]

        underlay.basic_publish = one_never_confirmed  # type: ignore[method-assign,assignment]
        publisher = Publisher(channel, timeout_s=1.0)
        batch = [
            x
            for n in range(3)
            for x in publisher.outcome_publishes(
                account=account, status="accepted", body=f'{{"n":{n}}}'.encode(), unique_id=f"b-{n}"
            )
        ]
        answers = await publisher.publish_all(batch)
        assert answers[0] is None
        assert isinstance(answers[1], PublishTimeout)
        assert answers[2] is None
        await bus.wait_for(outcomes=2, timeout=10)
        assert sorted(d["n"] for d in bus.outcome_docs()) == [0, 2]
