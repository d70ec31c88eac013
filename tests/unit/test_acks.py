"""AckTracker: which ack/nack frames go out, and in what order, for a channel's deliveries."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest

from gateway.bus.acks import AckTracker
from gateway.errors import StaleDelivery
from tests.fakes import FakeClock


class FakeChannel:
    def __init__(self, stalls: list[int] | None = None) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self.is_closed = False
        self._stalls = stalls or []  # loop turns each successive ack waits (a full write queue)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        for _ in range(self._stalls.pop(0) if self._stalls else 0):
            await asyncio.sleep(0)
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True) -> None:
        self.frames.append(("nack", tag, requeue))


class FakeMessage:
    def __init__(self, channel: FakeChannel, tag: int) -> None:
        self._channel = channel
        self.delivery_tag = tag

    @property
    def channel(self) -> FakeChannel:
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError
        return self._channel


def deliver(tracker: AckTracker, channel: FakeChannel, tags: range) -> list[Any]:
    messages = [FakeMessage(channel, t) for t in tags]
    for m in messages:
        tracker.delivered(m)  # type: ignore[arg-type]
    return messages


async def test_settled_prefix_is_one_multiple_ack() -> None:
    ch, tracker = FakeChannel(), AckTracker()
    ms = deliver(tracker, ch, range(1, 101))
    await tracker.ack(ms[:60])
    assert ch.frames == [("ack", 60, True)]
    await tracker.ack(ms[60:])  # the 40 left open are the next prefix
    assert ch.frames[1:] == [("ack", 100, True)]


async def test_acks_behind_an_open_delivery_go_one_by_one_at_once() -> None:
    ch, tracker = FakeChannel(), AckTracker()
    ms = deliver(tracker, ch, range(1, 7))
    await tracker.ack(ms[3:5])  # 4 and 5 while 1..3 are still in a batch
    assert ch.frames == [("ack", 4, False), ("ack", 5, False)]
    await tracker.ack(ms[:3])  # 1..3: a multiple ack stopping before the still-open 6
    assert ch.frames[2:] == [("ack", 3, True)]
    await tracker.ack(ms[5:])
    assert ch.frames[3:] == [("ack", 6, True)]
    later = deliver(tracker, ch, range(7, 9))
    await tracker.ack(later[:1])
    assert ch.frames[4:] == [("ack", 7, True)]  # a multiple ack: nothing older is left open


async def test_a_requeued_delivery_is_never_covered_by_a_later_multiple_ack() -> None:
    ch, tracker = FakeChannel(), AckTracker()
    ms = deliver(tracker, ch, range(1, 5))
    await tracker.requeue(ms[1])
    await tracker.ack([ms[0], ms[2], ms[3]])
    # The nack of 2 went out first, so the multiple ack at 4 settles 1, 3 and 4 only.
    assert ch.frames == [("nack", 2, True), ("ack", 4, True)]


async def test_a_delivery_is_settled_at_most_once() -> None:
    ch, tracker = FakeChannel(), AckTracker()
    ms = deliver(tracker, ch, range(1, 3))
    await tracker.ack(ms[:1])
    with pytest.raises(StaleDelivery):
        await tracker.ack(ms[:1])
    with pytest.raises(StaleDelivery):
        await tracker.requeue(ms[0])
    assert ch.frames == [("ack", 1, True)]


async def test_deliveries_of_a_replaced_channel_are_stale() -> None:
    old, new, tracker = FakeChannel(), FakeChannel(), AckTracker()
    stale = deliver(tracker, old, range(1, 4))
    old.is_closed = True
    fresh = deliver(tracker, new, range(1, 3))  # tags start again on the new channel
    with pytest.raises(StaleDelivery):
        await tracker.ack(stale)
    await tracker.ack(fresh)
    assert old.frames == []
    assert new.frames == [("ack", 2, True)]


async def test_a_channel_given_up_gets_no_frame_while_it_is_being_closed() -> None:
    # Between our channel.close and the broker's close-ok the channel still looks open; an ack
    # written then reaches a channel the broker has freed, and it closes the connection (504).
    ch, tracker = FakeChannel(), AckTracker()
    ms = deliver(tracker, ch, range(1, 4))
    assert tracker.give_up(ch) is True  # type: ignore[arg-type]
    assert tracker.give_up(ch) is False  # type: ignore[arg-type]  # once
    with pytest.raises(StaleDelivery):
        await tracker.ack(ms)
    with pytest.raises(StaleDelivery):
        await tracker.requeue(ms[0])
    assert ch.frames == []
    assert tracker.open_count == 0


async def test_frames_leave_in_the_order_they_were_decided() -> None:
    ch, tracker = FakeChannel(stalls=[5, 0]), AckTracker()
    ms = deliver(tracker, ch, range(1, 5))
    # Two batches settle concurrently; the first decision (ack up to 2) must reach the broker first,
    # or the broker would see "ack up to 4" and then an unknown tag 2 and close the channel.
    await asyncio.gather(tracker.ack(ms[:2]), tracker.ack(ms[2:]))
    assert ch.frames == [("ack", 2, True), ("ack", 4, True)]


class DeadChannel(FakeChannel):
    """A channel of a lost connection whose frame writes never end (aiormq's full write queue
    that nothing drains any more)."""

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await asyncio.Event().wait()


async def test_an_ack_stuck_on_a_dead_channel_does_not_hold_the_new_channels_acks() -> None:
    """Seen in the chaos suite after a lost connection: an ack of the old channel blocked for
    good while holding the tracker's lock, and every ack of the new channel queued behind it (for
    the whole timeout, before the new channel got a lock of its own)."""
    wedged: list[Any] = []
    tracker = AckTracker(timeout_s=3600, on_wedged=wedged.append, clock=FakeClock())  # its time never moves
    old, new = DeadChannel(), FakeChannel()
    olds = deliver(tracker, old, range(1, 4))
    stuck = asyncio.create_task(tracker.ack(olds[:2]))
    await turns()  # it holds the lock, writing on the dead channel
    fresh = deliver(tracker, new, range(1, 4))  # the reconnect: deliveries of the new channel
    await asyncio.wait_for(tracker.ack(fresh[:2]), 5)  # at once, not after the hour
    assert new.frames == [("ack", 2, True)]
    with pytest.raises(StaleDelivery):  # the old channel's last delivery: stale at once, no queueing
        await asyncio.wait_for(tracker.requeue(olds[2]), 5)
    await asyncio.wait_for(tracker.requeue(fresh[2]), 5)
    assert new.frames[1:] == [("nack", 3, True)]
    assert not stuck.done()
    stuck.cancel()
    assert wedged == []  # the current channel is fine: nothing to close


class GatedChannel(FakeChannel):
    """Its first ack waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls = 0

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        await super().basic_ack(tag, multiple, wait)


