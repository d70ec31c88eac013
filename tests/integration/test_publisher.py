"""The publisher against the real broker: what a returned (unroutable) publish does."""

from __future__ import annotations

import aio_pika
import pytest
from aiormq.exceptions import PublishError

from gateway import contract as c
from gateway import topology
from gateway.publisher import Publisher
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
            await publisher.retry(original, account=account, delay_ms=1000, attempts=1, waits=0)
            with pytest.raises(PublishError):
                await publisher.retry(original, account=account, delay_ms=7000, attempts=1, waits=0)
            # An outcome nobody listens for is not an error: it is dropped by the broker, by design.
            await publisher.outcome(account="nobody-listens", status="accepted", body=b"{}", unique_id="x")
            await original.ack()
