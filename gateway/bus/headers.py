"""What a delivery's AMQP properties and the gateway's own headers say about its job: attempts,
waits, when it was first sent or began to wait, and whether it is the gateway's own copy. A header
a producer mangled reads as absent, never as an error."""

from __future__ import annotations

from aio_pika.abc import AbstractIncomingMessage

from gateway import contract as c
from gateway.core.decisions import Job


def int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name, 0)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return max(0, int(value)) if isinstance(value, int | str) else 0
    except ValueError:
        return 0


def float_header(message: AbstractIncomingMessage, name: str) -> float | None:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None


def read_job(message: AbstractIncomingMessage, job: Job) -> Job:
    """Fill `job` from the delivery's headers and flags (the body is the pipeline's to decode)."""
    job.attempts = int_header(message, c.H_ATTEMPTS)
    job.waits = int_header(message, c.H_WAITS)
    job.waiting_since = float_header(message, c.H_WAITING_SINCE)
    job.sent_at = float_header(message, c.H_SENT_AT)
    job.valid_until = float_header(message, c.H_VALID_UNTIL)
    job.published_at = message.timestamp.timestamp() if message.timestamp is not None else None
    job.redelivered = bool(message.redelivered)
    job.app_id = message.app_id or None
    headers = message.headers or {}
    job.own = bool(headers.get(c.H_OWN))
    via = headers.get(c.H_VIA)
    if isinstance(via, bytes):
        via = via.decode(errors="replace")
    job.maybe_at = tuple(n for n in via.split(",") if n) if isinstance(via, str) else ()
    job.replay = bool(headers.get(c.H_REPLAY))
    return job


def first_delivery(job: Job) -> bool:
    """Neither a retry, a wait copy nor a redelivery: its time in the queue is the producer's wait."""
    return not (job.attempts or job.waits or job.redelivered)
