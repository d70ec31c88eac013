"""Outcomes, dead letters and delayed retries, each confirmed by the broker before anyone acks.

The channel runs with publisher confirms: `publish` returns only once RabbitMQ has taken the
message (or raises), so the consumer acks a request only after everything it owes is safe.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from gateway import contract as c
from gateway.topology import persistent

_STRIP = {
    "x-death",
    c.H_DELIVERY_COUNT,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
}


class Publisher:
    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._outcomes: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._retry: AbstractExchange | None = None

    async def start(self) -> None:
        self._outcomes = await self._channel.get_exchange(c.OUTCOMES_EXCHANGE, ensure=False)
        self._dead = await self._channel.get_exchange(c.DEAD_EXCHANGE, ensure=False)
        self._retry = await self._channel.get_exchange(c.RETRY_EXCHANGE, ensure=False)

    async def outcome(
        self,
        *,
        account: str,
        status: str,
        body: bytes,
        unique_id: str | None,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        assert self._outcomes is not None
        msg = persistent(body, correlation_id=unique_id, headers=headers or {})
        jobs = [self._outcomes.publish(msg, routing_key=f"{status}.{account}")]
        if reply_to:
            jobs.append(self._channel.default_exchange.publish(msg, routing_key=reply_to))
        await asyncio.gather(*jobs)

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
        assert self._dead is not None
        headers = _clean_headers(original.headers)
        headers.update(
            {
                c.H_REASON: str(reason),
                c.H_ERROR_CODE: error_code,
                c.H_ERROR_MESSAGE: error_message[:1000],
                c.H_ATTEMPTS: attempts,
                c.H_ACCOUNT: account,
            }
        )
        await self._dead.publish(_copy(original, headers), routing_key=f"{reason}.{account}")

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
        assert self._retry is not None
        headers = _clean_headers(original.headers)
        headers.update({c.H_ATTEMPTS: attempts, c.H_WAITS: waits, c.H_RETRY_DELAY: str(delay_ms)})
        if sent_at is not None:
            headers[c.H_SENT_AT] = str(round(sent_at, 3))
        await self._retry.publish(_copy(original, headers), routing_key=account)


def _clean_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in _STRIP}


def _copy(original: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        original.body,
        headers=headers,
        content_type=original.content_type or "application/json",
        content_encoding=original.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=original.message_id,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
    )
