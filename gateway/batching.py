"""Groups compatible items and hands a group over when it is full or has lingered long enough,
and only while its owner is ready for another batch.

A group that starts while the owner is ready (a send slot is free) does not wait out the linger:
it goes once nothing new has joined it for `quiet_s` (a few milliseconds), so a lone request (an
OTP) waits for no companions while a burst still leaves as one batch. The linger bounds that
wait too.

A group that becomes due while the owner is busy (every send slot taken) keeps growing instead of
queueing up as a row of small batches: under load, batches grow to the size the owner can keep
up with, so the cost per message falls as the load rises instead of the backlog running away.

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
        clock: Clock = SYSTEM,
    ) -> None:
        self._max = max_size
        self._linger = linger_s
        self._quiet = linger_s if quiet_s is None else min(quiet_s, linger_s)
        self._key = key
        self._on_flush = on_flush
        self._ready = ready
        self._clock = clock
        self._groups: dict[Hashable, list[T]] = {}
        self._timers: dict[Hashable, Timer] = {}
        self._due: dict[Hashable, None] = {}  # groups full or past their linger, oldest first
        self._started: dict[Hashable, float] = {}  # when a quiet group began, and its latest arrival
        self._latest: dict[Hashable, float] = {}

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
        if k in self._started:
            self._latest[k] = self._clock.monotonic()
        if len(group) >= self._max or self._linger <= 0:
            self._make_due(k)
        elif k not in self._timers and k not in self._due:
            if self._ready() and self._quiet < self._linger:
                # A free send slot: go as soon as the group is quiet (low latency when idle).
                now = self._clock.monotonic()
                self._started[k] = self._latest[k] = now
                self._timers[k] = self._clock.call_later(self._quiet, self._quiet_check, k)
            else:  # every slot busy: linger and grow (big batches under load)
                self._timers[k] = self._clock.call_later(self._linger, self._make_due, k)

    def pump(self) -> None:
        """Hand due groups over, oldest first, at most `max_size` items each, while the owner is ready."""
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

    def flush_all(self) -> None:
        """Hand everything over now, ready or not (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        self._started.clear()
        self._latest.clear()
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
        self._started.clear()
        self._latest.clear()
        items = [i for g in self._groups.values() for i in g]
        self._groups.clear()
        return items

    def _quiet_check(self, k: Hashable) -> None:
        """A quiet group's timer: due when nothing joined it for `quiet_s`, or at its linger."""
        self._timers.pop(k, None)
        now = self._clock.monotonic()
        started, latest = self._started.get(k, now), self._latest.get(k, now)
        if now - latest >= self._quiet - 1e-9 or now - started >= self._linger - 1e-9:
            self._make_due(k)
            return
        wait = min(latest + self._quiet, started + self._linger) - now
        self._timers[k] = self._clock.call_later(max(wait, 0.0), self._quiet_check, k)

    def _make_due(self, k: Hashable) -> None:
        self._started.pop(k, None)
        self._latest.pop(k, None)
        timer = self._timers.pop(k, None)
        if timer is not None:
            timer.cancel()
        if k in self._groups:
            self._due.setdefault(k, None)
        self.pump()
