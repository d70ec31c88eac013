"""What a batch's publishes cost on the wire: the service's connection hands a batch of outcomes
to the socket in a handful of writes, each still confirmed by the broker (bus/connect.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika
import pytest

from gateway import contract as c
from gateway.bus import topology
from gateway.bus.connect import CoalescingWriter, connect_robust
from gateway.bus.publisher import Publisher
from testkit import AMQP_URL, new_account_name

pytestmark = pytest.mark.integration

BATCH = 100


@contextmanager
def counted_writes() -> Iterator[list[int]]:
    """The sizes of every socket transport write made meanwhile (the test's process only)."""
    cls: Any = vars(asyncio.selector_events)["_SelectorSocketTransport"]  # what is counted
    real = cls.write
    sizes: list[int] = []

    def write(self: Any, data: Any) -> None:
        sizes.append(len(data))
        real(self, data)

    cls.write = write
    try:
        yield sizes
    finally:
        cls.write = real


async def _outcomes_written(channel: aio_pika.abc.AbstractChannel, n: int) -> list[int]:
    """The socket writes of `n` outcomes published at once, each confirmed."""
    publisher = Publisher(channel)
    with counted_writes() as sizes:
        await asyncio.gather(
            *(publisher.outcome(account="wire", status="accepted", body=b"{}", unique_id=f"w{i}") for i in range(n))
        )
    return sizes


async def _publish_batch(coalesce: bool, account: str) -> tuple[list[int], list[int]]:
    """A batch of outcomes published the way the settler does (all at once, each confirmed), and
    the order the broker routed them in."""
    connection = await connect_robust(AMQP_URL, timeout_s=10, coalesce=coalesce)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, [], [1])
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(c.OUTCOMES_EXCHANGE, routing_key=f"accepted.{account}")
        publisher = Publisher(await connection.channel(publisher_confirms=True, on_return_raises=True))
        await publisher.outcome(account=account, status="accepted", body=b'{"n":-1}', unique_id="warm")
        with counted_writes() as sizes:
            await asyncio.gather(
                *(
                    publisher.outcome(
                        account=account, status="accepted", body=json.dumps({"n": n}).encode(), unique_id=f"u{n}"
                    )
                    for n in range(BATCH)
                )
            )
        order = []
        async with queue.iterator() as messages:
            async for message in messages:
                n = json.loads(message.body)["n"]
                await message.ack()
                if n >= 0:
                    order.append(n)
                if len(order) == BATCH:
                    break
        return sizes, order


async def test_a_batch_of_outcomes_costs_a_handful_of_writes_and_keeps_its_order() -> None:
    account = new_account_name()
    sizes, order = await _publish_batch(True, account)
    assert order == list(range(BATCH))
    # The publishes leave in the turn after they were made, the confirms' reads aside: a few writes.
    assert 1 <= len(sizes) <= 5, sizes
    # The same batch on a connection without the writer: one write per publish (what is saved).
    plain, order = await _publish_batch(False, account)
    assert order == list(range(BATCH))
    assert len(plain) >= BATCH


async def test_the_writer_keeps_order_across_drains_and_closes() -> None:
    """Writes, a drain and the close reach the socket in the order they were made."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, inner = await asyncio.open_connection("127.0.0.1", port)
        writer = CoalescingWriter(inner)
        with counted_writes() as sizes:
            writer.write(b"a")
            writer.write(b"b")
            await writer.drain()  # drain hands the pending bytes over at once
            assert sizes == [2]
            writer.writelines([b"c", b"d"])
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # the next turn of the loop writes what the last one gathered
            assert sizes == [2, 2]
            writer.write(b"e")
            writer.close()  # closing writes what is pending first
            await writer.wait_closed()
        await asyncio.wait_for(done.wait(), 10)
    assert received == [b"abcde"]


async def test_a_robust_connection_keeps_the_writer_and_its_url_settings_after_a_reconnect() -> None:
    """The URL's own settings (heartbeat, reconnect interval, name) still apply, and a reconnect
    comes back through the coalescing writer."""
    url = f"{AMQP_URL}?heartbeat=7&reconnect_interval=0.2&name=wire-test"
    connection = await connect_robust(url, timeout_s=10)
    async with connection:
        assert getattr(connection, "reconnect_interval") == pytest.approx(0.2)  # noqa: B009
        underlay: Any = connection.transport.connection  # type: ignore[union-attr]
        assert underlay.heartbeat_timeout == 7
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        await underlay.close(ConnectionError("cut by the test"))
        await asyncio.wait_for(reconnected.wait(), 20)
        sizes = await _outcomes_written(await connection.channel(publisher_confirms=True), 50)
        assert 1 <= len(sizes) <= 5, sizes


async def test_plain_aio_pika_connections_are_untouched() -> None:
    """Operator commands and other code that connect with aio-pika itself write as before."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        sizes = await _outcomes_written(await connection.channel(publisher_confirms=True), 20)
        assert len(sizes) >= 20
