"""One consumer on one queue, kept alive: consume, cancel, resize the prefetch, and a watchdog that
consumes again after the channel or the connection was lost. Deliveries go to the worker's
callback; acks and publishes are the worker's (settle.py, acks.py)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from gateway.obs import metrics as m
from gateway.obs.logs import get_logger

log = get_logger("gateway.bus.queue")

WATCH_INTERVAL_S = 1.0
WATCH_SLICES = 4  # the watchdog looks at a quarter of the consumers every quarter interval
RESIZE_TIMEOUT_S = 5.0
CANCEL_TIMEOUT_S = 5.0  # a consumer cancel; see QueueConsumer.cancel


_qos_locks: weakref.WeakKeyDictionary[AbstractChannel, asyncio.Lock] = weakref.WeakKeyDictionary()


def _qos_lock(channel: AbstractChannel) -> asyncio.Lock:
    """Held from a consumer's basic.qos to its basic.consume: the broker gives a new consumer the
    channel's last prefetch, so another consumer of the same channel (an account's lanes share
    one) must not set its own in between."""
    lock = _qos_locks.get(channel)
    if lock is None:
        lock = _qos_locks[channel] = asyncio.Lock()
    return lock


class QueueConsumer:
    """The AMQP side of a worker: one consumer on one queue, on a robust channel that the worker
    may share with others (an account's lanes share one).

    aio-pika restores after a reconnect only the queues it declared and the consumers it started
    on them; the gateway takes its queues without declaring them again, so it keeps its consumer
    alive itself. The consumer is live while its tag is registered on the channel's current
    AMQP channel: a reconnect replaces that channel, a broker-side cancel (queue deleted, node
    gone) drops the tag. The event loop's `Watchdog` looks every `WATCH_INTERVAL_S` and consumes
    again whenever the worker wants messages (`wanted`) and the consumer is not live.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
        prefetch: int,
        on_lost: Callable[[aiormq.abc.AbstractChannel], object] | None = None,
    ) -> None:
        """`on_lost(channel)` is told when an RPC on the consumer's channel ran out of time: aiormq
        then closes that channel (it sends channel.close at once, though the channel reads as open
        until the close-ok), and nothing more may be written to it (acks.py: `give_up`)."""
        self.queue_name = queue
        self._on_lost = on_lost
        self._channel = channel
        self._callback = callback
        self._prefetch = prefetch
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._underlay: aiormq.Channel | None = None
        self._lock = asyncio.Lock()
        self._wanted: Callable[[], bool] = lambda: True
        self._repair: asyncio.Task[None] | None = None  # the watchdog's repair in progress
        self._shown_live: bool | None = None  # what the live gauge shows
        self._closed = False
        self._stale: set[str] = set()  # consumer tags a resize replaced and has not cancelled yet
        self.restored = 0  # consumers started again after a loss (a metric and the tests read it)

    async def start(self, wanted: Callable[[], bool]) -> None:
        self._wanted = wanted
        self._queue = await self._channel.get_queue(self.queue_name, ensure=False)
        await self.ensure()
        Watchdog.of_this_loop().add(self)

    @property
    def live(self) -> bool:
        u = self._underlay
        return self._tag is not None and u is not None and not u.is_closed and self._tag in u.consumers

    async def ensure(self) -> None:
        """Consume if the worker wants messages and no live consumer exists."""
        async with self._lock:
            if self._closed or not self._wanted() or self.live:
                return
            assert self._queue is not None
            async with _qos_lock(self._channel):
                await self._channel.set_qos(prefetch_count=self._prefetch)  # it may have been resized
                tag = await self._queue.consume(self._callback)
            # Looked up after the consume: had a reconnect come in between, the tag would not be on
            # this channel, the consumer would not count as live, and the next round consumes again.
            underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
            lost = self._tag is not None  # a consumer we had and did not cancel (a failed try keeps it)
            self._tag, self._underlay = tag, underlay
            self._show_live(True)
            if lost:
                self.restored += 1
                m.CONSUMER_RESTORED.labels(self.queue_name).inc()
                log.warning("consumer_restored", queue=self.queue_name)

    @property
    def prefetch(self) -> int:
        return self._prefetch

    async def resize(self, prefetch: int) -> None:
        """Change the prefetch of a running consumer. RabbitMQ applies a prefetch to a consumer when
        it consumes (a later basic.qos does not reach it), so: consume again with the new prefetch,
        then cancel the old consumer. The old one's unacked deliveries belong to the channel and are
        acked as usual; what the broker sent it before the cancel still arrives (before CancelOk).

        Bounded in time: a connection lost midway would otherwise hold the lock (the robust
        channel waits for the reconnect) and keep the watchdog from consuming again."""
        async with self._lock:
            if prefetch == self._prefetch:
                return
            self._prefetch = prefetch
            if self._closed or not self.live:
                return  # the next ensure() consumes with it
            assert self._queue is not None
            old = self._tag
            try:
                async with asyncio.timeout(RESIZE_TIMEOUT_S):
                    async with _qos_lock(self._channel):
                        await self._channel.set_qos(prefetch_count=prefetch)
                        tag = await self._queue.consume(self._callback)
                    self._tag = tag
                    if old is not None:
                        self._stale.add(old)  # cancelled below, or by the watchdog if time runs out first
                    self._underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                    await self._cancel_stale()
            except TimeoutError:
                self._lost()
                raise

    async def _cancel_stale(self) -> None:
        """Cancel consumers a resize replaced. One the channel no longer has (a reconnect took it)
        is forgotten; one whose cancel fails stays for the watchdog's next round."""
        assert self._queue is not None
        u = self._underlay
        for tag in list(self._stale):
            if u is None or u.is_closed or tag not in u.consumers:
                self._stale.discard(tag)
                continue
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT_S):
                    await self._queue.cancel(tag)
                self._stale.discard(tag)
            except Exception as exc:  # noqa: BLE001 - the channel is going: a reconnect takes it with it
                log.warning("cancel_failed", queue=self.queue_name)
                if isinstance(exc, TimeoutError):
                    self._lost()

    async def cancel(self) -> None:
        async with self._lock:
            tag, self._tag = self._tag, None
            self._show_live(False)
            if tag is None or self._queue is None:
                return
            try:
                # Bounded: while the connection is down, aio-pika waits for it to come back first,
                # which held a shutdown during a broker outage for as long as the outage.
                async with asyncio.timeout(CANCEL_TIMEOUT_S):
                    await self._queue.cancel(tag)
            except Exception as exc:  # noqa: BLE001 - a closed channel has no consumer to cancel
                log.warning("cancel_failed", queue=self.queue_name)
                if isinstance(exc, TimeoutError):
                    self._lost()
            await self._cancel_stale()

    def _lost(self) -> None:
        """An RPC on the consumer's channel ran out of time: aiormq is closing that channel."""
        if self._on_lost is not None and self._underlay is not None:
            self._on_lost(self._underlay)

    async def close(self) -> None:
        """Cancel for good (shutdown): the watchdog forgets it."""
        self._closed = True
        Watchdog.of_this_loop().discard(self)
        if self._repair is not None:
            self._repair.cancel()
        await self.cancel()
        self._show_live(False)

    def _show_live(self, live: bool) -> None:
        if live is not self._shown_live:
            m.CONSUMER_LIVE.labels(self.queue_name).set(1 if live else 0)
            self._shown_live = live

    def look(self) -> None:
        """The watchdog's round: start a repair when the consumer should be live and is not, or a
        resize left a consumer to cancel. The round of almost every second of every lane is this
        check alone: no lock, task or timer."""
        if self._closed or (self._repair is not None and not self._repair.done()):
            return
        live = self.live
        if not self._stale and (live or not self._wanted()):
            self._show_live(live)
            return
        self._repair = asyncio.create_task(self._repair_once(), name=f"repair {self.queue_name}")

    async def _repair_once(self) -> None:
        try:
            await asyncio.wait_for(self.ensure(), timeout=10)
            if self._stale:
                async with self._lock:
                    await asyncio.wait_for(self._cancel_stale(), timeout=10)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the broker is away: look again next round
            log.info("consumer_not_restored_yet", queue=self.queue_name, error=type(exc).__name__)
        self._show_live(self.live)


