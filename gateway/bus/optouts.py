"""sms.optout --> OptOutWorker: each message is one change to the opt-out registry in the state
store, from any application in any language (`contract.decode_optout`).

One gateway consumes at a time (the queue's single active consumer) and handles one message at a
time, so the changes apply in the order they were published: an `add` then a `remove` of a number
leaves it removed. A message ends one of three ways:
- applied: the store took it, then it is acked;
- bad input (an unreadable body, a number that is not one, a routing key that names no configured
  account): dead-lettered with the reason and acked; `gateway dlq replay` sends it back here;
- the store failed: given back to the queue after a pause, holding the messages behind it; the
  queue's delivery limit dead-letters it (`poison`) after that many tries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from gateway import contract as c
from gateway.bus.consumer import Worker
from gateway.bus.publisher import Publisher
from gateway.clock import SYSTEM, Clock
from gateway.config import Account, WorkerOptions
from gateway.contract import InvalidRequest
from gateway.errors import InvalidNumber
from gateway.numbers import mask, normalize
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.state.base import OPTOUT_ALL, OptOut, OptOutStore

log = get_logger("gateway.bus.optouts")

PREFETCH = 50
STORE_RETRY_S = 1.0  # a change the store failed goes back to the queue after this pause
INTERNATIONAL_ONLY = "ZZ"  # no default region: a number for all accounts must be international


class OptOutWorker(Worker):
    def __init__(
        self,
        publisher: Publisher,
        store: OptOutStore,
        accounts: Mapping[str, Account],
        options: WorkerOptions,
        clock: Clock = SYSTEM,
    ) -> None:
        super().__init__(publisher, None, options.publish_timeout_s, clock)
        self._store = store
        self._accounts = accounts
        self._clock = clock
        self._one_at_a_time = asyncio.Lock()  # waiters take it in arrival order: deliveries stay in order

    async def start(self, channel: AbstractChannel) -> None:
        await self._consume(channel, c.OPTOUT_QUEUE, PREFETCH, lambda: not self._stopping)

    async def stop(self) -> None:
        await self._stop_consuming()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        async with self._one_at_a_time:
            if self._acks.stale(message):
                return  # its channel is gone: the broker delivers it again
            await self._handle(message)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        key = message.routing_key or ""
        parsed = c.decode_optout(message.body, now=self._clock.now())
        if isinstance(parsed, InvalidRequest):
            await self._dead(message, key, c.DeadReason.INVALID, parsed.code, parsed.message)
            return
        if key == c.OPTOUT_ALL_KEY:
            scope, region = OPTOUT_ALL, INTERNATIONAL_ONLY
        elif key in self._accounts:
            scope, region = key, self._accounts[key].default_country
        else:
            await self._dead(
                message, key, c.DeadReason.UNKNOWN_ACCOUNT, "unknown_account", f"no account named {key[:200]!r}"
            )
            return
        try:
            number = normalize(parsed.to, region)
        except InvalidNumber as exc:
            await self._dead(message, key, c.DeadReason.INVALID, "invalid_number", str(exc))
            return
        try:
            if parsed.action is c.OptOutAction.ADD:
                who = message.app_id or message.user_id or ""
                entry = OptOut(number, parsed.at.astimezone(UTC).timestamp(), "bus", parsed.source, who)
                await self._store.optout_add(scope, [entry])
            else:
                await self._store.optout_remove(scope, [number])
        except Exception as exc:  # noqa: BLE001 - the store is away: the change waits in the queue
            log.warning("optout_store_failed", scope=key, error=type(exc).__name__, retry_in_s=STORE_RETRY_S)
            await self._clock.sleep(STORE_RETRY_S)
            await self._acks.requeue(message)
            return
        m.OPTOUT_CHANGES.labels(key, str(parsed.action), "bus").inc()
        log.info("optout_changed", scope=key, action=str(parsed.action), to=mask(number), source=parsed.source)
        await self._acks.ack([message])

    async def _dead(
        self, message: AbstractIncomingMessage, key: str, reason: c.DeadReason, code: str, why: str
    ) -> None:
        log.warning("optout_refused", scope=key[:200], reason=str(reason), code=code)
        await self._publisher.publish(
            self._publisher.dead_letter(
                message,
                reason=reason,
                account=key[:200] or "(none)",
                error_code=code,
                error_message=why,
                attempts=0,
                exchange=c.OPTOUT_EXCHANGE,
            )
        )
        m.DEAD_LETTERS.labels(c.OPTOUT_QUEUE, str(reason)).inc()
        await self._acks.ack([message])
