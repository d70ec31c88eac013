"""The one place that acks, nacks and requeues: a decision becomes confirmed publishes, then an ack.

Every consumed message ends in exactly one of:
- ack, after its outcome (and dead letter, or retry copy) has been confirmed by the broker;
- nack with requeue (pause, shutdown, an infrastructure failure), so it is delivered again.
The frames themselves are coalesced per channel by the `AckTracker` (acks.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from gateway import contract as c
from gateway.bus.acks import Acks
from gateway.bus.publisher import Publish, Publisher
from gateway.core.decisions import Decision, Defer, Finish, Job, Retry, Wait
from gateway.numbers import mask
from gateway.obs import metrics as m
from gateway.obs import tracing
from gateway.obs.logs import get_logger
from gateway.providers.base import UNKNOWN_TYPE

log = get_logger("gateway.bus.settle")
UNKNOWN_CODE_LABEL = "unknown"  # the metric label of every provider code outside the code tables


# Metric children by label values, looked up per message: `labels()` costs microseconds each.
# Bounded: account labels are configured names (or one "unknown"), codes come from code tables.
_CHILDREN: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


@dataclass(eq=False, slots=True)
class Delivery:
    """One consumed message, from delivery to settlement: the AMQP message, the pipeline's `Job`,
    its span and its place in the in-flight gauge."""

    message: AbstractIncomingMessage
    account: str
    lane: c.Lane | None = None  # the lane it was consumed from (None: the unknown-account queue)
    job: Job = field(default_factory=Job)
    started: float = field(default_factory=time.monotonic)
    span: trace.Span | None = None
    label: str = ""  # the account as a metric label: configured names only, so the label set stays bounded
    _open: bool = False

    @classmethod
    def begin(
        cls, message: AbstractIncomingMessage, account: str, label: str | None = None, lane: c.Lane | None = None
    ) -> Delivery:
        """Start tracking a consumed message: its span (continuing the publisher's trace) and the
        in-flight gauge. `close` ends both, exactly once."""
        queue = c.account_queue(account, lane) if lane is not None else c.UNROUTABLE_QUEUE
        span = tracing.tracer().start_span(
            "sms.send process",
            context=tracing.extract(message.headers),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rabbitmq", "messaging.destination.name": queue},
        )
        label = account if label is None else label
        _child(m.IN_FLIGHT, label).inc()
        return cls(message, account, lane, span=span, _open=True, label=label)

    @property
    def routing_key(self) -> str:
        """Where a copy of it goes back to: its account's lane."""
        return c.lane_key(self.account, self.lane or c.Lane.NORMAL)

    @property
    def unique_id(self) -> str | None:
        return self.job.unique_id

    def close(self, result: str) -> None:
        if not self._open:
            return
        self._open = False
        _child(m.IN_FLIGHT, self.label).dec()
        if self.span is not None:
            self.span.set_attribute("sms.result", result)
            if self.job.unique_id:
                self.span.set_attribute("sms.unique_id", self.job.unique_id)
            if result == "requeued":
                self.span.set_status(StatusCode.ERROR, "requeued")
            self.span.end()


class Settler:
    """Carries decisions out: publish what each delivery is owed, then ack the ones whose
    publishes the broker confirmed (coalesced by the channel's AckTracker) and requeue the rest."""

    def __init__(self, publisher: Publisher, provider: str | None, acks: Acks) -> None:
        self._publisher = publisher
        self._provider = provider
        self._acks = acks

    async def settle(self, d: Delivery, decision: Decision) -> bool:
        return await self.settle_all([(d, decision)]) == 1

    async def settle_all(
        self,
        items: Sequence[tuple[Delivery, Decision]],
        on_confirmed: Callable[[Sequence[tuple[Delivery, Decision]]], None] | None = None,
    ) -> int:
        """Settle deliveries together; returns how many were acked. `on_confirmed` is told which
        deliveries had what they are owed confirmed by the broker, before their acks. A delivery
        whose channel is gone publishes nothing: the broker delivers it again, and that copy (the
        gateway's own) gets the outcome. Published for this one too, a result found done by another
        replica meanwhile would go out as `duplicate` to the producer whose request it is."""
        if any(self._acks.stale(d.message) for d, _ in items):
            stale = [d for d, _ in items if self._acks.stale(d.message)]
            items = [(d, x) for d, x in items if not self._acks.stale(d.message)]
            log.info("stale_deliveries_not_settled", account=stale[0].account, count=len(stale))
            for d in stale:
                d.close("requeued")
            if not items:
                return 0
        failures = await self._publish_all(items)
        done: list[tuple[Delivery, Decision]] = []
        failed: list[tuple[Delivery, BaseException]] = []
        for (d, decision), exc in zip(items, failures, strict=True):
            if exc is None:
                done.append((d, decision))
            else:
                failed.append((d, exc))
        if failed:
            # One line per batch, not per message: a lost connection fails every publish of the
            # batch the same way. The first failure's traceback stands for them.
            first, exc = failed[0]
            log.error(
                "settle_failed",
                account=first.account,
                count=len(failed),
                unique_id=first.unique_id if len(failed) == 1 else None,
                error=type(exc).__name__,
                exc_info=exc,
            )
            await requeue(self._acks, [d for d, _ in failed])
        if not done:
            return 0
        if on_confirmed is not None:
            on_confirmed(done)
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

    async def _publish_all(self, items: Sequence[tuple[Delivery, Decision]]) -> list[BaseException | None]:
        """Publish what every decision owes at once, under one bound; each delivery's failure (the
        first of its publishes that failed), None when the broker confirmed them all."""
        plans: list[list[Publish]] = []
        failures: list[BaseException | None] = []
        for d, decision in items:
            try:
                plans.append(self._publishes(d, decision))
                failures.append(None)
            except Exception as exc:  # noqa: BLE001 - that delivery is requeued, the others go on
                plans.append([])
                failures.append(exc)
        answers = iter(await self._publisher.publish_all([x for plan in plans for x in plan]))
        for i, plan in enumerate(plans):
            for _ in plan:
                failure = next(answers)
                if failures[i] is None and failure is not None:
                    failures[i] = failure
        return failures

    def _publishes(self, d: Delivery, decision: Decision) -> list[Publish]:
        """What the decision owes: an outcome (and a dead letter), or a retry copy."""
        if isinstance(decision, Finish):
            return self._finish(d, decision)
        if isinstance(decision, Retry):
            copy = self._publisher.retry(
                d.message,
                routing_key=d.routing_key,
                delay_ms=decision.delay_ms,
                attempts=decision.attempts,
                waits=0,
                sent_at=(d.job.attempt_at or d.job.sent_at) if decision.ambiguous else None,
                valid_until=d.job.valid_until,
                via=d.job.maybe_at,
            )
        elif isinstance(decision, Wait):
            copy = self._publisher.retry(
                d.message,
                routing_key=d.routing_key,
                delay_ms=decision.delay_ms,
                attempts=d.job.attempts,
                waits=d.job.waits + 1,
                sent_at=None if decision.unsent else (d.job.attempt_at or d.job.sent_at),
                waiting_since=decision.since,
                own=decision.own,
                valid_until=d.job.valid_until,
                via=d.job.maybe_at,
            )
        else:  # Defer: the same copy again later, as it came (nothing was claimed or sent)
            copy = self._publisher.retry(
                d.message,
                routing_key=d.routing_key,
                delay_ms=decision.delay_ms,
                attempts=d.job.attempts,
                waits=d.job.waits,
                sent_at=d.job.sent_at,
                waiting_since=d.job.waiting_since,
                own=d.job.ours,
                valid_until=d.job.valid_until,
                via=d.job.maybe_at,
            )
        return [copy]

    @staticmethod
    def _count(d: Delivery, decision: Decision) -> None:
        if isinstance(decision, Finish):
            error = decision.result.error
            # A code no table knows is in the outcome and the log as sent; as a label it is one value.
            code = "" if error is None else (UNKNOWN_CODE_LABEL if error.type == UNKNOWN_TYPE else error.code)
            _child(m.OUTCOMES, d.label, decision.result.status, code).inc()
            if d.lane is not None:
                _child(m.LANE_OUTCOMES, d.label, d.lane, decision.result.status).inc()
            if decision.dead is not None:
                m.DEAD_LETTERS.labels(d.label, str(decision.dead)).inc()
        else:
            m.RETRIES.labels(d.label, _result_name(decision)).inc()

    def _finish(self, d: Delivery, f: Finish) -> list[Publish]:
        r, job = f.result, d.job
        item = job.item
        fields: dict[str, Any] = {
            "unique_id": job.unique_id,
            "account": d.account,
            "to": job.phone,
            "status": f.status,
            "provider": r.provider or self._provider,
            "provider_message_id": r.provider_message_id,
            "parts": r.parts if r.parts is not None else (item.parts if item is not None else None),
            "attempts": r.attempts,
            "error": r.error,
            "meta": job.meta,
            "original": f.original.as_dict() if f.original is not None else None,
            "lane": str(d.lane) if d.lane is not None else None,
            "encoding": r.encoding or (str(item.encoding) if item is not None else None),
            "transliterated": str(item.transliterated) if item is not None and item.transliterated != "off" else None,
            "cost": r.cost if f.status is c.Status.ACCEPTED else None,
            "via": r.via,
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
        out: list[Publish] = []
        if job.unique_id is not None:  # an outcome nobody can correlate is noise; the dead letter says it all
            out += self._publisher.outcome_publishes(
                account=d.account,
                status=str(f.status),
                body=body,
                unique_id=job.unique_id,
                reply_to=d.message.reply_to,
                correlation_id=d.message.correlation_id,
                headers=tracing.inject(d.span, {}),
            )
        if f.dead is not None:
            out.append(
                self._publisher.dead_letter(
                    d.message,
                    reason=f.dead,
                    account=d.account,
                    lane=d.lane,
                    error_code=r.error.code if r.error is not None else str(f.dead),
                    error_message=r.error.message if r.error is not None else "",
                    attempts=r.attempts,
                )
            )
        return out

    def _log(self, d: Delivery, decision: Decision) -> None:
        ms = round((time.monotonic() - d.started) * 1000, 1)
        to = mask(d.job.phone)
        if isinstance(decision, Finish):
            r = decision.result
            log.info(
                "sms",
                account=d.account,
                unique_id=d.unique_id,
                to=to,
                status=r.status,
                code=r.error.code if r.error is not None else None,
                attempts=r.attempts,
                provider_message_id=r.provider_message_id,
                duration_ms=ms,
            )
        elif isinstance(decision, Retry):
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
        elif isinstance(decision, Wait):
            log.info("sms_wait", account=d.account, unique_id=d.unique_id, to=to, waits=d.job.waits + 1)
        else:
            log.info(
                "sms_deferred",
                account=d.account,
                unique_id=d.unique_id,
                to=to,
                reason=decision.reason,
                delay_ms=decision.delay_ms,
            )


def _result_name(decision: Decision) -> str:
    if isinstance(decision, Finish):
        return str(decision.status)
    if isinstance(decision, Defer):
        return "defer"
    return "retry" if isinstance(decision, Retry) else "wait"


async def requeue(acks: Acks, deliveries: Sequence[Delivery]) -> None:
    """Nack each with requeue. Deliveries of a lost channel cannot be nacked (the broker has
    requeued them already): one line for all of them."""
    failed = 0
    error = ""
    for d in deliveries:
        try:
            await acks.requeue(d.message)
        except Exception as exc:  # noqa: BLE001 - the channel is gone; the broker requeues on its own
            failed += 1
            error = error or type(exc).__name__
        d.close("requeued")
    if failed:
        log.warning("nack_failed", account=deliveries[0].account, count=failed, error=error)
