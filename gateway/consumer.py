"""One worker per account queue: decode -> batch -> claim + rate limit -> send -> settle.

This is the only module that decides acks (acks.py only coalesces the frames). Every message ends
in exactly one of:
- ack, after its outcome (and dead letter, or retry copy) has been confirmed by the broker;
- nack with requeue (pause, shutdown, an infrastructure failure), so it is delivered again.

Batches are handed over only while the account has a free send slot (`concurrency`); under load
the waiting batch grows instead, so the cost per message falls as the load rises.

Failure handling:
- A crash while admitting one message (its own fault) requeues it, and after
  `poison_deliveries` deliveries dead-letters it as `poison`.
- A crash in the batch stage (state store or broker trouble) requeues the batch and backs the
  account off; RabbitMQ's delivery limit on the queue is the last backstop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, StatusCode

from gateway import contract as c
from gateway import metrics as m
from gateway import pipeline as p
from gateway import tracing
from gateway.acks import AckTracker
from gateway.batching import Batcher
from gateway.config import Account, Settings
from gateway.numbers import mask
from gateway.providers.base import ItemResult, LookupFailed, Outbound, ProviderAdapter, ProviderError, Verdict
from gateway.publisher import Publisher
from gateway.retry import RetryPolicy
from gateway.state import ClaimState, Store, StoredResult
from gateway.telemetry import get_logger

log = get_logger("gateway.consumer")
MIN_RATE_FACTOR = 0.05
MAX_ACCOUNT_LABEL = 64  # an unknown routing key, shortened, as it appears in outcome and dead-letter keys
UNKNOWN_ACCOUNT_LABEL = "(unknown)"  # the metric label of every unknown account: producers cannot grow the set


@dataclass(eq=False, slots=True)
class Delivery:
    """One consumed message and what is known of it so far."""

    message: AbstractIncomingMessage
    account: str
    unique_id: str | None = None
    to: str | None = None
    meta: dict[str, Any] | None = None
    attempts: int = 0  # provider attempts made by earlier copies
    waits: int = 0
    request: c.SendRequest | None = None
    item: Outbound | None = None
    started: float = field(default_factory=time.monotonic)
    span: trace.Span | None = None
    _open: bool = False
    sent_at: float | None = None  # an earlier ambiguous attempt's time (header), for the lookup window
    attempt_at: float | None = None  # when this copy's provider attempt started
    label: str = ""  # the account as a metric label: configured names only, so the label set stays bounded

    @classmethod
    def begin(cls, message: AbstractIncomingMessage, account: str, label: str | None = None) -> Delivery:
        """Start tracking a consumed message: its span (continuing the publisher's trace) and the
        in-flight gauge. `close` ends both, exactly once."""
        span = tracing.tracer().start_span(
            "sms.send process",
            context=tracing.extract(message.headers),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rabbitmq", "messaging.destination.name": c.account_queue(account)},
        )
        label = account if label is None else label
        m.IN_FLIGHT.labels(label).inc()
        return cls(message, account, span=span, _open=True, label=label)

    def close(self, result: str) -> None:
        if not self._open:
            return
        self._open = False
        m.IN_FLIGHT.labels(self.label).dec()
        if self.span is not None:
            self.span.set_attribute("sms.result", result)
            if self.unique_id:
                self.span.set_attribute("sms.unique_id", self.unique_id)
            if result == "requeued":
                self.span.set_status(StatusCode.ERROR, "requeued")
            self.span.end()

    @property
    def ours(self) -> bool:
        """Seen by this gateway before (a redelivery or our own retry copy), not a producer's copy."""
        return self.message.redelivered or self.attempts > 0

    @property
    def seen_before(self) -> bool:
        """A copy whose id the gateway may have claimed and sent before without recording it: a
        redelivery (a crash or a lost channel mid-batch) or a wait copy (another worker's claim).
        Retry copies are not: an ambiguous one carries `sent_at` and is always reconciled, any other
        one follows an attempt that surely did not reach the provider."""
        return self.message.redelivered or self.waits > 0

    @property
    def delivery_count(self) -> int:
        value = (self.message.headers or {}).get(c.H_DELIVERY_COUNT, 0)
        return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


def _int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name, 0)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return max(0, int(value)) if isinstance(value, int | str) else 0
    except ValueError:
        return 0


