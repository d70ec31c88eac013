"""Outcomes, dead letters and delayed retries, each confirmed by the broker before anyone acks.

The channel runs with publisher confirms: a publish returns only once RabbitMQ has taken the
message (or raises), so the consumer acks a request only after everything it owes is safe.

Publishes go straight to the channel's AMQP layer with ready-made properties (no aio-pika
`Message` per publish: it was a measurable share of the CPU per SMS). Outcomes are published
without `mandatory`: an outcome nobody has bound a queue for is dropped by the broker, by design.
Dead letters and retry copies are `mandatory` on a channel opened with `on_return_raises`, so one
that no queue takes fails the publish and the request is requeued instead of acked.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.commands import Basic

from gateway import contract as c

_table_integer = pamqp.encode.table_integer


def _table_integer_signed(value: int) -> bytes:
    """pamqp writes -128..-1 as an unsigned octet and raises, so a producer's header such as
    `retries: -1` (any client may send it; pamqp reads it fine) made every dead letter and retry
    copy of that message fail to encode. Those values go one size up, as a signed short."""
    if -128 <= value < 0:
        return b"s" + pamqp.encode.short_int(value)
    return _table_integer(value)


pamqp.encode.table_integer = _table_integer_signed  # encode_table_value looks it up at each call

_STRIP = c.BROKER_HEADERS
PERSISTENT = 2


class Publisher:
    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, props: Basic.Properties, *, mandatory: bool
    ) -> None:
        # The underlying channel is looked up per publish: a robust channel swaps it on reconnect.
        # wait=False: do not hold the channel's publish lock until this frame has been written
        # (aiormq's default), which let only one publish per loop turn onto the socket. The
        # broker's confirm, awaited here, comes after the write anyway; the write queue is bounded
        # and publishes in flight are bounded by the consumers' prefetch.
        channel = await self._channel.get_underlay_channel()
        await channel.basic_publish(  # type: ignore[call-arg]  # `wait` is on aiormq's Channel, not its ABC
            body, exchange=exchange, routing_key=routing_key, properties=props, mandatory=mandatory, wait=False
        )

    async def outcome(
        self,
        *,
        account: str,
        status: str,
        body: bytes,
        unique_id: str | None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """`correlation_id`: the request's own, kept for the producer's RPC matching; else `unique_id`."""
        props = Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            correlation_id=correlation_id or unique_id,
            headers=headers or None,
        )
        routing_key = f"{status}.{account}"
        if not reply_to:
            await self._publish(c.OUTCOMES_EXCHANGE, routing_key, body, props, mandatory=False)
            return
        await asyncio.gather(
            self._publish(c.OUTCOMES_EXCHANGE, routing_key, body, props, mandatory=False),
            self._publish("", reply_to, body, props, mandatory=False),
        )

    async def dead_letter(
        self,
        original: AbstractIncomingMessage,
        *,
        reason: c.DeadReason,
        account: str,
        error_code: str,
        error_message: str,
        attempts: int,
    ) -> None:
        headers = _clean_headers(original.headers)
        headers.update(
            {
                c.H_REASON: str(reason),
                c.H_ERROR_CODE: error_code,
                c.H_ERROR_MESSAGE: error_message[:1000],
                c.H_ATTEMPTS: attempts,
                c.H_ACCOUNT: account,
                c.H_DEAD_AT: c.rfc3339(datetime.now(UTC)),
            }
        )
        await self._publish(
            c.DEAD_EXCHANGE, f"{reason}.{account}", original.body, _copy(original, headers), mandatory=True
        )

    async def retry(
        self,
        original: AbstractIncomingMessage,
        *,
        account: str,
        delay_ms: int,
        attempts: int,
        waits: int,
        sent_at: float | None = None,
    ) -> None:
        """Park a byte-identical copy in the TTL queue for `delay_ms`; it comes back to sms.send."""
        headers = _clean_headers(original.headers)
        headers.update({c.H_ATTEMPTS: attempts, c.H_WAITS: waits, c.H_RETRY_DELAY: str(delay_ms)})
        if sent_at is not None:
            headers[c.H_SENT_AT] = str(round(sent_at, 3))
        await self._publish(c.RETRY_EXCHANGE, account, original.body, _copy(original, headers), mandatory=True)


def _clean_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in _STRIP}


def _copy(original: AbstractIncomingMessage, headers: dict[str, Any]) -> Basic.Properties:
    """The original's properties with new headers; persistent whatever the producer chose."""
    return Basic.Properties(
        headers=headers,
        content_type=original.content_type or "application/json",
        content_encoding=original.content_encoding,
        delivery_mode=PERSISTENT,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=original.message_id,
        timestamp=original.timestamp,
        message_type=original.type,
        app_id=original.app_id,
    )
