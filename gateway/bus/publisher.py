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
import json
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.commands import Basic

from gateway import contract as c
from gateway.errors import PublishTimeout
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.state.base import Tracked

log = get_logger("gateway.bus.publisher")
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


@dataclass(frozen=True, slots=True)
class Publish:
    """One message to publish, ready-made: what `Publisher.publish_all` sends."""

    exchange: str
    routing_key: str
    body: bytes
    props: Basic.Properties
    mandatory: bool


class Publisher:
    """Confirmed publishes on one channel. Every publish is bounded in time: after a lost
    connection a publish could otherwise wait forever (seen in the chaos suite: hundreds of
    publishes queued on the channel's lock, or on a confirm that never came, after the robust
    connection had reconnected). One that times out fails (its request is requeued by the
    settler) and the channel is replaced by a new one from `reopen`, once per wedged channel."""

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        timeout_s: float = 30.0,
        reopen: Callable[[], Awaitable[AbstractChannel]] | None = None,
    ) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        self._reopen = reopen
        self._replacing: asyncio.Task[None] | None = None
        self.replaced = 0  # channels replaced after a timeout (the tests read it)

    async def publish_all(self, publishes: Sequence[Publish]) -> list[BaseException | None]:
        """Publish them all at once, under one bound: the broker's answer to each, None when it
        confirmed. They start together, so one deadline for all is each one's own bound: one the
        broker confirmed before it stands, the others fail with `PublishTimeout`."""
        if not publishes:
            return []
        channel = self._channel
        sent: list[asyncio.Future[object]] = []
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._replacing is not None and not self._replacing.done():
                    await asyncio.shield(self._replacing)
                    channel = self._channel
                # The underlying channel is looked up per call: a robust channel swaps it on
                # reconnect. wait=False: do not hold the channel's publish lock until the frame has
                # been written (aiormq's default), which let only one publish per loop turn onto the
                # socket. The broker's confirm, awaited here, comes after the write anyway.
                underlay = await channel.get_underlay_channel()

                def send(x: Publish) -> Coroutine[Any, Any, object]:
                    return underlay.basic_publish(  # type: ignore[call-arg]  # `wait` is on aiormq's Channel
                        x.body,
                        exchange=x.exchange,
                        routing_key=x.routing_key,
                        properties=x.props,
                        mandatory=x.mandatory,
                        wait=False,
                    )

                if len(publishes) == 1:  # no task for a lone publish
                    try:
                        await send(publishes[0])
                    except Exception as exc:  # noqa: BLE001 - the caller's to handle, as for many
                        return [exc]
                    return [None]
                sent = [asyncio.ensure_future(send(x)) for x in publishes]
                await asyncio.wait(sent)
        except TimeoutError:
            self._replace(channel)
            if not sent:
                return [PublishTimeout(f"not confirmed within {self._timeout_s} s")] * len(publishes)
        except BaseException:
            for future in sent:  # cancelled from outside (a shutdown): nothing of it goes on alone
                future.cancel()
            raise
        answers: list[BaseException | None] = []
        for future in sent:
            if not future.done():  # past the bound
                future.cancel()
                answers.append(PublishTimeout(f"not confirmed within {self._timeout_s} s"))
            elif future.cancelled():  # by the channel's close
                answers.append(asyncio.CancelledError())
            else:
                answers.append(future.exception())
        return answers

    async def publish(self, *publishes: Publish) -> None:
        """Publish them all at once and raise the first failure."""
        for failure in await self.publish_all(publishes):
            if failure is not None:
                raise failure

    def _replace(self, wedged: AbstractChannel) -> None:
        if self._reopen is None or wedged is not self._channel:
            return  # no way to replace it, or replaced already
        if self._replacing is not None and not self._replacing.done():
            return
        self._replacing = asyncio.create_task(self._swap(wedged), name="replace publisher channel")

    async def _swap(self, wedged: AbstractChannel) -> None:
        assert self._reopen is not None
        try:
            fresh = await self._reopen()
        except Exception as exc:  # noqa: BLE001 - the broker is away: the next timeout tries again
            log.warning("publisher_channel_not_replaced", error=type(exc).__name__)
            return
        self._channel = fresh
        self.replaced += 1
        m.PUBLISHER_REPLACED.inc()
        log.warning("publisher_channel_replaced", timeout_s=self._timeout_s)
        try:  # best effort: a wedged channel may not even close
            async with asyncio.timeout(5):
                await wedged.close()
        except Exception:  # noqa: BLE001, S110 - it is abandoned either way
            pass

    def outcome_publishes(
        self,
        *,
        account: str,
        status: str,
        body: bytes,
        unique_id: str | None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> list[Publish]:
        """An outcome on `sms.outcomes`, and to the producer's `reply_to` when it named one.
        `correlation_id`: the request's own, kept for the producer's RPC matching; else `unique_id`."""
        props = Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            correlation_id=correlation_id or unique_id,
            headers=headers or None,
        )
        out = [Publish(c.OUTCOMES_EXCHANGE, f"{status}.{account}", body, props, mandatory=False)]
        if reply_to:
            out.append(Publish("", reply_to, body, props, mandatory=False))
        return out

    async def outcome(self, **fields: Any) -> None:
        """`outcome_publishes(**fields)`, published (the delivery-report desk's outcomes)."""
        await self.publish(*self.outcome_publishes(**fields))

    async def tracking_copy(self, account: str, records: Sequence[Tracked]) -> None:
        """One batch's tracked messages into the tracking stream (tracking.py), confirmed."""
        body = f'{{"account":{json.dumps(account)},"tracked":[{",".join(r.to_json() for r in records)}]}}'.encode()
        props = Basic.Properties(content_type="application/json", delivery_mode=PERSISTENT, headers={c.H_TRACKED: 1})
        await self.publish(Publish("", c.TRACKING_STREAM, body, props, mandatory=True))

    def dead_letter(
        self,
        original: AbstractIncomingMessage,
        *,
        reason: c.DeadReason,
        account: str,
        error_code: str,
        error_message: str,
        attempts: int,
        lane: c.Lane | None = None,
        exchange: str | None = None,
    ) -> Publish:
        """The request's dead letter, mandatory. `exchange`: the letter came from an exchange other
        than sms.send (a replay goes there)."""
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
        if lane is not None:
            headers[c.H_LANE] = str(lane)
        if exchange is not None:
            headers[c.H_EXCHANGE] = exchange
        return Publish(c.DEAD_EXCHANGE, f"{reason}.{account}", original.body, _copy(original, headers), mandatory=True)

    def retry(
        self,
        original: AbstractIncomingMessage,
        *,
        routing_key: str,
        delay_ms: int,
        attempts: int,
        waits: int,
        sent_at: float | None = None,
        waiting_since: float | None = None,
        own: bool = True,
        valid_until: float | None = None,
        via: tuple[str, ...] = (),
    ) -> Publish:
        """Park a byte-identical copy in the TTL queue for `delay_ms`; it comes back to sms.send with
        `routing_key` (its account's lane). `valid_until`: an urgent request's deadline.
        `own` marks it the gateway's own copy (`x-gateway-own`): false only for a wait copy of a
        producer's second copy. `waiting_since` starts or continues a wait for another worker's
        claim; a copy without it carries no earlier wait's start. `via`: the accounts an attempt whose
        fate is unknown may have reached (with `sent_at`)."""
        headers = _clean_headers(original.headers)
        headers.pop(c.H_WAITING_SINCE, None)
        headers.pop(c.H_OWN, None)
        headers.update({c.H_ATTEMPTS: attempts, c.H_WAITS: waits, c.H_RETRY_DELAY: str(delay_ms)})
        if own:
            headers[c.H_OWN] = 1
        if sent_at is not None:
            headers[c.H_SENT_AT] = str(round(sent_at, 3))
            headers.pop(c.H_VIA, None)
            if via:
                headers[c.H_VIA] = ",".join(via)
        if waiting_since is not None:
            headers[c.H_WAITING_SINCE] = str(round(waiting_since, 3))
        if valid_until is not None:
            headers[c.H_VALID_UNTIL] = str(round(valid_until, 3))
        return Publish(c.RETRY_EXCHANGE, routing_key, original.body, _copy(original, headers), mandatory=True)


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
