"""The delivery-report poll scheduler (dlr/desk.py: PollScheduler): one task for every account's
polls; idle accounts cost one store look for all of them, not a poll loop each. Fake clock: the
scheduler's own sleeps move time on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.dlr.desk import PollScheduler
from tests.fakes import FakeClock


class FakePoller:
    def __init__(self, name: str, clock: FakeClock, finds: int = 0) -> None:
        self.name = name
        self.scheduler: PollScheduler | None = None
        self._clock = clock
        self.finds = finds  # how many rounds from now find messages due
        self.rounds: list[float] = []
        self.gate: asyncio.Event | None = None

    async def round(self) -> bool:
        self.rounds.append(self._clock.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.finds > 0:
            self.finds -= 1
            return True
        return False


class FakeStore:
    def __init__(self) -> None:
        self.due: set[str] = set()
        self.looks: list[tuple[float, int]] = []
        self.fail = 0
        self.clock: FakeClock | None = None

    async def due_accounts(self, accounts: Sequence[str]) -> set[str]:
        assert self.clock is not None
        self.looks.append((self.clock.monotonic(), len(accounts)))
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store away")
        return self.due & set(accounts)


def world(n: int, **kw: float) -> tuple[FakeClock, FakeStore, list[FakePoller], PollScheduler]:
    clock = FakeClock()
    store = FakeStore()
    store.clock = clock
    pollers = [FakePoller(f"a{i:04d}", clock) for i in range(n)]
    scheduler = PollScheduler(pollers, store, clock=clock, **kw)  # type: ignore[arg-type]
    return clock, store, pollers, scheduler


async def run_for(clock: FakeClock, scheduler: PollScheduler, seconds: float) -> None:
    """Run the scheduler until its sleeps have moved the fake clock on by `seconds`."""
    until = clock.monotonic() + seconds
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(100_000):
            if clock.monotonic() >= until:
                break
            await asyncio.sleep(0)
        else:
            pytest.fail("the scheduler did not move on")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_thousand_idle_accounts_cost_one_store_look_every_few_seconds_and_no_poll() -> None:
    clock, store, pollers, scheduler = world(1000)
    await run_for(clock, scheduler, 10)
    assert [n for _, n in store.looks] == [1000] * len(store.looks)
    assert 4 <= len(store.looks) <= 6  # every LOOK_EVERY_S (2 s) over 10 s
    assert sum(len(p.rounds) for p in pollers) == 0


async def test_an_account_with_a_poll_due_polls_every_second_while_it_finds_messages_then_idles() -> None:
    clock, store, pollers, scheduler = world(50)
    hot = pollers[7]
    hot.finds = 3
    store.due = {hot.name}
    start = clock.monotonic()

    async def stop_being_due() -> None:
        while not hot.rounds:
            await asyncio.sleep(0)
        store.due = set()

    helper = asyncio.create_task(stop_being_due())
    await run_for(clock, scheduler, 12)
    await helper
    # found at the first look, then polled each second while its rounds found messages, the
    # round that found none included; then only the looks, which no longer find it due (a round
    # starts once the scheduler sleeps, which is when the fake clock moves on: hence 1, not 0)
    assert [round(t - start) for t in hot.rounds] == [1, 2, 3, 4]
    assert sum(len(p.rounds) for p in pollers) == 4
    # while it polled on its own it was not in the looks
    assert min(n for _, n in store.looks) == 49


async def test_a_wake_polls_at_the_next_tick_without_waiting_for_a_look() -> None:
    clock, store, pollers, scheduler = world(20, look_every_s=3600)
    start = clock.monotonic()

    async def wake_later() -> None:
        while clock.monotonic() < start + 5:
            await asyncio.sleep(0)
        pollers[3].scheduler.wake(pollers[3].name)  # type: ignore[union-attr]

    helper = asyncio.create_task(wake_later())
    await run_for(clock, scheduler, 10)
    await helper
    assert len(store.looks) == 1  # the first round's, at the start
    assert len(pollers[3].rounds) == 2  # woken, and once more a second later (a wake is traffic)
    assert 5 <= pollers[3].rounds[0] - start <= 6.0


async def test_a_look_that_fails_is_asked_again_at_the_next_look() -> None:
    clock, store, pollers, scheduler = world(10)
    store.fail = 2
    store.due = {pollers[0].name}
    await run_for(clock, scheduler, 8)
    assert len(store.looks) >= 3
    assert pollers[0].rounds  # the third look found it


async def test_at_most_the_concurrency_limit_of_accounts_poll_at_once_and_each_has_one_round() -> None:
    _clock, store, pollers, scheduler = world(40, concurrency=16)
    gate = asyncio.Event()
    for p in pollers:
        p.gate = gate
    store.due = {p.name for p in pollers}
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(200):
            await asyncio.sleep(0)
        started = [p for p in pollers if p.rounds]
        assert len(started) == 16
        assert all(len(p.rounds) == 1 for p in started)  # still due, but its round is running
        gate.set()
        for _ in range(2000):
            if all(p.rounds for p in pollers):
                break
            await asyncio.sleep(0)
        assert all(p.rounds for p in pollers)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancelling_the_scheduler_cancels_the_rounds_in_flight() -> None:
    _clock, store, pollers, scheduler = world(3)
    gate = asyncio.Event()
    pollers[1].gate = gate
    store.due = {pollers[1].name}
    task = asyncio.create_task(scheduler.run())
    for _ in range(50):
        await asyncio.sleep(0)
    assert pollers[1].rounds
    rounds = [t for t in asyncio.all_tasks() if t.get_name() == f"dlr poll {pollers[1].name}"]
    assert len(rounds) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert rounds[0].done()
