"""The workers: one per queue, wiring a delivery's way through the parts app.py built. The queue's
consumer is queue.py; the job comes from the delivery's headers (headers.py); the account's flow
control is core/flow.py; admission and batches are core/pipeline.py; acks and publishes settle.py.

    sms.send.<account>[.urgent|.bulk] --> AccountWorker (one per account and lane):
                  Delivery -> pipeline.admit -> Batcher -> pipeline.run
                  -> Settler (outcome / retry copy / deferred copy / dead letter, then ack)
    sms.send.unroutable --> UnroutableWorker: `invalid` outcome + dead letter, whatever the body

Batches are handed over only while the account has a free send slot (the adaptive limit of
concurrency.py); under load the waiting batch grows instead, so the cost per message falls as the
load rises. The prefetch follows the limit, so a backlogged account holds in the process only
what it can send soon, not work that would sit ahead of other accounts' requests.

Failure handling:
- A crash while admitting one message (its own fault) requeues it, and after
  `poison_deliveries` deliveries dead-letters it as `poison`.
- A store failure in a batch backs the lane off (its messages wait in the broker as delayed
  copies); an account-level provider error pauses the account, every lane, for `account_pause_s`.

Each lane has its own prefetch, in-flight limit and batches (a full bulk backlog never holds the
slots an urgent request needs); the priority between lanes is the store's (ratelimit.py). When the
process itself is saturated, the lanes of all accounts share batch admission fairly (admission.py).
A batch of at most `EXPRESS_MAX_BATCH` settles through a second publishing channel, so a lone
request's outcome is not confirmed behind a backlog's full batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.trace import Link

from gateway import contract as c
from gateway.bus.acks import Acks, AckTracker
from gateway.bus.headers import first_delivery, int_header, read_job
from gateway.bus.publisher import Publisher
from gateway.bus.queue import QueueConsumer, close_within
from gateway.bus.settle import Delivery, Settler, requeue
from gateway.clock import SYSTEM, Clock
from gateway.config import Account, WorkerOptions
from gateway.core import decisions as dec
from gateway.core import lanes
from gateway.core import pipeline as p
from gateway.core.admission import Admission
from gateway.core.batching import Batcher
from gateway.core.flow import AccountFlow, PauseChange
from gateway.obs import metrics as m
from gateway.obs import tracing
from gateway.obs.logs import get_logger
from gateway.providers.base import ProviderAdapter
from gateway.state import PauseStore
from gateway.state.base import Pause, Tracked


class WorkerStore(PauseStore, Protocol):
    """What an account's worker asks of the store itself: recording its pauses, and ending the
    final-event holds of the messages whose `accepted` is out."""

    async def announce(self, account: str, message_ids: Sequence[str]) -> None: ...


log = get_logger("gateway.bus.consumer")
ANNOUNCE_RETRY_FIRST_S = 0.5  # an announcement the store failed is tried again after this, doubling up to the max
ANNOUNCE_RETRY_MAX_S = 5.0
ANNOUNCE_GRACE_S = 2.0  # at shutdown, announcements still being tried get this long
MAX_ACCOUNT_LABEL = 64  # an unknown routing key, shortened, as it appears in outcome and dead-letter keys
EXPRESS_MAX_BATCH = 10  # a batch this small settles on the express publisher (latency, not a backlog)
UNKNOWN_ACCOUNT_LABEL = "(unknown)"  # the metric label of every unknown account: producers cannot grow the set


_closing: set[asyncio.Task[None]] = set()  # wedged channels being closed


def close_wedged(channel: aiormq.abc.AbstractChannel, where: str | None) -> None:
    """No ack went out on a consumer channel in time, and its tracker gave it up (nothing more is
    written to it): close it, so the broker requeues what it holds and the watchdog consumes
    again on a new one. `where`: the queue, or the account whose lanes share the channel."""
    log.error("consumer_channel_wedged", queue=where)
    task = asyncio.create_task(close_within(channel, 5.0, "wedged_channel_not_closed"))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class Worker:
    """One queue's consumer with its own acks and settler: what both workers share."""

    def __init__(
        self,
        publisher: Publisher,
        provider: str | None,
        ack_timeout_s: float = 30.0,
        clock: Clock = SYSTEM,
        acks: Acks | None = None,
    ) -> None:
        """`acks`: the worker's share of a tracker its channel's other consumers use too (an
        account's lanes share a channel); without it, a tracker of its own."""
        self._acks: Acks = acks or AckTracker(timeout_s=ack_timeout_s, on_wedged=self._channel_wedged, clock=clock)
        self._publisher = publisher
        self._settler = Settler(publisher, provider, self._acks)
        self._consumer: QueueConsumer | None = None
        self._stopping = False

    def _channel_wedged(self, channel: aiormq.abc.AbstractChannel) -> None:
        close_wedged(channel, self._consumer.queue_name if self._consumer else None)

    async def _consume(self, channel: AbstractChannel, queue: str, prefetch: int, wanted: Callable[[], bool]) -> None:
        self._consumer = QueueConsumer(channel, queue, self._on_message, prefetch, on_lost=self._acks.give_up)
        await self._consumer.start(wanted=wanted)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        raise NotImplementedError

    @property
    def unsettled(self) -> int:
        """Deliveries taken from the broker and not acked or requeued yet."""
        return self._acks.open_count

    @property
    def consuming(self) -> bool:
        """A live consumer is registered on the broker for this worker's queue."""
        return self._consumer is not None and self._consumer.live

    async def _stop_consuming(self) -> None:
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.close()