async def turns(n: int = 5) -> None:
    """Let every task that can run take `n` steps (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_stuck_old_write_timing_out_leaves_the_new_channels_frame_order_alone() -> None:
    clock = FakeClock()
    tracker = AckTracker(timeout_s=0.5, clock=clock)
    old, new = DeadChannel(), GatedChannel()
    stuck = asyncio.create_task(tracker.ack(deliver(tracker, old, range(1, 3))))
    await turns()  # it holds the old channel's lock, writing on the dead channel
    clock.advance(0.3)  # the first new ack below starts well into the old write's timeout
    fresh = deliver(tracker, new, range(1, 5))
    first = asyncio.create_task(tracker.ack(fresh[:2]))  # holds the new channel's lock, writing
    await turns()
    clock.advance(0.3)  # the old write's time is up
    with pytest.raises(StaleDelivery):  # the old write gives up meanwhile
        await stuck
    assert not first.done()  # the new channel's write is still under way, not timed out
    second = asyncio.create_task(tracker.ack(fresh[2:]))  # decided after the first
    await turns()
    new.gate.set()
    await asyncio.gather(first, second)
    assert new.frames == [("ack", 2, True), ("ack", 4, True)]


async def test_a_current_channel_whose_acks_never_go_out_is_given_up_and_reported() -> None:
    clock = FakeClock()
    wedged: list[Any] = []
    tracker = AckTracker(timeout_s=30, on_wedged=wedged.append, clock=clock)
    ch = DeadChannel()
    ms = deliver(tracker, ch, range(1, 4))
    acking = asyncio.create_task(tracker.ack(ms))
    await turns()
    clock.advance(29.9)
    await turns()
    assert not acking.done()  # still within its bound
    assert wedged == []
    clock.advance(0.2)
    with pytest.raises(StaleDelivery):
        await acking
    assert wedged == [ch]  # the owner closes it: the broker requeues what it holds
    assert tracker.open_count == 0


async def test_consumers_sharing_a_channel_never_ack_each_others_open_deliveries() -> None:
    """An account's lanes share a channel and its tracker: a lane's settled deliveries go out as a
    multiple ack only up to the oldest delivery another lane still has open."""
    ch, tracker = FakeChannel(), AckTracker()
    urgent, normal = tracker.share("urgent"), tracker.share("normal")
    mine = [FakeMessage(ch, 1), FakeMessage(ch, 3)]
    theirs = [FakeMessage(ch, 2), FakeMessage(ch, 4)]
    normal.delivered(mine[0])  # type: ignore[arg-type]
    urgent.delivered(theirs[0])  # type: ignore[arg-type]
    normal.delivered(mine[1])  # type: ignore[arg-type]
    urgent.delivered(theirs[1])  # type: ignore[arg-type]
    assert (normal.open_count, urgent.open_count, tracker.open_count) == (2, 2, 4)
    # Tag 2 is urgent's and open: 1 alone may go as a prefix, 3 on its own.
    await normal.ack(mine)  # type: ignore[arg-type]
    assert ch.frames == [("ack", 1, True), ("ack", 3, False)]
    assert (normal.open_count, urgent.open_count) == (0, 2)
    await urgent.requeue(theirs[0])  # type: ignore[arg-type]
    await urgent.ack(theirs[1:])  # type: ignore[arg-type]
    assert ch.frames[2:] == [("nack", 2, True), ("ack", 4, True)]
    assert (normal.open_count, urgent.open_count, tracker.open_count) == (0, 0, 0)


async def test_a_new_channel_clears_every_share_of_the_old_one() -> None:
    old, new, tracker = FakeChannel(), FakeChannel(), AckTracker()
    urgent, normal = tracker.share("urgent"), tracker.share("normal")
    stale = FakeMessage(old, 1)
    urgent.delivered(stale)  # type: ignore[arg-type]
    normal.delivered(FakeMessage(old, 2))  # type: ignore[arg-type]
    normal.delivered(FakeMessage(new, 1))  # type: ignore[arg-type]  # the reconnect's first delivery
    assert (urgent.open_count, normal.open_count) == (0, 1)
    assert urgent.stale(stale)  # type: ignore[arg-type]
    with pytest.raises(StaleDelivery):
        await urgent.ack([stale])  # type: ignore[list-item]
    assert old.frames == []
    assert new.frames == []
