"""Exchanges, queues and bindings of the bus, as data: declared at start-up (idempotently) and by
`gateway topology declare`, verified by `gateway topology check`, and written into the AsyncAPI
document (`gateway.ops.schema`). One description, so the three never disagree.

    sms.send (direct, alternate-exchange sms.send.unroutable), one queue per account and lane:
      --<account>.urgent--> sms.send.<account>.urgent
      --<account>-------->  sms.send.<account>          quorum; broker backstop: after DELIVERY_LIMIT
      --<account>.bulk--->  sms.send.<account>.bulk     deliveries it dead-letters to sms.dead as
                                                        poison.<account>
    sms.send.unroutable (fanout) -> sms.send.unroutable   the gateway dead-letters these as
                                                          unknown_account.<routing key>
    sms.retry (headers; gateway-retry-delay=<ms>) -> sms.retry.<ms>ms
                                          quorum, x-message-ttl=<ms>, dead-letters back into
                                          sms.send keeping the account's lane routing key
    sms.outcomes (topic, <status>.<account>)
    sms.dead (topic, <reason>.<account>) -> sms.dead (bound to #)
    sms.optout (topic, <account> or all) -> sms.optout (bound to #)   quorum, single active consumer:
                                          the opt-out registry's changes, in order
    sms.outcomes --delivered.*, undelivered.*--> sms.tracking   stream, 7 days, with one copy of each
                                          batch's tracked messages published there by the gateway:
                                          what delivery tracking is rebuilt from after a store loss

Queue arguments never depend on tunable settings other than the retry delays themselves, so a
configuration change never makes a redeclare fail with PRECONDITION_FAILED.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from gateway import contract as c
from gateway.core.retry import retry_delays_ms

if TYPE_CHECKING:
    from gateway.bus.broker_api import BrokerApi

DELIVERY_LIMIT = 20  # broker-side backstop; the gateway itself stops at settings.poison_deliveries
TRACKING_MAX_AGE = "7D"  # the tracking stream's retention: longer than the default tracking window (4 days)
TRACKING_MAX_BYTES = 20 * 2**30  # and its size at most: ~70 million outcomes of ~300 bytes

_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# At-least-once dead-lettering (RabbitMQ 3.10+) so a message moving between queues is never dropped.
_SAFE_DLX: dict[str, Any] = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str  # direct, fanout, topic, headers
    description: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    routing_key: str  # fanout and headers exchanges ignore it; it is the queue's name there
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    description: str
    arguments: dict[str, Any]
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]


EXCHANGES = (
    Exchange(
        c.SEND_EXCHANGE,
        "direct",
        "Send requests; routing key = the account's lane: <account>.urgent, <account> (normal) or "
        "<account>.bulk. Unroutable requests go to the alternate exchange.",
        {"alternate-exchange": c.UNROUTABLE_EXCHANGE},
    ),
    Exchange(c.UNROUTABLE_EXCHANGE, "fanout", "Requests for accounts no gateway serves (sms.send's alternate)."),
    Exchange(c.OUTCOMES_EXCHANGE, "topic", "Outcomes and delivery events; routing key <status>.<account>."),
    Exchange(c.DEAD_EXCHANGE, "topic", "Dead letters: the original request; routing key <reason>.<account>."),
    Exchange(c.RETRY_EXCHANGE, "headers", "Delayed retries, by the gateway-retry-delay header (gateway-internal)."),
    Exchange(
        c.OPTOUT_EXCHANGE,
        "topic",
        "Opt-outs from any application: routing key <account> or all; body {to, action: add | remove, source, at}.",
    ),
)


_LANE_TEXT = {
    c.Lane.URGENT: "Urgent send requests (one-time codes) of account {a}: served first within its rate",
    c.Lane.NORMAL: "Send requests of account {a}",
    c.Lane.BULK: "Bulk send requests (campaigns) of account {a}: served after the other lanes, quiet hours",
}


def account_queue(account: str, lane: c.Lane = c.Lane.NORMAL) -> Queue:
    return Queue(
        c.account_queue(account, lane),
        _LANE_TEXT[lane].format(a=account) + ", consumed by the gateway.",
        {
            **_QUORUM,
            **_SAFE_DLX,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": c.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": f"{c.DeadReason.POISON}.{account}",
        },
        (Binding(c.SEND_EXCHANGE, c.lane_key(account, lane)),),
    )


def retry_queue(delay_ms: int) -> Queue:
    return Queue(
        c.retry_queue(delay_ms),
        f"Retry copies waiting {delay_ms} ms, then dead-lettered back into sms.send (gateway-internal).",
        {**_QUORUM, **_SAFE_DLX, "x-message-ttl": delay_ms, "x-dead-letter-exchange": c.SEND_EXCHANGE},
        (Binding(c.RETRY_EXCHANGE, c.retry_queue(delay_ms), {"x-match": "all", c.H_RETRY_DELAY: str(delay_ms)}),),
    )


def layout(accounts: Iterable[str], retry_schedule_s: Iterable[float]) -> Layout:
    queues = [
        Queue(
            c.UNROUTABLE_QUEUE,
            "Requests for unknown accounts; the gateway dead-letters each as unknown_account.",
            dict(_QUORUM),
            (Binding(c.UNROUTABLE_EXCHANGE, c.UNROUTABLE_QUEUE),),
        ),
        Queue(
            c.DEAD_QUEUE,
            "Every dead letter, kept until an operator replays or purges it (gateway dlq).",
            dict(_QUORUM),
            (Binding(c.DEAD_EXCHANGE, "#"),),
        ),
        Queue(
            c.TRACKING_STREAM,
            "A stream of the tracked messages of each accepted batch and of the delivered and undelivered "
            "events, kept 7 days: after the state store lost its delivery tracking the gateway rebuilds it "
            "from here (gateway-internal).",
            {"x-queue-type": "stream", "x-max-age": TRACKING_MAX_AGE, "x-max-length-bytes": TRACKING_MAX_BYTES},
            tuple(Binding(c.OUTCOMES_EXCHANGE, f"{status}.*") for status in ("delivered", "undelivered")),
        ),
        Queue(
            c.OPTOUT_QUEUE,
            "Opt-out changes, applied to the registry in the state store by one gateway at a time (single "
            "active consumer: in the order they were published).",
            {
                **_QUORUM,
                **_SAFE_DLX,
                "x-single-active-consumer": True,
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": c.DEAD_EXCHANGE,
                "x-dead-letter-routing-key": f"{c.DeadReason.POISON}.{c.OPTOUT_QUEUE}",
            },
            (Binding(c.OPTOUT_EXCHANGE, "#"),),
        ),
        *(account_queue(a, lane) for a in accounts for lane in c.LANES),
        *(retry_queue(d) for d in retry_delays_ms(retry_schedule_s)),
    ]
    return Layout(EXCHANGES, tuple(queues))


async def apply(channel: AbstractChannel, plan: Layout, more: Sequence[AbstractChannel] = ()) -> None:
    """Declare everything in `plan` (idempotent while the arguments agree): the exchanges first,
    then the queues with their bindings, shared out over `channel` and the `more` channels, which
    declare at once (one channel answers one declaration at a time)."""
    for x in plan.exchanges:
        await channel.declare_exchange(x.name, ExchangeType(x.type), durable=True, arguments=x.arguments or None)
    channels = [channel, *more]
    queues = list(plan.queues)
    await asyncio.gather(*(_declare_queues(ch, queues[i :: len(channels)]) for i, ch in enumerate(channels)))


async def _declare_queues(channel: AbstractChannel, queues: Iterable[Queue]) -> None:
    for q in queues:
        queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for b in q.bindings:
            await queue.bind(b.exchange, routing_key=b.routing_key, arguments=b.arguments or None)


async def declare_account(channel: AbstractChannel, account: str) -> None:
    """Declare one account's lane queues and their bindings (the exchanges exist: `declare` with
    no accounts comes first). Start-up declares each account just before it consumes from it."""
    await _declare_queues(channel, [account_queue(account, lane) for lane in c.LANES])


async def declare(
    channel: AbstractChannel,
    accounts: Iterable[str],
    retry_schedule_s: Iterable[float],
    *,
    more: Sequence[AbstractChannel] = (),
) -> None:
    await apply(channel, layout(accounts, retry_schedule_s), more)


# -- verification (`gateway topology check`) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """One difference between the broker and the layout."""

    kind: str  # missing_exchange | wrong_exchange | missing_queue | wrong_arguments | missing_binding
    name: str
    detail: str


def _same(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(found) | set(wanted))
    return [
        f"{k}: {found.get(k)!r} (wanted {wanted.get(k)!r})" for k in keys if str(found.get(k)) != str(wanted.get(k))
    ]


async def check(connection: AbstractConnection, plan: Layout, api: BrokerApi | None) -> list[Drift]:
    """Compare the broker with `plan` without changing anything. With the management API (`api`)
    every argument and binding is compared; without it, AMQP tells missing entities and, through
    an equivalent declare that the broker refuses with 406, arguments that differ (bindings are
    then not checked: the caller says so)."""
    drift: list[Drift] = []
    for x in plan.exchanges:
        if api is not None:
            doc = await api.exchange(x.name)
            if doc is None:
                drift.append(Drift("missing_exchange", x.name, f"no {x.type} exchange {x.name}"))
            elif doc.get("type") != x.type or (diff := _same(doc.get("arguments") or {}, x.arguments)):
                what = f"type {doc.get('type')} (wanted {x.type})" if doc.get("type") != x.type else "; ".join(diff)
                drift.append(Drift("wrong_exchange", x.name, what))
            continue
        problem = await _probe(connection, partial(_exchange_exists, x))
        if problem is not None:
            drift.append(Drift("missing_exchange", x.name, problem))
            continue
        problem = await _probe(connection, partial(_exchange_equivalent, x))
        if problem is not None:
            drift.append(Drift("wrong_exchange", x.name, problem))
    for q in plan.queues:
        if api is not None:
            info = await api.queue(q.name)
            if info is None:
                drift.append(Drift("missing_queue", q.name, "no such queue"))
                continue
            if diff := _same(info.arguments, q.arguments):
                drift.append(Drift("wrong_arguments", q.name, "; ".join(diff)))
            bound = await api.bindings(q.name)
            for b in q.bindings:
                if not any(_binds(found, b) for found in bound):
                    drift.append(Drift("missing_binding", q.name, f"from {b.exchange} with key {b.routing_key!r}"))
            continue
        problem = await _probe(connection, partial(_queue_exists, q))
        if problem is not None:
            drift.append(Drift("missing_queue", q.name, problem))
            continue
        problem = await _probe(connection, partial(_queue_equivalent, q))
        if problem is not None:
            drift.append(Drift("wrong_arguments", q.name, problem))
    return drift


def _binds(found: dict[str, Any], b: Binding) -> bool:
    if found.get("source") != b.exchange:
        return False
    if b.arguments:  # a headers binding: its arguments decide
        args = found.get("arguments") or {}
        return all(str(args.get(k)) == str(v) for k, v in b.arguments.items())
    return bool(found.get("routing_key") == b.routing_key)


async def _exchange_exists(x: Exchange, channel: AbstractChannel) -> None:
    await channel.declare_exchange(x.name, passive=True)


async def _exchange_equivalent(x: Exchange, channel: AbstractChannel) -> None:
    await channel.declare_exchange(x.name, ExchangeType(x.type), durable=True, arguments=x.arguments or None)


async def _queue_exists(q: Queue, channel: AbstractChannel) -> None:
    await channel.declare_queue(q.name, passive=True)


async def _queue_equivalent(q: Queue, channel: AbstractChannel) -> None:
    await channel.declare_queue(q.name, durable=True, arguments=q.arguments)


async def _probe(connection: AbstractConnection, step: Callable[[AbstractChannel], Awaitable[Any]]) -> str | None:
    """Run one declare on a channel of its own (a refusal closes the channel); the broker's
    refusal text, or None when it passed."""
    channel = await connection.channel()
    try:
        await step(channel)
    except (ChannelNotFoundEntity, ChannelPreconditionFailed) as exc:
        return str(exc.args[0] if exc.args else exc)[:300]
    finally:
        if not channel.is_closed:
            await channel.close()
    return None
