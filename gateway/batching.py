"""Groups compatible items and hands a group over when it is full or has lingered long enough.

No I/O: the owner decides what a flush does (the consumer starts a send task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(
        self,
        *,
        max_size: int,
        linger_s: float,
        key: Callable[[T], Hashable],
        on_flush: Callable[[list[T]], None],
    ) -> None:
        self._max = max_size
        self._linger = linger_s
        self._key = key
        self._on_flush = on_flush
        self._groups: dict[Hashable, list[T]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def add(self, item: T) -> None:
        k = self._key(item)
        group = self._groups.setdefault(k, [])
        group.append(item)
        if len(group) >= self._max or self._linger <= 0:
            self._flush(k)
        elif k not in self._timers:
            self._timers[k] = asyncio.get_running_loop().call_later(self._linger, self._flush, k)

    def flush_all(self) -> None:
        for k in list(self._groups):
            self._flush(k)

    def take_all(self) -> list[T]:
        """Remove and return everything waiting, without flushing (pause, shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        items = [i for g in self._groups.values() for i in g]
        self._groups.clear()
        return items

    def _flush(self, k: Hashable) -> None:
        timer = self._timers.pop(k, None)
        if timer is not None:
            timer.cancel()
        group = self._groups.pop(k, None)
        if group:
            self._on_flush(group)
