"""The bus as a producer sees it: requests, throwaway accounts, published and received messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from gateway import contract as c
from testkit.services import AMQP_URL


def new_account_name(prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(5)}"


def account_doc(name: str, sandbox_port: int, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "provider": "serwersms",
        "base_url": f"http://127.0.0.1:{sandbox_port}",
        "token": f"tok-{name}",
        "sender": "Test",
        "rate_per_s": 1000,
        "burst": 1000,
        "linger_ms": 50,
        "http_timeout_s": 2,
    }
    doc.update(overrides)
    return doc


def request(uid: str, to: str = "+48500600700", text: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"v": 1, "unique_id": uid, "to": to, "text": text, **extra}).encode()


@dataclass
class Received:
    routing_key: str
    body: bytes
    headers: dict[str, Any]

    @property
    def doc(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class Bus:
    """A producer's and an observer's view of the bus for a set of accounts."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._outcomes: AbstractQueue | None = None
        self._dead: AbstractQueue | None = None
        self.outcomes: list[Received] = []
        self.dead: list[Received] = []
        self._changed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, accounts: list[str], url: str = AMQP_URL) -> AsyncIterator[Bus]:
        try:
            connection = await aio_pika.connect_robust(url)
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise RuntimeError(f"RabbitMQ is not reachable at {url.split('@')[-1]}: {exc}") from exc
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            bus = cls(connection, channel)
            await bus._observe(accounts)
            yield bus

    async def _observe(self, accounts: list[str]) -> None:
        ch = self.channel
        outcomes = await ch.declare_exchange(c.OUTCOMES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await ch.declare_exchange(c.DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self._outcomes = await ch.declare_queue("", exclusive=True)
        self._dead = await ch.declare_queue("", exclusive=True)
        for account in accounts:
            await self._outcomes.bind(outcomes, routing_key=f"*.{account}")
            await self._dead.bind(dead, routing_key=f"*.{account}")
        await self._outcomes.consume(self._collector(self.outcomes), no_ack=True)
        await self._dead.consume(self._collector(self.dead), no_ack=True)

    def _collector(self, into: list[Received]) -> Any:
        async def on_message(message: AbstractIncomingMessage) -> None:
            into.append(Received(message.routing_key or "", message.body, dict(message.headers or {})))
            self._changed.set()

        return on_message

    async def publish(self, account: str, body: bytes, **props: Any) -> None:
        exchange = await self.channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        props.setdefault("content_type", "application/json")
        await exchange.publish(aio_pika.Message(body, **props), routing_key=account)

    async def publish_optout(self, key: str, doc: dict[str, Any] | bytes, **props: Any) -> None:
        """One change to the opt-out registry: routing key `<account>` or `all`."""
        exchange = await self.channel.get_exchange(c.OPTOUT_EXCHANGE, ensure=False)
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        await exchange.publish(aio_pika.Message(body, **props), routing_key=key)

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        exchange = await self.channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        for start in range(0, len(items), 200):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=account,
                    )
                    for account, body in items[start : start + 200]
                )
            )

    async def wait_for(self, outcomes: int = 0, dead: int = 0, timeout: float = 30.0) -> None:
        """Wait until at least this many outcomes and dead letters arrived; fail with what came."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < outcomes or len(self.dead) < dead:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"waited {timeout}s for {outcomes} outcomes and {dead} dead letters, got "
                    f"{len(self.outcomes)} and {len(self.dead)}: {[o.routing_key for o in self.outcomes[-5:]]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Wait until nothing new arrived for `quiet_s` (to catch extra, unwanted messages)."""
        last = (len(self.outcomes), len(self.dead))
        while True:
            await asyncio.sleep(quiet_s)
            now = (len(self.outcomes), len(self.dead))
            if now == last:
                return
            last = now

    def outcome_docs(self) -> list[dict[str, Any]]:
        return [o.doc for o in self.outcomes]
