"""Exchanges, queues and bindings of the bus: declared once at start-up, idempotently.

Layout (names from `contract`):

    sms.send (direct, alternate-exchange sms.send.unroutable)
      --<account>--> sms.send.<account>   quorum; broker backstop: after DELIVERY_LIMIT deliveries
                                          it dead-letters to sms.dead as poison.<account>
    sms.send.unroutable (fanout) -> sms.send.unroutable   the gateway dead-letters these as
                                                          unknown_account.<routing key>
    sms.retry (headers; gateway-retry-delay=<ms>) -> sms.retry.<ms>ms
                                          quorum, x-message-ttl=<ms>, dead-letters back into
                                          sms.send keeping the account routing key
    sms.outcomes (topic, <status>.<account>)
    sms.dead (topic, <reason>.<account>) -> sms.dead (bound to #)

Queue arguments never depend on tunable settings other than the retry delays themselves, so a
configuration change never makes a redeclare fail with PRECONDITION_FAILED.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, ExchangeType

from gateway import contract as c
from gateway.retry import retry_delays_ms

DELIVERY_LIMIT = 20  # broker-side backstop; the gateway itself stops at settings.poison_deliveries

_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# At-least-once dead-lettering (RabbitMQ 3.10+) so a message moving between queues is never dropped.
_SAFE_DLX: dict[str, Any] = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


async def declare(channel: AbstractChannel, accounts: Iterable[str], retry_schedule_s: Iterable[float]) -> None:
    unroutable = await channel.declare_exchange(c.UNROUTABLE_EXCHANGE, ExchangeType.FANOUT, durable=True)
    send = await channel.declare_exchange(
        c.SEND_EXCHANGE,
        ExchangeType.DIRECT,
        durable=True,
        arguments={"alternate-exchange": c.UNROUTABLE_EXCHANGE},
    )
    await channel.declare_exchange(c.OUTCOMES_EXCHANGE, ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_exchange(c.DEAD_EXCHANGE, ExchangeType.TOPIC, durable=True)
    retry = await channel.declare_exchange(c.RETRY_EXCHANGE, ExchangeType.HEADERS, durable=True)

    q = await channel.declare_queue(c.UNROUTABLE_QUEUE, durable=True, arguments=_QUORUM)
    await q.bind(unroutable)
    q = await channel.declare_queue(c.DEAD_QUEUE, durable=True, arguments=_QUORUM)
    await q.bind(dead, routing_key="#")

    for account in accounts:
        await declare_account_queue(channel, send, account)

    for delay in retry_delays_ms(retry_schedule_s):
        q = await channel.declare_queue(
            c.retry_queue(delay),
            durable=True,
            arguments={
                **_QUORUM,
                **_SAFE_DLX,
                "x-message-ttl": delay,
                "x-dead-letter-exchange": c.SEND_EXCHANGE,
            },
        )
        await q.bind(retry, arguments={"x-match": "all", c.H_RETRY_DELAY: str(delay)})


async def declare_account_queue(channel: AbstractChannel, send: AbstractExchange, account: str) -> None:
    q = await channel.declare_queue(
        c.account_queue(account),
        durable=True,
        arguments={
            **_QUORUM,
            **_SAFE_DLX,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": c.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": f"{c.DeadReason.POISON}.{account}",
        },
    )
    await q.bind(send, routing_key=account)
