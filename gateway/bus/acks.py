"""Acks and requeues for one consumer channel, coalesced where it is safe.

A `basic.ack` with `multiple=True` settles every outstanding delivery up to its tag at once. That
is only safe for a tag when every delivery of the channel with a lower tag is already settled, so
the tracker keeps the channel's open deliveries in delivery order (tags only grow on a channel):

- settled deliveries older than the oldest still-open one go out as ONE multiple ack;
- settled deliveries behind a still-open one are acked one by one at once, so a slow batch never
  holds later acks (and the prefetch window) hostage;
- every frame for the channel goes out under one lock, in the order it was decided: a nack or an
  ack is never overtaken by a multiple ack that would cover its tag.

After a reconnect the channel is a new one and its tags start again at 1; deliveries of the old
channel cannot be settled any more (the broker has already requeued them). The new channel gets a
lock of its own: frame order only matters within a channel, and a write still under way on the old
one (possibly blocked for good, see `AckTracker`) must not hold the new channel's frames.

Several consumers may share a channel (an account's lanes do): a multiple ack covers every tag of
the channel, whichever consumer it came to, so they share its tracker too, each through a
`TrackerShare` that counts its own open deliveries.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel

from gateway.clock import SYSTEM, Clock
from gateway.errors import StaleDelivery


class Acks(Protocol):
    """What a consumer's worker asks of the acks of its channel: an `AckTracker` of its own, or its
    share of one that other consumers of the channel use too (`AckTracker.share`)."""

    @property
    def open_count(self) -> int: ...

    def delivered(self, message: AbstractIncomingMessage) -> None: ...

    def stale(self, message: AbstractIncomingMessage) -> bool: ...

    async def ack(self, messages: Sequence[AbstractIncomingMessage]) -> None: ...

    async def requeue(self, message: AbstractIncomingMessage) -> None: ...

    def give_up(self, channel: AbstractChannel) -> bool: ...


class AckTracker:
    """`timeout_s` bounds each ack or nack, the wait for the lock included. After a lost
    connection, aiormq can leave a frame write blocked for good: the old connection's write queue
    is full and nothing drains it any more (seen in the chaos suite, with the tracker's lock held
    and every later ack of the new channel queued behind it). See `_bounded`."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        on_wedged: Callable[[AbstractChannel], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._channel: AbstractChannel | None = None
        self._open: dict[int, str] = {}  # delivery tags not yet settled, oldest first: whose they are
        self._counts: Counter[str] = Counter()  # open deliveries of each share
        self._lock = asyncio.Lock()
        self._timeout_s = timeout_s
        self._on_wedged = on_wedged

    @property
    def open_count(self) -> int:
        """Deliveries of the current channel not settled yet."""
        return len(self._open)

    def open_of(self, share: str) -> int:
        """Deliveries of the current channel that came to `share` and are not settled yet."""
        return self._counts[share]

    def share(self, name: str) -> TrackerShare:
        """The tracker as one of the channel's consumers uses it: its deliveries counted apart."""
        return TrackerShare(self, name)

    def delivered(self, message: AbstractIncomingMessage, share: str = "") -> None:
        """Register a delivery. Call it before the first `await` of the message's handler."""
        channel = _channel(message)
        if channel is not self._channel:
            self._channel = channel
            self._forget()
            self._lock = asyncio.Lock()  # the old channel's frames, if any are under way, keep theirs
        assert message.delivery_tag is not None
        self._open[message.delivery_tag] = share
        self._counts[share] += 1

    def _forget(self) -> None:
        self._open.clear()
        self._counts.clear()

    def _settled(self, tag: int) -> None:
        share = self._open.pop(tag, None)
        if share is not None:
            self._counts[share] -= 1

    def stale(self, message: AbstractIncomingMessage) -> bool:
        """The delivery's channel is closed or replaced: the broker has requeued it and delivers it
        again, so nothing may be published for this copy (its redelivery gets the outcome)."""
        channel = _channel(message)
        return channel is None or channel.is_closed or channel is not self._channel

    async def ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Ack deliveries whose outcomes are safe. Raises StaleDelivery when none of them can be."""
        await self._bounded(lambda: self._ack(messages))

    async def requeue(self, message: AbstractIncomingMessage) -> None:
        """Give a delivery back to the queue (nack with requeue)."""
        await self._bounded(lambda: self._requeue(message))

    async def _bounded(self, op: Callable[[], Awaitable[None]]) -> None:
        """Run a frame-writing step within `timeout_s`. Past it, if its channel is still the current
        one, the channel is given up: a fresh lock (the old one may never be released), its
        deliveries forgotten, and the owner told (it closes the channel, the broker requeues)."""
        target = self._channel
        try:
            await self._within(op)
        except TimeoutError:
            if target is not None and self.give_up(target) and self._on_wedged is not None:
                self._on_wedged(target)
            raise StaleDelivery(f"no ack or nack went out within {self._timeout_s} s") from None

    def give_up(self, channel: AbstractChannel) -> bool:
        """Write nothing more on `channel` (it is about to be closed): a fresh lock (the old one may
        never be released) and its deliveries forgotten. A frame written after the broker has
        closed the channel would close the whole connection (504 CHANNEL_ERROR). False when the
        channel was not the current one (a new channel has its own lock already)."""
        if channel is not self._channel:
            return False
        self._lock = asyncio.Lock()
        self._channel = None
        self._forget()
        return True

    async def _within(self, op: Callable[[], Awaitable[None]]) -> None:
        """`op`, cancelled after `timeout_s` on the tracker's clock (TimeoutError then)."""
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = self._clock.call_later(self._timeout_s, expire)
        try:
            await op()
        except asyncio.CancelledError:
            if fired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()

    async def _ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        if not any(self._tag(m) is not None for m in messages):  # stale stays stale: no need to queue
            raise StaleDelivery(f"{len(messages)} deliveries of a closed channel")
        async with self._lock:
            channel = self._channel
            tags = [t for m in messages if (t := self._tag(m)) is not None]
            if not tags or channel is None or channel.is_closed:
                raise StaleDelivery(f"{len(messages)} deliveries of a closed channel")
            for tag in tags:
                self._settled(tag)
            oldest_open = next(iter(self._open), None)
            behind = [t for t in tags if oldest_open is not None and t > oldest_open]
            upto = max((t for t in tags if oldest_open is None or t < oldest_open), default=None)
            if upto is not None:
                await channel.basic_ack(upto, multiple=True, wait=False)
            for tag in behind:
                await channel.basic_ack(tag, wait=False)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        if self._tag(message) is None:  # of a replaced channel, or settled: no need to queue
            raise StaleDelivery("delivery of a closed channel")
        async with self._lock:
            channel = self._channel
            tag = self._tag(message)
            if tag is None or channel is None or channel.is_closed:
                raise StaleDelivery("delivery of a closed channel")
            self._settled(tag)
            await channel.basic_nack(tag, requeue=True, wait=False)

    def _tag(self, message: AbstractIncomingMessage) -> int | None:
        """The message's tag if it belongs to the tracked channel and is still open."""
        if self._channel is None or _channel(message) is not self._channel or message.delivery_tag not in self._open:
            return None
        return message.delivery_tag


class TrackerShare:
    """One consumer's use of a tracker that other consumers of its channel share: the same acks,
    lock and channel, with its own count of open deliveries (what its flow control reads)."""

    def __init__(self, tracker: AckTracker, name: str) -> None:
        self._tracker = tracker
        self._name = name

    @property
    def open_count(self) -> int:
        return self._tracker.open_of(self._name)

    def delivered(self, message: AbstractIncomingMessage) -> None:
        self._tracker.delivered(message, self._name)

    def stale(self, message: AbstractIncomingMessage) -> bool:
        return self._tracker.stale(message)

    async def ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        await self._tracker.ack(messages)

    async def requeue(self, message: AbstractIncomingMessage) -> None:
        await self._tracker.requeue(message)

    def give_up(self, channel: AbstractChannel) -> bool:
        return self._tracker.give_up(channel)


def _channel(message: AbstractIncomingMessage) -> AbstractChannel | None:
    try:
        return message.channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return None
