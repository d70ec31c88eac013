"""Groups compatible items and hands a group over when it is full or has lingered long enough,
and only while its owner is ready for another batch.

A group that starts while the owner is ready (a send slot is free) does not wait out the linger:
it goes `quiet_s` (a few milliseconds) after it started, with whatever joined it meanwhile, so a
lone request (an OTP) waits for no companions and a burst still leaves as one batch. Under load
the slots are busy, groups start lingering, and batches grow.

A group that becomes due while the owner is busy (every send slot taken) keeps growing instead of
queueing up as a row of small batches: under load, batches grow to the size the owner can keep
up with, so the cost per message falls as the load rises instead of the backlog running away.

A group that started lingering (every slot was busy at that moment) is shortened when the owner
becomes `eager` as slots free: it then goes once it is `quiet_s` old, as if it had started with a
slot free. The consumer is eager when the busy moment has passed (at most half of its slots
taken) and nothing more is queued for it (its prefetch window has room). So a light load does
not wait out the whole linger behind one burst, while a heavy one (slots mostly busy) or a
backlog still fills its batches: small batches cost more CPU per message.

No I/O: the owner decides what a flush does (the consumer starts a send task) and calls `pump`
when it becomes ready again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gateway.clock import SYSTEM, Clock, Timer

T = TypeVar("T")


def _always() -> bool:
    return True


def _never() -> bool:
    return False


class Batcher(Generic[T]):
    def __init__(
        self,
        *,
        max_size: int,
        linger_s: float,
        key: Callable[[T], Hashable],
        quiet_s: float | None = None,
        on_flush: Callable[[list[T]], None],
        ready: Callable[[], bool] = _always,
        eager: Callable[[], bool] = _never,
        clock: Clock = SYSTEM,
    ) -> None:
        self._max = max_size
        self._linger = linger_s
        self._quiet = linger_s if quiet_s is None else min(quiet_s, linger_s)
        self._key = key
        self._on_flush = on_flush
        self._ready = ready
        self._eager = eager
        self._clock = clock
        self._groups: dict[Hashable, list[T]] = {}
        self._timers: dict[Hashable, Timer] = {}
        self._due: dict[Hashable, None] = {}  # groups full or past their linger, oldest first
        self._lingering: dict[Hashable, float] = {}  # groups on a linger timer: when each started

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    @property
    def waiting(self) -> bool:
        """A group is due and waits for the owner to be ready (work is queueing up)."""
        return bool(self._due)

    def add(self, item: T) -> None:
        k = self._key(item)
        group = self._groups.setdefault(k, [])
        group.append(item)
        if len(group) >= self._max or self._linger <= 0:
            self._make_due(k)
        elif k not in self._timers and k not in self._due:
            # A free send slot: go after `quiet_s` (low latency when idle); every slot busy:
            # linger and grow (big batches under load).
            if self._ready():
                self._timers[k] = self._clock.call_later(self._quiet, self._make_due, k)
            else:
                self._lingering[k] = self._clock.monotonic()
                self._timers[k] = self._clock.call_later(self._linger, self._make_due, k)

    def pump(self) -> None:
        """Hand due groups over, oldest first, at most `max_size` items each, while the owner is
        ready; then, if it is ready and eager, shorten the lingering groups to `quiet_s`."""
        while True:
            while self._due and self._ready():
                k = next(iter(self._due))
                group = self._groups.pop(k, [])
                batch, rest = group[: self._max], group[self._max :]
                if rest:  # arrived while the owner was busy: due at once
                    self._groups[k] = rest
                else:
                    del self._due[k]
                if batch:
                    self._on_flush(batch)
            if not (self._lingering and self._ready() and self._eager()):
                return
            now = self._clock.monotonic()
            lingering, self._lingering = self._lingering, {}
            for k, started in lingering.items():
                timer = self._timers.pop(k, None)
                if timer is not None:
                    timer.cancel()
                wait = started + self._quiet - now
                if wait <= 0:
                    self._due.setdefault(k, None)
                else:
                    self._timers[k] = self._clock.call_later(wait, self._make_due, k)
            if not self._due:
                return

    def flush_all(self) -> None:
        """Hand everything over now, ready or not (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        self._lingering.clear()
        groups, self._groups = self._groups, {}
        for group in groups.values():
            for start in range(0, len(group), self._max):
                self._on_flush(group[start : start + self._max])

    def take_all(self) -> list[T]:
        """Remove and return everything waiting, without flushing (pause, shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        self._lingering.clear()
        items = [i for g in self._groups.values() for i in g]
        self._groups.clear()
        return items

    def _make_due(self, k: Hashable) -> None:
        timer = self._timers.pop(k, None)
        if timer is not None:
            timer.cancel()
        self._lingering.pop(k, None)
        if k in self._groups:
            self._due.setdefault(k, None)
        self.pump()
