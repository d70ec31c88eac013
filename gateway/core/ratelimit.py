"""Waiting for rate-limit tokens, and the throttle slow-down.

The account's token bucket lives in the state store, so every replica draws on the same budget
(`rate_per_s`, `burst`). When the provider throttles (Mobizon 30, HTTP 429) the store halves the
account's factor, and every later grant, on every replica, runs at rate x factor until the factor
has climbed back (state.base: THROTTLE_*). Nothing here keeps rate state in process memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway.clock import SYSTEM, Clock
from gateway.config import Account
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.state import Grant, RateStore
from gateway.state.base import NORMAL_RANK

log = get_logger("gateway.core.ratelimit")
T = TypeVar("T")
MAX_POLL_S = 0.05  # while tokens run short, look again at least this often (or every linger)


class RateLimiter:
    def __init__(self, store: RateStore, account: Account, clock: Clock = SYSTEM, *, rank: int = NORMAL_RANK) -> None:
        self._store = store
        self._account = account
        self._clock = clock
        self._rank = rank  # the lane's: the store serves lower ranks first (state.base: LANE_DEMAND_MARGIN_S)
        self.factor = 1.0  # the account's slow-down as the last grant reported it

    @property
    def limits(self) -> tuple[float, int]:
        """The configured rate and burst: the store scales both by the account's factor."""
        return self._account.rate_per_s, self._account.burst

    async def pace(
        self, items: Sequence[T], first: Grant | None, send: Callable[[list[T]], Awaitable[None]]
    ) -> list[T]:
        """Hand `items` to `send` in chunks as tokens are granted (`first`: tokens already taken),
        and wait for every chunk's send. Returns the items never handed over because the store
        failed (empty when all went)."""
        name = self._account.name
        pending = list(items)
        grant = first
        sends: list[asyncio.Task[None]] = []
        try:
            while pending:
                if grant is None:
                    try:
                        grant = await self._store.acquire(
                            name, len(pending), *self.limits, rank=self._rank, min_share=self._account.lane_min_share
                        )
                    except Exception:  # the store is away; what is sent stays sent
                        log.exception("acquire_failed", account=name, waiting=len(pending))
                        return pending
                self._observe(grant.factor)
                if grant.granted:
                    chunk, pending = pending[: grant.granted], pending[grant.granted :]
                    sends.append(asyncio.create_task(_run(send, chunk)))
                if pending:
                    pause = max(grant.wait_s, min(self._account.linger_ms / 1000, MAX_POLL_S))
                    m.RATE_LIMIT_WAIT.labels(name).inc(pause)
                    await self._clock.sleep(pause)
                grant = None
            return []
        finally:
            await asyncio.gather(*sends)

    async def throttled(self) -> None:
        """The provider throttled the account: slow it down on every replica."""
        try:
            factor = await self._store.throttle(self._account.name)
        except Exception as exc:  # noqa: BLE001 - the retry is already scheduled; the next throttle cuts
            log.warning("throttle_not_stored", account=self._account.name, error=type(exc).__name__)
            return
        if factor < self.factor:
            log.warning(
                "account_throttled", account=self._account.name, rate_per_s=round(self._account.rate_per_s * factor, 3)
            )
        self._observe(factor)

    def _observe(self, factor: float) -> None:
        if factor != self.factor:
            self.factor = factor
            m.RATE_FACTOR.labels(self._account.name).set(factor)


async def _run(send: Callable[[list[T]], Awaitable[None]], chunk: list[T]) -> None:
    await send(chunk)
