"""The consumer watchdog (bus/queue.py: Watchdog): one task looks at every queue consumer of the
event loop, so a thousand accounts' lanes cost one timer a second, not one each."""

from __future__ import annotations

import asyncio

import pytest

from gateway.bus import queue as gq
from gateway.bus.queue import Watchdog


class FakeConsumer:
    def __init__(self, name: str, fails: bool = False) -> None:
        self.queue_name = name
        self.looks = 0
        self.fails = fails

    def look(self) -> None:
        self.looks += 1
        if self.fails:
            raise RuntimeError("a bug in one consumer's look")


def watch_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "consumer watchdog" and not t.done()]


async def test_one_task_looks_at_every_consumer_and_one_that_fails_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gq, "WATCH_INTERVAL_S", 0.01)
    watchdog = Watchdog.of_this_loop()
    assert Watchdog.of_this_loop() is watchdog
    consumers = [FakeConsumer(f"q{i}", fails=i == 3) for i in range(3000)]
    for consumer in consumers:
        watchdog.add(consumer)  # type: ignore[arg-type]
    assert len(watch_tasks()) == 1
    for _ in range(500):
        if min(c.looks for c in consumers) >= 3:
            break
        await asyncio.sleep(0.01)
    assert min(c.looks for c in consumers) >= 3
    assert len(watch_tasks()) == 1
    for consumer in consumers:
        watchdog.discard(consumer)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert watch_tasks() == []  # nothing left to watch: no task, no timer
    looks = [c.looks for c in consumers]
    await asyncio.sleep(0.05)
    assert [c.looks for c in consumers] == looks
    watchdog.add(consumers[0])  # type: ignore[arg-type]
    assert len(watch_tasks()) == 1  # a consumer started later is watched again
    watchdog.discard(consumers[0])  # type: ignore[arg-type]