def _float_header(message: AbstractIncomingMessage, name: str) -> float | None:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None


WATCH_INTERVAL_S = 1.0


class QueueConsumer:
    """The AMQP side of a worker: one consumer on one queue, on the worker's own robust channel.

    aio-pika restores after a reconnect only the queues it declared and the consumers it started
    on them; the gateway takes its queues without declaring them again, so it keeps its consumer
    alive itself. The consumer is live while its tag is registered on the channel's current
    AMQP channel: a reconnect replaces that channel, a broker-side cancel (queue deleted, node
    gone) drops the tag. A watchdog looks every `WATCH_INTERVAL_S` and consumes again whenever
    the worker wants messages (`wanted`) and the consumer is not live.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
        prefetch: int,
    ) -> None:
        self.queue_name = queue
        self._channel = channel
        self._callback = callback
        self._prefetch = prefetch
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._underlay: aiormq.Channel | None = None
        self._lock = asyncio.Lock()
        self._wanted: Callable[[], bool] = lambda: True
        self._watch: asyncio.Task[None] | None = None
        self._closed = False
        self.restored = 0  # consumers started again after a loss (a metric and the tests read it)

    async def start(self, wanted: Callable[[], bool]) -> None:
        self._wanted = wanted
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._channel.get_queue(self.queue_name, ensure=False)
        await self.ensure()
        self._watch = asyncio.create_task(self._watchdog(), name=f"watch {self.queue_name}")

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
            tag = await self._queue.consume(self._callback)
            # Looked up after the consume: had a reconnect come in between, the tag would not be on
            # this channel, the consumer would not count as live, and the next round consumes again.
            underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
            lost = self._tag is not None  # a consumer we had and did not cancel (a failed try keeps it)
            self._tag, self._underlay = tag, underlay
            m.CONSUMER_LIVE.labels(self.queue_name).set(1)
            if lost:
                self.restored += 1
                m.CONSUMER_RESTORED.labels(self.queue_name).inc()
                log.warning("consumer_restored", queue=self.queue_name)

    async def cancel(self) -> None:
        async with self._lock:
            tag, self._tag = self._tag, None
            m.CONSUMER_LIVE.labels(self.queue_name).set(0)
            if tag is None or self._queue is None:
                return
            try:
                await self._queue.cancel(tag)
            except Exception:  # noqa: BLE001 - a closed channel has no consumer to cancel
                log.warning("cancel_failed", queue=self.queue_name)

    async def close(self) -> None:
        """Cancel for good (shutdown): the watchdog stops too."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        await self.cancel()
        m.CONSUMER_LIVE.labels(self.queue_name).set(0)

    async def _watchdog(self) -> None:
        while not self._closed:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                await asyncio.wait_for(self.ensure(), timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker is away: look again next round
                log.info("consumer_not_restored_yet", queue=self.queue_name, error=type(exc).__name__)
            m.CONSUMER_LIVE.labels(self.queue_name).set(1 if self.live else 0)


class Settler:
    """Carries decisions out: publish what each delivery is owed, then ack the ones whose
    publishes the broker confirmed (coalesced by the channel's AckTracker) and requeue the rest."""

    def __init__(self, publisher: Publisher, provider: str | None, acks: AckTracker) -> None:
        self._publisher = publisher
        self._provider = provider
        self._acks = acks

    async def settle(self, d: Delivery, decision: p.Decision) -> bool:
        return await self.settle_all([(d, decision)]) == 1

    async def settle_all(self, items: Sequence[tuple[Delivery, p.Decision]]) -> int:
        """Settle deliveries together; returns how many were acked."""
        if len(items) == 1:
            failures: list[BaseException | None] = [await _failure(self._publish(*items[0]))]
        else:
            failures = await asyncio.gather(*(self._publish(d, x) for d, x in items), return_exceptions=True)
        done: list[tuple[Delivery, p.Decision]] = []
        for (d, decision), exc in zip(items, failures, strict=True):
            if exc is None:
                done.append((d, decision))
                continue
            log.error("settle_failed", account=d.account, unique_id=d.unique_id, exc_info=exc)
            await requeue(self._acks, [d])
        if not done:
            return 0
        try:
            await self._acks.ack([d.message for d, _ in done])
        except Exception as exc:  # noqa: BLE001 - the channel is gone: the broker redelivers them
            log.warning("ack_failed", account=done[0][0].account, count=len(done), error=type(exc).__name__)
            for d, _ in done:
                d.close("requeued")
            return 0
        logging_info = log.is_enabled_for(logging.INFO)
        for d, decision in done:
            self._count(d, decision)
            if logging_info:
                if d.span is not None:
                    with trace.use_span(d.span, end_on_exit=False):
                        self._log(d, decision)
                else:
                    self._log(d, decision)
            d.close(_result_name(decision))
        return len(done)

    async def _publish(self, d: Delivery, decision: p.Decision) -> None:
        """Publish what the decision owes (outcome, dead letter or retry copy), confirmed."""
        if isinstance(decision, p.Finish):
            await self._finish(d, decision)
        elif isinstance(decision, p.Retry):
            await self._publisher.retry(
                d.message,
                account=d.account,
                delay_ms=decision.delay_ms,
                attempts=decision.attempts,
                waits=0,
                sent_at=(d.attempt_at or d.sent_at) if decision.ambiguous else None,
            )
        else:
            await self._publisher.retry(
                d.message,
                account=d.account,
                delay_ms=decision.delay_ms,
                attempts=d.attempts,
                waits=d.waits + 1,
            )

    @staticmethod
    def _count(d: Delivery, decision: p.Decision) -> None:
        if isinstance(decision, p.Finish):
            code = (decision.result.error or {}).get("code") or ""
            m.OUTCOMES.labels(d.label, str(decision.status), str(code)).inc()
            if decision.dead is not None:
                m.DEAD_LETTERS.labels(d.label, str(decision.dead)).inc()
        else:
            m.RETRIES.labels(d.label, "retry" if isinstance(decision, p.Retry) else "wait").inc()

    async def _finish(self, d: Delivery, f: p.Finish) -> None:
        r = f.result
        fields: dict[str, Any] = {
            "unique_id": d.unique_id,
            "account": d.account,
            "to": d.item.phone if d.item else d.to,
            "status": f.status,
            "provider": r.provider or self._provider,
            "provider_message_id": r.provider_message_id,
            "parts": r.parts,
            "attempts": r.attempts,
            "error": c.OutcomeError(**r.error) if r.error else None,
            "meta": d.meta,
            "original": asdict(f.original) if f.original is not None else None,
        }
        try:
            body = c.outcome_body(**fields)
        except (ValueError, TypeError, RecursionError) as exc:
            # Not strict JSON (decoding lets no such request through; this guards the outcome all
            # the same): the outcome goes out without the producer's fields rather than not at all.
            log.error(  # noqa: TRY400 - the cause is the data, not a traceback
                "outcome_unencodable", account=d.account, unique_id=d.unique_id, error=type(exc).__name__
            )
            body = c.outcome_body(**{**fields, "meta": None, "to": None})
        jobs = []
        if d.unique_id is not None:  # an outcome nobody can correlate is noise; the dead letter says it all
            jobs.append(
                self._publisher.outcome(
                    account=d.account,
                    status=str(f.status),
                    body=body,
                    unique_id=d.unique_id,
                    reply_to=d.message.reply_to,
                    headers=tracing.inject(d.span, {}),
                )
            )
        if f.dead is not None:
            err = r.error or {}
            jobs.append(
                self._publisher.dead_letter(
                    d.message,
                    reason=f.dead,
                    account=d.account,
                    error_code=str(err.get("code", f.dead)),
                    error_message=str(err.get("message", "")),
                    attempts=r.attempts,
                )
            )
        if len(jobs) == 1:
            await jobs[0]
        else:
            await asyncio.gather(*jobs)

    def _log(self, d: Delivery, decision: p.Decision) -> None:
        ms = round((time.monotonic() - d.started) * 1000, 1)
        to = mask(d.item.phone if d.item else d.to)
        if isinstance(decision, p.Finish):
            r = decision.result
            log.info(
                "sms",
                account=d.account,
                unique_id=d.unique_id,
                to=to,
                status=r.status,
                code=(r.error or {}).get("code"),
                attempts=r.attempts,
                provider_message_id=r.provider_message_id,
                duration_ms=ms,
            )
        elif isinstance(decision, p.Retry):
            log.info(
                "sms_retry",
                account=d.account,
                unique_id=d.unique_id,
                to=to,
                code=decision.error.code,
                attempts=decision.attempts,
                delay_ms=decision.delay_ms,
                ambiguous=decision.ambiguous,
            )
        else:
            log.info("sms_wait", account=d.account, unique_id=d.unique_id, to=to, waits=d.waits + 1)


def _result_name(decision: p.Decision) -> str:
    if isinstance(decision, p.Finish):
        return str(decision.status)
    return "retry" if isinstance(decision, p.Retry) else "wait"


async def _failure(job: Awaitable[None]) -> BaseException | None:
    try:
        await job
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc
    return None


async def requeue(acks: AckTracker, deliveries: Sequence[Delivery]) -> None:
    for d in deliveries:
        try:
            await acks.requeue(d.message)
        except Exception:  # noqa: BLE001 - the channel is gone; the broker requeues on its own
            log.warning("nack_failed", account=d.account, unique_id=d.unique_id)
        d.close("requeued")


class AccountWorker:
    def __init__(
        self,
        *,
        account: Account,
        adapter: ProviderAdapter,
        store: Store,
        publisher: Publisher,
        settings: Settings,
        owner: str,
    ) -> None:
        self.account = account
        self._adapter = adapter
        self._store = store
        self._acks = AckTracker()
        self._settler = Settler(publisher, adapter.name, self._acks)
        self._settings = settings
        self._policy = RetryPolicy(settings.retry_schedule_s, settings.max_attempts)
        self._owner = owner
        self._slots = asyncio.Semaphore(account.concurrency)
        self._batcher: Batcher[Delivery] = Batcher(
            max_size=min(account.batch_size, adapter.max_batch),
            linger_s=account.linger_ms / 1000,
            key=lambda d: adapter.batch_key(d.item) if d.item else None,
            on_flush=self._flush,
            ready=lambda: self._batches < self.account.concurrency,
        )
        self._batches = 0  # batches handed over and not finished
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: QueueConsumer | None = None
        self._paused_until = 0.0
        self._stopping = False
        self._backoff_s = 1.0
        self._rate_factor = 1.0  # lowered while the provider throttles (see _adapt)

    @property
    def prefetch(self) -> int:
        return min(65535, min(self.account.batch_size, self._adapter.max_batch) * (self.account.concurrency + 1))

    @property
    def paused(self) -> bool:
        return self._paused_until > time.monotonic()

    async def start(self, channel: AbstractChannel) -> None:
        self._consumer = QueueConsumer(channel, c.account_queue(self.account.name), self._on_message, self.prefetch)
        await self._consumer.start(wanted=lambda: not (self._stopping or self.paused))

    @property
    def consuming(self) -> bool:
        """A live consumer is registered on the broker for this account's queue."""
        return self._consumer is not None and self._consumer.live

    # -- admission: one message at a time ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)  # before any await: tags are registered in delivery order
        d = Delivery.begin(message, self.account.name)
        if self._stopping or self.paused:
            await requeue(self._acks, [d])
            return
        try:
            decision = self._admit(d)
        except Exception as exc:  # noqa: BLE001 - any crash of one message is handled as poison
            await self._crashed(d, exc)
            return
        if decision is not None:
            await self._settler.settle(d, decision)
        else:
            self._batcher.add(d)

    def _admit(self, d: Delivery) -> p.Decision | None:
        m = d.message
        d.attempts = _int_header(m, c.H_ATTEMPTS)
        d.waits = _int_header(m, c.H_WAITS)
        d.sent_at = _float_header(m, c.H_SENT_AT)
        req = c.decode_request(
            m.body,
            message_id=m.message_id,
            max_bytes=self._settings.max_body_bytes,
            max_text_chars=self._settings.max_text_chars,
        )
        if isinstance(req, c.InvalidRequest):
            d.unique_id, d.to, d.meta = req.unique_id, req.to, req.meta
            return p.invalid(req)
        d.unique_id, d.to, d.meta, d.request = req.unique_id, req.to, req.meta, req
        if p.is_expired(req, datetime.now(UTC)):
            return p.expired(self._adapter.name, d.attempts)
        item = p.prepare(self.account, req)
        if isinstance(item, c.InvalidRequest):
            return p.invalid(item)
        d.item = item
        return None

    async def _crashed(self, d: Delivery, exc: Exception) -> None:
        log.error("handler_crashed", account=d.account, error=type(exc).__name__, deliveries=d.delivery_count + 1)
        if d.delivery_count + 1 < self._settings.poison_deliveries:
            await requeue(self._acks, [d])
            return
        err = c.OutcomeError("poison", type(exc).__name__, "the handler crashed on this message", False)
        f = p.finish(c.Status.FAILED, None, attempts=d.attempts, error=err, dead=c.DeadReason.POISON, store=False)
        await self._settler.settle(d, f)

    # -- batches ------------------------------------------------------------------------------------

    def _flush(self, batch: list[Delivery]) -> None:
        self._batches += 1
        task = asyncio.create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._batches -= 1
        self._batcher.pump()  # due groups that waited for a slot, grown meanwhile

    async def _run_batch(self, batch: list[Delivery]) -> None:
        # One span per batch: the first message's trace is its parent, the others are links.
        parent = trace.set_span_in_context(batch[0].span) if batch[0].span is not None else None
        links = [Link(d.span.get_span_context()) for d in batch[1:] if d.span is not None]
        attributes: dict[str, str | int] = {"sms.account": self.account.name, "sms.batch_size": len(batch)}
        async with self._slots:
            with tracing.tracer().start_as_current_span(
                "sms.batch", context=parent, links=links, attributes=attributes
            ):
                try:
                    decisions, store_failed = await self._decide(batch)
                except Exception:
                    # Nothing of the batch reached the provider (see _decide). The batch waits
                    # in the broker as delayed copies rather than being requeued: a requeue counts
                    # towards the queue's delivery limit, whose dead letter has no gateway headers.
                    log.exception("batch_failed", account=self.account.name, size=len(batch))
                    await self._settler.settle_all([(d, self._wait(d)) for d in batch])
                    await self._back_off("batch_failed")
                    return
                try:
                    await self._record(batch, decisions)
                except Exception:
                    # Part of the batch may have reached the provider: never requeue it for a blind
                    # resend. The results known are published; the claims left behind in the store
                    # make any later copy reconcile once their lease ends.
                    log.exception("record_failed", account=self.account.name, size=len(batch))
                    store_failed = True
                await self._settler.settle_all([(d, decisions[i]) for i, d in enumerate(batch)])
        if store_failed:
            await self._back_off("store_failed")
        else:
            self._backoff_s = 1.0
        if any(isinstance(x, p.Finish) and x.pause_account for x in decisions.values()):
            await self._pause(self._settings.account_pause_s, "account_error")

    async def _back_off(self, reason: str) -> None:
        await self._pause(self._backoff_s, reason)
        self._backoff_s = min(self._backoff_s * 2, 60.0)

    def _wait(self, d: Delivery) -> p.Decision:
        """Look again later without an attempt (another claim holds the id, or the store failed);
        the delay grows with each wait, and after `max_waits` the message fails instead of looping."""
        if d.waits + 1 > self._settings.max_waits:
            err = c.OutcomeError("waits_exhausted", "WaitsExhausted", "gave up waiting for the id's claim", False)
            # Not stored: the claim belongs to another worker, whose result is the id's record.
            return p.finish(
                c.Status.FAILED,
                self._adapter.name,
                attempts=d.attempts,
                error=err,
                dead=c.DeadReason.RETRIES_EXHAUSTED,
                store=False,
            )
        return p.Wait(self._policy.delay_ms(d.waits + 1))

    async def _decide(self, batch: list[Delivery]) -> tuple[dict[int, p.Decision], bool]:
        """Claim, reconcile, send: a decision for every delivery, and whether the store failed on
        the way. Raises only before anything of the batch was sent (the claim or the reconcile failed)."""
        name = self.account.name
        decisions: dict[int, p.Decision] = {}
        first_of: dict[str, int] = {}
        for i, d in enumerate(batch):
            assert d.unique_id is not None
            if d.unique_id in first_of:
                decisions[i] = self._wait(d)  # the same id twice in one batch
            else:
                first_of[d.unique_id] = i
        # One round trip claims the ids and takes rate-limit tokens for the new ones.
        rate, burst = self._limits()
        claims, granted, wait = await self._store.claim_and_acquire(
            name,
            list(first_of),
            self._owner,
            self._settings.claim_lease_s,
            rate,
            burst,
            suspect={uid for uid, i in first_of.items() if batch[i].seen_before},
            recovery_s=self._settings.store_recovery_s,
        )
        reconcile: list[int] = []
        send: list[int] = []
        for uid, i in first_of.items():
            claim = claims[uid]
            if claim.state is ClaimState.DONE:
                assert claim.result is not None
                decisions[i] = p.already_done(claim.result, ours=batch[i].ours)
            elif claim.state is ClaimState.BUSY:
                decisions[i] = self._wait(batch[i])
            elif claim.state is ClaimState.RECONCILE or batch[i].sent_at is not None:
                # A copy that says an earlier attempt may have gone out is reconciled whatever the
                # store says: a store that lost its records answers NEW for it.
                reconcile.append(i)
            else:
                send.append(i)
        if reconcile:
            send += await self._reconcile(batch, reconcile, decisions)
        now = datetime.now(UTC)
        for i in list(send):
            req = batch[i].request
            if req is not None and p.is_expired(req, now):
                decisions[i] = p.expired(self._adapter.name, batch[i].attempts)
                send.remove(i)
        store_failed = await self._send(batch, send, decisions, (granted, wait) if granted or wait else None)
        return decisions, store_failed

    async def _reconcile(self, batch: list[Delivery], idx: list[int], decisions: dict[int, p.Decision]) -> list[int]:
        """Ask the provider about ids a crashed or unanswered attempt may have sent; return those to send."""
        items = [replace(x, attempted_at=batch[i].sent_at) for i in idx if (x := batch[i].item) is not None]
        try:
            found = await self._adapter.lookup(items)
        except LookupFailed as exc:
            log.warning("reconcile_failed", account=self.account.name, count=len(idx), error=str(exc)[:200])
            unknown = ItemResult(
                Verdict.AMBIGUOUS,
                error=ProviderError("lookup_failed", "LookupFailed", "could not tell whether it was sent", True),
            )
            for i in idx:
                decisions[i] = p.decide(unknown, batch[i].attempts + 1, self._policy, self._adapter.name)
            return []
        to_send = []
        for i, result in zip(idx, found, strict=True):
            if result is None:
                to_send.append(i)
            else:
                decisions[i] = p.decide(result, max(batch[i].attempts, 1), self._policy, self._adapter.name)
        log.info("reconciled", account=self.account.name, found=len(idx) - len(to_send), missing=len(to_send))
        return to_send

    def _limits(self) -> tuple[float, int]:
        """The account's rate and burst, scaled down while the provider throttles (see _adapt)."""
        a = self.account
        return a.rate_per_s * self._rate_factor, max(1, round(a.burst * self._rate_factor))

    async def _send(
        self,
        batch: list[Delivery],
        idx: list[int],
        decisions: dict[int, p.Decision],
        taken: tuple[int, float] | None = None,
    ) -> bool:
        """Send `idx` as rate-limit tokens allow; `taken` is (tokens, wait) from the claim step.
        Returns True when the store failed while taking tokens: the ids still waiting for tokens
        were not sent and wait (their claims stay, so a later copy reconciles after the lease)."""
        a = self.account
        sends: list[asyncio.Task[None]] = []

        async def send_chunk(chunk: list[int]) -> None:
            m.BATCH_SIZE.labels(a.name).observe(len(chunk))
            started = time.time()
            for i in chunk:
                batch[i].attempt_at = started
            items = [x for i in chunk if (x := batch[i].item) is not None]
            try:
                results = await self._adapter.send(items)
            except Exception as exc:  # an adapter bug: the request may have gone out
                log.exception("adapter_failed", account=a.name, size=len(chunk))
                error = ProviderError("internal", type(exc).__name__, "the provider call failed in the gateway", True)
                results = [ItemResult(Verdict.AMBIGUOUS, error=error)] * len(chunk)
            for i, result in zip(chunk, results, strict=True):
                decisions[i] = p.decide(result, batch[i].attempts + 1, self._policy, self._adapter.name)
            self._adapt(results)

        pending = idx
        store_failed = False
        while pending:
            if taken is not None:
                granted, wait = taken
                taken = None
            else:
                try:
                    granted, wait = await self._store.acquire(a.name, len(pending), *self._limits())
                except Exception:  # the store is away; what is sent stays sent
                    log.exception("acquire_failed", account=a.name, waiting=len(pending))
                    for i in pending:
                        decisions[i] = self._wait(batch[i])
                    store_failed = True
                    break
            if granted:
                sends.append(asyncio.create_task(send_chunk(pending[:granted])))
                pending = pending[granted:]
            if pending:
                pause = max(wait, min(a.linger_ms / 1000, 0.05))
                m.RATE_LIMIT_WAIT.labels(a.name).inc(pause)
                await asyncio.sleep(pause)
        await asyncio.gather(*sends)
        return store_failed

    def _adapt(self, results: Sequence[ItemResult]) -> None:
        """AIMD on the account's rate: halve it when the provider throttles, creep back on success."""
        if any(r.error is not None and r.error.throttle for r in results):
            self._rate_factor = max(MIN_RATE_FACTOR, self._rate_factor / 2)
            m.RATE_FACTOR.labels(self.account.name).set(self._rate_factor)
            log.warning(
                "account_throttled", account=self.account.name, rate_per_s=self.account.rate_per_s * self._rate_factor
            )
        elif self._rate_factor < 1.0 and any(r.verdict is Verdict.ACCEPTED for r in results):
            self._rate_factor = min(1.0, self._rate_factor * 1.1 + 0.01)
            m.RATE_FACTOR.labels(self.account.name).set(self._rate_factor)

    async def _record(self, batch: list[Delivery], decisions: dict[int, p.Decision]) -> None:
        """Write what the decisions mean to the state store, before anything is published."""
        name = self.account.name
        done: dict[str, StoredResult] = {}
        unknown: list[str] = []
        release: list[str] = []
        for i, decision in decisions.items():
            uid = batch[i].unique_id
            assert uid is not None
            if isinstance(decision, p.Finish) and decision.store:
                done[uid] = decision.result
            elif isinstance(decision, p.Retry):
                (unknown if decision.ambiguous else release).append(uid)
        window = self.account.dedupe_window_s
        await self._store.complete(name, done, window)
        await self._store.mark_unknown(name, unknown, window)
        await self._store.release(name, release, self._owner)

    # -- pause, resume, stop ------------------------------------------------------------------------

    async def _pause(self, seconds: float, reason: str) -> None:
        if self._stopping:
            return
        until = time.monotonic() + seconds
        if until <= self._paused_until:
            return
        first = not self.paused
        self._paused_until = until
        if not first:
            return
        log.warning("account_paused", account=self.account.name, seconds=seconds, reason=reason)
        m.PAUSED.labels(self.account.name).set(1)
        if self._consumer is not None:
            await self._consumer.cancel()
        await requeue(self._acks, self._batcher.take_all())
        task = asyncio.create_task(self._resume_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume_later(self) -> None:
        while self.paused:  # noqa: ASYNC110 - the deadline moves when a pause is extended
            await asyncio.sleep(max(0.05, self._paused_until - time.monotonic()))
        m.PAUSED.labels(self.account.name).set(0)
        if not self._stopping:
            log.info("account_resumed", account=self.account.name)
            if self._consumer is not None:
                await self._consumer.ensure()

    async def stop(self, timeout_s: float) -> bool:
        """Stop taking messages, send what is batched, wait for in-flight work. True if all finished."""
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.close()
        self._batcher.flush_all()
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return True
        _done, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        return not late


class UnroutableWorker:
    """Requests whose routing key names no configured account: `invalid` outcome + dead letter.

    Nothing about the message may stop this: an undecodable body still gets its dead letter (the
    outcome needs a readable `unique_id`), and a routing key too long to be part of another one is
    shortened for the outcome's and the dead letter's routing keys."""

    def __init__(self, publisher: Publisher, settings: Settings) -> None:
        self._acks = AckTracker()
        self._settler = Settler(publisher, None, self._acks)
        self._settings = settings
        self._consumer: QueueConsumer | None = None
        self._stopping = False

    async def start(self, channel: AbstractChannel) -> None:
        self._consumer = QueueConsumer(channel, c.UNROUTABLE_QUEUE, self._on_message, 50)
        await self._consumer.start(wanted=lambda: not self._stopping)

    @property
    def consuming(self) -> bool:
        return self._consumer is not None and self._consumer.live

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        routing_key = message.routing_key or "unknown"
        d = Delivery.begin(message, routing_key[:MAX_ACCOUNT_LABEL], label=UNKNOWN_ACCOUNT_LABEL)
        try:
            req = c.decode_request(
                message.body,
                message_id=message.message_id,
                max_bytes=self._settings.max_body_bytes,
                max_text_chars=self._settings.max_text_chars,
            )
            d.unique_id, d.to, d.meta = req.unique_id, req.to, req.meta
        except Exception as exc:
            log.exception("decode_crashed", queue=c.UNROUTABLE_QUEUE, error=type(exc).__name__)
        err = c.OutcomeError("unknown_account", "UnknownAccount", f"no account named {routing_key[:200]!r}", False)
        f = p.finish(c.Status.INVALID, None, attempts=0, error=err, dead=c.DeadReason.UNKNOWN_ACCOUNT, store=False)
        await self._settler.settle(d, f)

    async def stop(self) -> None:
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.close()
