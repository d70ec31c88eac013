"""Fakes behind the gateway's own protocols (never patches of its modules): a clock tests move by
hand, an adapter and a store that wrap real ones and fail on demand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from gateway.config import Settings
from gateway.providers.base import ItemResult, Outbound, ProviderAdapter, StatusReport, Verdict, batch_key
from gateway.state import Store


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A `Clock` whose time moves only when told (`advance`, or `sleep`, which advances)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._time = start
        self._mono = 1_000.0
        self._timers: list[tuple[float, int, FakeTimer, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._time

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._time, UTC)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would

    def call_later(self, seconds: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (self._mono + seconds, next(self._seq), timer, callback, args))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time on, running every timer that falls due on the way, in order."""
        until = self._mono + max(0.0, seconds)
        while self._timers and self._timers[0][0] <= until:
            due, _, timer, callback, args = heapq.heappop(self._timers)
            self._time += due - self._mono
            self._mono = due
            if not timer.cancelled:
                callback(*args)
        self._time += until - self._mono
        self._mono = until


class BuggyAdapter:
    """A real adapter with bugs on demand: admitting a message whose unique_id is in `crash_on`
    raises (a bug only that message triggers), and the first `raise_after_send` sends raise after
    the request went out."""

    def __init__(self, inner: ProviderAdapter, *, crash_on: Sequence[str] = (), raise_after_send: int = 0) -> None:
        self._inner = inner
        self._crash_on = set(crash_on)
        self._raise_after_send = raise_after_send
        self.raised = 0
        self.name = inner.name
        self.max_batch = inner.max_batch
        self.max_status_ids = inner.max_status_ids

    def batch_key(self, item: Outbound) -> Hashable:
        if item.unique_id in self._crash_on:
            raise RuntimeError("a bug that only this message triggers")
        return self._inner.batch_key(item)

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        results = await self._inner.send(batch)
        if self.raised < self._raise_after_send:
            self.raised += 1
            raise RuntimeError("a bug after the request went out")
        return results

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        return await self._inner.lookup(batch)

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        return await self._inner.statuses(message_ids)

    async def close(self) -> None:
        await self._inner.close()


class FailingStore:
    """The real store, with chosen calls failing (a Redis that went away mid-batch): the first
    `times` calls of the methods named in `fail` raise ConnectionError. `around` is the
    gateway's store factory: it opens the real store the settings name and wraps it."""

    def __init__(self, fail: set[str], times: int = 10**9, inner: Store | None = None) -> None:
        self._inner = inner
        self.fail = fail
        self.failed = 0
        self._times = times

    def around(self, settings: Settings) -> Store:
        from gateway.app import open_store

        self._inner = open_store(settings)
        return cast(Store, self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        real = getattr(self._inner, name)
        if name not in self.fail:
            return real

        async def broken(*args: Any, **kwargs: Any) -> Any:
            if self.failed >= self._times:
                return await real(*args, **kwargs)
            self.failed += 1
            raise ConnectionError(f"store down during {name}")

        return broken


class AcceptingAdapter:
    """A provider that takes every message at once and remembers which (no HTTP): for the pipeline's
    own decisions."""

    name = "serwersms"
    max_batch = 1000
    max_status_ids = 100

    def __init__(self) -> None:
        self.sent: list[str] = []

    def batch_key(self, item: Outbound) -> Hashable:
        return batch_key(item)

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        self.sent += [o.unique_id for o in batch]
        return [ItemResult(Verdict.ACCEPTED, provider_message_id=f"p-{o.unique_id}", parts=o.parts) for o in batch]

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        return [None] * len(batch)

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        return []

    async def close(self) -> None:
        return None


class ScriptedAdapter:
    """A provider whose answer to each message is chosen by the test (`answer`), that remembers what
    it took (`sent`, `held`) and answers lookups from `held` (or fails them: `lookups_fail`)."""

    max_batch = 1000
    max_status_ids = 100

    def __init__(self, name: str = "serwersms", answer: Callable[[Outbound], ItemResult] | None = None) -> None:
        self.name = name
        self.answer = answer or (lambda o: ItemResult(Verdict.ACCEPTED, provider_message_id=f"{name}-{o.unique_id}"))
        self.sent: list[Outbound] = []  # every message a send call carried
        self.held: dict[str, ItemResult] = {}  # unique_id -> what the provider holds
        self.lookups_fail = False
        self.looked_up: list[str] = []

    def batch_key(self, item: Outbound) -> Hashable:
        return batch_key(item)

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        self.sent += batch
        results = [self.answer(o) for o in batch]
        for o, r in zip(batch, results, strict=True):
            if r.verdict is Verdict.ACCEPTED or (r.error is not None and r.error.code == "swallowed"):
                self.held[o.unique_id] = ItemResult(Verdict.ACCEPTED, provider_message_id=f"{self.name}-{o.unique_id}")
        return results

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        from gateway.errors import LookupFailed

        self.looked_up += [o.unique_id for o in batch]
        if self.lookups_fail:
            raise LookupFailed("the provider cannot be asked")
        return [self.held.get(o.unique_id) for o in batch]

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        return []

    async def close(self) -> None:
        return None
