"""Delivery tracking rebuilt from the broker after the state store lost it.

The store keeps each accepted message's correlation until its final event (dlr.py). A store that
loses its data (Redis restarted without persistence, a failover to a replica that had not caught
up) loses that too, and with it every pending delivery event. The broker keeps the same facts in
the `sms.tracking` stream (topology.py), for seven days: after each batch the worker publishes
there one copy of the batch's newly tracked messages (`x-gateway-tracked`, off the send path: the
outcomes do not wait for it), and the broker routes every `delivered` / `undelivered` event there.
When a process sees an account's store epoch change, it reads the stream from the oldest
acceptance still in the tracking window up to a marker it publishes first, and writes back, in
stream order, the tracking of each message accepted within the window and the final state of each
message that already had its event. The messages still pending are then polled as usual (their
first poll is long due), so each gets exactly one event; one whose window has ended gets
`undelivered` / `unknown` at once.

A rebuild is idempotent (a tracked message is left as it is, a final one stays final), so two
replicas that both saw the loss both rebuild, and nothing is published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, Collection, Mapping
from datetime import UTC, datetime
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from gateway import contract as c
from gateway.config import DlrOptions
from gateway.obs.logs import get_logger
from gateway.state import ClaimStore, ReportStore
from gateway.state.base import BatchRecord, Tracked

log = get_logger("gateway.dlr.tracking")

H_MARKER = "x-gateway-tracking-marker"  # the end of one rebuild's replay
CHUNK = 500  # records written to the store at once
REPLAY_MARGIN_S = 600.0
CLOCK_MARGIN_S = 5.0  # a stream read for one publish starts this long before it (clocks, chunk starts)


class TrackingStore(ClaimStore, ReportStore, Protocol):
    """A rebuild writes tracking back (`record`) and marks what had its final event."""


async def _replay(
    connection: AbstractConnection, since: float, prefetch: int
) -> AsyncGenerator[AbstractIncomingMessage, None]:
    """The tracking stream from `since` (epoch seconds) up to a marker published first: everything
    the broker had routed there before the call, each message acked once the caller has it."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await channel.set_qos(prefetch_count=prefetch)  # a stream consumer must have a prefetch
        marker = secrets.token_hex(8)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", headers={H_MARKER: marker}, content_type="application/json"),
            routing_key=c.TRACKING_STREAM,
        )
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        queue = await channel.get_queue(c.TRACKING_STREAM, ensure=False)
        tag = await queue.consume(inbox.put, arguments={"x-stream-offset": datetime.fromtimestamp(since, UTC)})
        while True:
            message = await inbox.get()
            seen = (message.headers or {}).get(H_MARKER)
            if seen is not None:
                await message.ack()
                if str(seen) == marker:
                    break
                continue
            yield message
            await message.ack()
        await queue.cancel(tag)
    finally:
        if not channel.is_closed:
            await channel.close()


async def rebuild(
    connection: AbstractConnection, store: TrackingStore, account: str, dlr: DlrOptions
) -> tuple[int, int]:
    """Replay the tracking stream for `account` into the store; returns (tracked, final) counts."""
    started = time.monotonic()
    tracked: list[Tracked] = []
    finals: list[str] = []
    counts = [0, 0]

    async def flush() -> None:
        if tracked:
            await store.record(
                account,
                BatchRecord(tracked=list(tracked), first_poll_s=dlr.poll_after_s, track_ttl_s=dlr.track_ttl_s),
            )
        if finals:
            await store.mark_final(account, list(finals), dlr.track_ttl_s)
        counts[0] += len(tracked)
        counts[1] += len(finals)
        tracked.clear()
        finals.clear()

    oldest = time.time() - dlr.window_s
    # From the oldest acceptance still tracked (a little before, for clocks that disagree).
    async with contextlib.aclosing(_replay(connection, oldest - REPLAY_MARGIN_S, CHUNK * 2)) as stream:
        async for message in stream:
            _take(message, account, message.headers or {}, oldest, tracked, finals)
            if len(tracked) + len(finals) >= CHUNK:
                await flush()
    await flush()
    log.warning(
        "tracking_rebuilt",
        account=account,
        tracked=counts[0],
        final=counts[1],
        seconds=round(time.monotonic() - started, 1),
    )
    return counts[0], counts[1]


async def events_published(
    connection: AbstractConnection, account: str, message_ids: Collection[str], since: float
) -> set[str]:
    """Which of `message_ids` have a delivery event of `account` in the tracking stream from
    `since` (epoch seconds) on: the broker's own word on a publish whose confirm was lost (the
    connection closed after the broker may have routed it)."""
    wanted = set(message_ids)
    found: set[str] = set()
    async with contextlib.aclosing(_replay(connection, since - CLOCK_MARGIN_S, CHUNK)) as stream:
        async for message in stream:
            headers = message.headers or {}
            if headers.get(c.H_TRACKED):
                continue
            finals: list[str] = []
            _take(message, account, headers, 0.0, [], finals)
            found.update(wanted.intersection(finals))
    return found


def _take(
    message: AbstractIncomingMessage,
    account: str,
    headers: Mapping[str, object],
    oldest: float,
    tracked: list[Tracked],
    finals: list[str],
) -> None:
    """One message of the stream into what the store gets back: a batch's copy of its tracked
    messages, or a delivery event. Anything unreadable is skipped, with a line."""
    try:
        doc = json.loads(message.body)
        if headers.get(c.H_TRACKED):
            if doc["account"] == account:
                batch = [Tracked.from_json(json.dumps(r)) for r in doc["tracked"]]
                tracked.extend(t for t in batch if t.accepted_at >= oldest)
            return
        status, _, name = (message.routing_key or "").partition(".")
        message_id = doc.get("provider_message_id")
        if name == account and status in (c.Status.DELIVERED, c.Status.UNDELIVERED) and message_id:
            finals.append(str(message_id))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("tracking_record_unreadable", routing_key=message.routing_key)