class Watchdog:
    """One task for every queue consumer of an event loop: every `WATCH_INTERVAL_S` it looks at
    each (`QueueConsumer.look`), so a thousand accounts' lanes cost one timer a second, not one
    each. It runs while it has consumers to watch."""

    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._consumers: dict[QueueConsumer, None] = {}  # in the order they started
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of_this_loop(cls) -> Watchdog:
        loop = asyncio.get_running_loop()
        watchdog = cls._loops.get(loop)
        if watchdog is None:
            watchdog = cls._loops[loop] = cls()
        return watchdog

    def add(self, consumer: QueueConsumer) -> None:
        self._consumers[consumer] = None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="consumer watchdog")

    def discard(self, consumer: QueueConsumer) -> None:
        self._consumers.pop(consumer, None)
        if not self._consumers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        # A quarter of the consumers every quarter interval: each is looked at once an interval,
        # and a thousand accounts' round is four short turns on the loop, not one long one.
        turn = 0
        while self._consumers:
            await asyncio.sleep(WATCH_INTERVAL_S / WATCH_SLICES)
            consumers = list(self._consumers)
            for consumer in consumers[turn::WATCH_SLICES]:
                try:
                    consumer.look()
                except Exception:  # one consumer's fault must not end the watch of the others
                    log.exception("consumer_watch_failed", queue=consumer.queue_name)
            turn = (turn + 1) % WATCH_SLICES


class Closable(Protocol):
    def close(self) -> Awaitable[Any]: ...


async def close_within(closable: Closable, timeout_s: float, event: str) -> None:
    """Close a channel or a connection, giving up after `timeout_s` (logged as `event`). One wedged
    on a lost connection, or a connection to a broker that vanished (its close-ok never comes),
    may never close: a consumer being replaced, or a shutdown, must not wait for it."""
    try:
        async with asyncio.timeout(timeout_s):
            await closable.close()
    except Exception as exc:  # noqa: BLE001 - given up either way; the connection's loss takes it
        log.warning(event, error=type(exc).__name__, timeout_s=timeout_s)