class AccountWorker(Worker):
    """One lane of one account: deliveries become jobs, jobs batches (the batcher), batches decisions
    (the pipeline), decisions publishes and acks (the settler); `flow` says when to pause and how
    much to take. The pipeline and the flow come built from the composition root (app.py), which
    also names the account's other lanes (`siblings`): a pause for the account pauses them all."""

    def __init__(
        self,
        *,
        account: Account,
        adapter: ProviderAdapter,
        pipeline: p.Pipeline,
        flow: AccountFlow,
        store: WorkerStore,
        publisher: Publisher,
        options: WorkerOptions,
        owner: str,
        admission: Admission | None = None,
        express: Publisher | None = None,
        clock: Clock = SYSTEM,
        acks: Acks | None = None,
    ) -> None:
        super().__init__(publisher, adapter.name, options.publish_timeout_s, clock, acks)
        # Batches of up to EXPRESS_MAX_BATCH settle through `express`, a publisher on a channel of
        # its own: the broker takes a channel's publishes one after another, so a lone request's
        # outcome would otherwise wait behind a campaign batch's hundred publishes just before it.
        self._express = Settler(express, adapter.name, self._acks) if express is not None else self._settler
        self.account = account
        self.lane = pipeline.lane
        self._admission = admission if admission is not None else Admission(enabled=False)
        self._turns = self._admission.lane(account.name, lanes.rank(self.lane), self._pump)
        self.siblings: list[AccountWorker] = []  # the account's other lanes
        self.on_tracked: Callable[[], None] | None = None  # called when a batch tracked accepted messages
        self._settings = options
        self._clock = clock
        self._pipeline = pipeline
        self._store = store
        self._owner = owner
        self._flow = flow
        self._limit_gauge = m.INFLIGHT_LIMIT.labels(account.name, self.lane)
        self._limit_gauge.set(self._flow.limit.current)
        self._inflight_gauge = m.INFLIGHT.labels(account.name, self.lane)
        self._prefetch_gauge = m.PREFETCH.labels(account.name, self.lane)
        self._batcher: Batcher[Delivery] = Batcher(
            max_size=flow.max_batch,
            linger_s=account.linger_ms / 1000,
            quiet_s=account.quiet_ms / 1000,
            key=lambda d: adapter.batch_key(d.job.item) if d.job.item else None,
            on_flush=self._flush,
            ready=self._ready,
            eager=lambda: self._flow.lightly_loaded(self._acks.open_count, self.prefetch),
            clock=clock,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcing: set[asyncio.Task[None]] = set()  # holds being ended (dlr.py), tried again meanwhile
        self._queue_wait = m.QUEUE_WAIT.labels(account.name, self.lane)  # looked up once, observed per message
        self._resizing: asyncio.Task[None] | None = None

    @property
    def prefetch(self) -> int:
        return self._consumer.prefetch if self._consumer is not None else self._flow.prefetch

    @property
    def paused(self) -> bool:
        return self._flow.paused

    @property
    def queue_name(self) -> str:
        return c.account_queue(self.account.name, self.lane)

    async def start(self, channel: AbstractChannel) -> None:
        prefetch = self._flow.prefetch
        self._prefetch_gauge.set(prefetch)
        await self._consume(channel, self.queue_name, prefetch, lambda: not (self._stopping or self.paused))

    # -- admission: one message at a time ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)  # before any await: tags are registered in delivery order
        d = Delivery.begin(message, self.account.name, lane=self.lane)
        if self._stopping or self.paused:
            await requeue(self._acks, [d])
            return
        job = read_job(message, d.job)
        if message.timestamp is not None and first_delivery(job):
            self._queue_wait.observe(max(0.0, self._clock.time() - message.timestamp.timestamp()))
        try:
            decision = self._pipeline.admit(job, message.body, message.message_id)
            if decision is None:
                self._batcher.add(d)
                return
        except Exception as exc:  # noqa: BLE001 - any crash of one message is handled as poison
            await self._crashed(d, exc)
            return
        await self._settler.settle(d, decision)

    async def _crashed(self, d: Delivery, exc: Exception) -> None:
        count = int_header(d.message, c.H_DELIVERY_COUNT)
        log.error("handler_crashed", account=d.account, error=type(exc).__name__, deliveries=count + 1)
        if count + 1 < self._settings.poison_deliveries:
            await requeue(self._acks, [d])
            return
        await self._settler.settle(d, dec.poison(d.job.attempts, type(exc).__name__, self._clock.now()))

    # -- batches ------------------------------------------------------------------------------------

    def _ready(self) -> bool:
        """A send slot of the lane is free, and the process lets the lane start a batch now."""
        return self._flow.ready() and self._admission.may_start(self._turns)

    def _pump(self) -> None:
        self._batcher.pump()

    def _flush(self, batch: list[Delivery]) -> None:
        self._admission.started(self._turns, len(batch))
        self._flow.batches += 1
        self._inflight_gauge.set(self._flow.batches)
        task = asyncio.create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._flow.batches -= 1
        self._inflight_gauge.set(self._flow.batches)
        self._admission.finished(self._turns)  # the freed slot goes to whoever's turn it is
        self._batcher.pump()  # due groups that waited for a slot, grown meanwhile

    async def _run_batch(self, batch: list[Delivery]) -> None:
        # Deliveries of a channel lost while they waited in the batcher come again from the broker
        # (to this replica or another): working on these copies too would race their redeliveries.
        if any(self._acks.stale(d.message) for d in batch):
            stale = [d for d in batch if self._acks.stale(d.message)]
            batch = [d for d in batch if not self._acks.stale(d.message)]
            log.info("stale_deliveries_dropped", account=self.account.name, count=len(stale))
            for d in stale:
                d.close("requeued")
            if not batch:
                return
        # One span per batch: the first message's trace is its parent, the others are links.
        parent = trace.set_span_in_context(batch[0].span) if batch[0].span is not None else None
        links = [Link(d.span.get_span_context()) for d in batch[1:] if d.span is not None]
        attributes: dict[str, str | int] = {
            "sms.account": self.account.name,
            "sms.lane": str(self.lane),
            "sms.batch_size": len(batch),
        }
        with tracing.tracer().start_as_current_span("sms.batch", context=parent, links=links, attributes=attributes):
            started = self._clock.monotonic()
            result = await self._pipeline.run([d.job for d in batch])
            took = self._clock.monotonic() - started
            # Pause before the outcomes go out: what a producer publishes once it has seen the
            # outcome must find the account paused, not reach the provider that just refused it.
            await self._pause_after(result)
            settler = self._express if len(batch) <= EXPRESS_MAX_BATCH else self._settler
            await settler.settle_all(list(zip(batch, result.decisions, strict=True)), self._announce)
        if result.tracked:
            if self.on_tracked is not None:
                self.on_tracked()  # the account's poller looks at the next tick again, not after its idle backoff
            task = asyncio.create_task(self._tracking_copy(result.tracked))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._adapt(result, took if result.sent * 2 >= self._flow.max_batch else None)

    def _announce(self, confirmed: Sequence[tuple[Delivery, dec.Decision]]) -> None:
        """End the final-event holds of the messages whose `accepted` the broker just confirmed
        (dlr.py), off the send path: a failed announcement is one line, and the hold runs out."""
        ids = [
            x.result.provider_message_id
            for _, x in confirmed
            if isinstance(x, dec.Finish) and x.status == c.Status.ACCEPTED and x.result.provider_message_id
        ]
        if ids and self._settings.dlr_enabled:
            task = asyncio.create_task(self._announce_ids(ids))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    async def _announce_ids(self, ids: list[str]) -> None:
        """Tried again while the store is away (as a final mark is): a hold left to run out delays
        the messages' delivery events by minutes. Past the hold's own time, trying is moot."""
        delay, deadline = ANNOUNCE_RETRY_FIRST_S, self._clock.monotonic() + p.ANNOUNCE_HOLD_S
        while True:
            try:
                await self._store.announce(self.account.name, ids)
            except Exception as exc:  # noqa: BLE001 - the store is away: try again, or let the holds run out
                if self._clock.monotonic() + delay > deadline:
                    log.warning("announce_failed", account=self.account.name, count=len(ids), error=type(exc).__name__)
                    return
                await self._clock.sleep(delay)
                delay = min(delay * 2, ANNOUNCE_RETRY_MAX_S)
            else:
                return

    async def _tracking_copy(self, tracked: Sequence[Tracked]) -> None:
        """The batch's tracked messages into the tracking stream, off the send path (tracking.py):
        needed only after a store loss, so a copy that fails is one line, and the store's own
        record stands."""
        try:
            await self._publisher.tracking_copy(self.account.name, tracked)
        except Exception as exc:  # noqa: BLE001 - the broker is away; the store holds the tracking
            log.warning("tracking_copy_failed", account=self.account.name, count=len(tracked), error=type(exc).__name__)

    async def _pause_after(self, result: p.BatchResult) -> None:
        code = next(
            (
                x.result.error.code
                for x in result.decisions
                if isinstance(x, dec.Finish) and x.pause_account and x.result.error
            ),
            None,
        )
        for order in self._flow.after_batch(
            store_failed=result.store_failed, pause_account=result.pause_account, code=code
        ):
            await self._pause(order.seconds, order.reason, order.code)

    def _adapt(self, result: p.BatchResult, took_s: float | None) -> None:
        """Grow the in-flight limit while work waits for a slot, trim it when batches queue, halve
        it on congestion. Only batches that sent at least half a batch to the provider are timed:
        a lone request's batch, or one answered from the store (redelivered duplicates after a
        reconnect take under a millisecond), is faster than a full send without anything queueing,
        and would make every full one look slow for the baseline's whole window. Work waits for
        the lane's own slots only when they are all taken: work that the process's admission holds
        back (admission.py) would not go out sooner with more of them, and a larger limit would
        only widen the prefetch, pulling more of a backlog into a process that is saturated."""
        waiting = self._batcher.waiting and not self._flow.ready()
        if self._flow.adapt(congested=result.congested, waiting=waiting, took_s=took_s):
            self._limit_gauge.set(self._flow.limit.current)
            self._follow_limit()

    def _follow_limit(self) -> None:
        """Resize the prefetch when the limit outgrew it, or fell three batches below it. A resize
        leaves one batch of headroom, so a limit that swings by one does not swap consumers (three
        round trips) at every swing."""
        if self._consumer is None or (self._resizing is not None and not self._resizing.done()):
            return
        if self._flow.prefetch_target(self._consumer.prefetch) != self._consumer.prefetch:
            self._resizing = asyncio.create_task(self._resize())

    async def _resize(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            while not self._stopping:
                want = self._flow.prefetch_target(consumer.prefetch)
                if want == consumer.prefetch:
                    return
                await consumer.resize(want)
        except Exception as exc:  # noqa: BLE001 - the broker is away: the watchdog consumes again with it
            log.info("prefetch_not_resized", account=self.account.name, error=type(exc).__name__)
        finally:
            # A failed resize keeps the new prefetch (the next consume uses it): the gauge shows it too.
            self._prefetch_gauge.set(consumer.prefetch)

    # -- pause, resume, stop ------------------------------------------------------------------------

    async def _pause(self, seconds: float, reason: str, code: str | None = None, *, spread: bool = True) -> None:
        """Pause this lane; a pause for the account itself (`account_error`) pauses its other lanes too."""
        if self._stopping:
            return
        if spread and reason == "account_error":
            for sibling in self.siblings:
                await sibling._pause(seconds, reason, code, spread=False)
        change = self._flow.pause(seconds)
        if change is PauseChange.NONE:
            return
        noted = asyncio.create_task(self._note_pause(Pause(self._owner, reason, code, self._clock.time() + seconds)))
        self._tasks.add(noted)
        noted.add_done_callback(self._tasks.discard)
        if change is PauseChange.LONGER:
            return
        log.warning(
            "account_paused", account=self.account.name, lane=self.lane, seconds=seconds, reason=reason, code=code
        )
        m.PAUSED.labels(self.account.name, self.lane).set(1)
        if self._consumer is not None:
            await self._consumer.cancel()
        await requeue(self._acks, self._batcher.take_all())
        task = asyncio.create_task(self._resume_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _note_pause(self, pause: Pause) -> None:
        """Tell operators (`gateway accounts`); a store that fails here changes nothing else."""
        try:
            async with asyncio.timeout(2.0):
                await self._store.note_pause(self.account.name, pause)
        except Exception:  # noqa: BLE001 - best effort: the pause itself is this process's
            log.warning("pause_not_recorded", account=self.account.name, reason=pause.reason)

    async def _resume_later(self) -> None:
        while self.paused:
            await self._clock.sleep(max(0.05, self._flow.paused_for_s))
        m.PAUSED.labels(self.account.name, self.lane).set(0)
        if not self._stopping:
            log.info("account_resumed", account=self.account.name, lane=self.lane)
            if self._consumer is not None:
                await self._consumer.ensure()

    async def stop(self, timeout_s: float) -> bool:
        """Stop taking messages, send what is batched, wait for in-flight work. True if all finished."""
        await self._stop_consuming()
        self._batcher.flush_all()
        pending = [t for t in self._tasks if not t.done()]
        late: set[asyncio.Task[None]] = set()
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout_s)
            for task in late:
                task.cancel()
        # Announcements still being tried wait for the store no longer: their holds run out.
        if self._announcing:
            _done, still = await asyncio.wait(set(self._announcing), timeout=ANNOUNCE_GRACE_S)
            for task in still:
                task.cancel()
        return not late


class UnroutableWorker(Worker):
    """Requests whose routing key names no configured account: `invalid` outcome + dead letter.

    Nothing about the message may stop this: an undecodable body still gets its dead letter (the
    outcome needs a readable `unique_id`), and a routing key too long to be part of another one is
    shortened for the outcome's and the dead letter's routing keys."""

    def __init__(self, publisher: Publisher, options: WorkerOptions, clock: Clock = SYSTEM) -> None:
        super().__init__(publisher, None, options.publish_timeout_s, clock)
        self._settings = options
        self._clock = clock

    async def start(self, channel: AbstractChannel) -> None:
        await self._consume(channel, c.UNROUTABLE_QUEUE, 50, lambda: not self._stopping)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        routing_key = message.routing_key or "unknown"
        d = Delivery.begin(message, routing_key[:MAX_ACCOUNT_LABEL], label=UNKNOWN_ACCOUNT_LABEL)
        try:
            req = c.decode_request(message.body, message_id=message.message_id)
            d.job.unique_id, d.job.to, d.job.meta = req.unique_id, req.to, req.meta
        except Exception as exc:
            log.exception("decode_crashed", queue=c.UNROUTABLE_QUEUE, error=type(exc).__name__)
        await self._settler.settle(d, dec.unknown_account(routing_key, self._clock.now()))

    async def stop(self) -> None:
        await self._stop_consuming()
