"""The dead-letter queue as operators see it: read without losing, replay, purge (`gateway dlq`).

Reading never consumes: letters are fetched with `basic.get` and manual acks and given back when
the channel closes, so a crash of the reader at any point returns them all to `sms.dead`.

A replay republishes a letter's body byte for byte into `sms.send` (routing key: its account's
lane), or into `sms.optout` for an opt-out message (routing key: its scope), with the
`x-gateway-replay` header, waits for the broker's confirm, and only then acks the letter:

- a crash before the confirm leaves the letter in `sms.dead` (nothing lost);
- a crash between the confirm and the ack leaves it too, and a second replay publishes it again.
  The gateway's dedupe makes that copy harmless: the id is claimed by the first copy, whose result
  (`accepted`) answers the second `duplicate`. Only an earlier `rejected`, `failed` or `expired`
  result is sent again (see `contract.H_REPLAY`).

Each pass takes at most the number of letters the queue held when it started, so letters that a
replay sends back to `sms.dead` (the cause was not fixed) are not replayed again in the same pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from gateway import contract as c
from gateway.numbers import mask


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One letter of `sms.dead`, read from its headers (the gateway's, or the broker's for a
    letter its delivery limit moved) and, where it parses, its body."""

    id: str  # short and stable: the same letter has the same id in every listing
    at: datetime | None
    account: str
    reason: str
    code: str
    message: str
    attempts: int
    unique_id: str | None
    to: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    lane: c.Lane = c.Lane.NORMAL  # the lane it was consumed from: a replay sends it back there
    exchange: str = c.SEND_EXCHANGE  # where a replay publishes it (sms.optout for an opt-out message)

    @property
    def replay_key(self) -> str:
        return c.lane_key(self.account, self.lane) if self.exchange == c.SEND_EXCHANGE else self.account

    def row(self) -> dict[str, Any]:
        """The listing's view: the number masked, no text."""
        return {
            "id": self.id,
            "at": c.rfc3339(self.at.replace(microsecond=0)) if self.at else None,
            "account": self.account,
            "reason": self.reason,
            "code": self.code,
            "to": mask(self.to),
            "unique_id": self.unique_id,
        }

    def full(self) -> dict[str, Any]:
        """Everything, for `dlq show`: headers, properties and the body (as JSON when it is)."""
        body = _parse(self.body)
        if body is None:
            body = self.body.decode("utf-8", "replace")
        return {**self.row(), "message": self.message, "attempts": self.attempts, "to": self.to,
                "headers": self.headers, "properties": self.properties, "body": body}  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return c.rfc3339(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _lane(headers: dict[str, Any]) -> c.Lane:
    """The gateway's lane header, or the queue the broker's delivery limit moved it from."""
    named = str(headers.get(c.H_LANE) or "")
    if named in set(c.Lane):
        return c.Lane(named)
    queue = str(headers.get("x-first-death-queue") or "")
    prefix = c.SEND_EXCHANGE + "."
    return c.split_key(queue[len(prefix) :])[1] if queue.startswith(prefix) else c.Lane.NORMAL


def read(message: AbstractIncomingMessage) -> DeadLetter:
    headers: dict[str, Any] = _jsonable(dict(message.headers or {}))
    key = message.routing_key or ""
    key_reason, _, key_account = key.partition(".")
    reason = str(headers.get(c.H_REASON) or key_reason or "unknown")
    account = str(headers.get(c.H_ACCOUNT) or key_account or "")
    at = _time(headers)
    doc = _parse(message.body)
    doc = doc if isinstance(doc, dict) else {}
    uid = doc.get("unique_id", message.message_id)
    to = doc.get("to")
    code = str(headers.get(c.H_ERROR_CODE) or ("delivery_limit" if reason == c.DeadReason.POISON else ""))
    digest = hashlib.sha256()
    for part in (reason, account, code, str(headers.get(c.H_DEAD_AT, "")), _death_time(headers)):
        digest.update(part.encode() + b"\0")
    digest.update(message.body)
    return DeadLetter(
        id=digest.hexdigest()[:12],
        at=at,
        account=account,
        reason=reason,
        code=code,
        message=str(headers.get(c.H_ERROR_MESSAGE) or ""),
        attempts=int(headers.get(c.H_ATTEMPTS) or 0),
        unique_id=uid if isinstance(uid, str) else None,
        to=to if isinstance(to, str) else None,
        headers=headers,
        lane=_lane(headers),
        exchange=c.OPTOUT_EXCHANGE if headers.get(c.H_EXCHANGE) == c.OPTOUT_EXCHANGE else c.SEND_EXCHANGE,
        properties=_jsonable(
            {
                k: v
                for k, v in {
                    "message_id": message.message_id,
                    "correlation_id": message.correlation_id,
                    "reply_to": message.reply_to,
                    "content_type": message.content_type,
                    "timestamp": message.timestamp,
                    "app_id": message.app_id,
                }.items()
                if v is not None
            }
        ),
        body=message.body,
    )


def _parse(body: bytes) -> Any:
    """The body as JSON, or None. Dead letters are whatever was refused, hostile input included
    (nesting thousands deep, huge numbers), so they are read with the gateway's own bounded parser."""
    try:
        return c.parse_json(body)
    except Exception:  # noqa: BLE001 - any refusal: the letter is listed without its body's fields
        return None


def _death_time(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("time", ""))
    return ""


def _time(headers: dict[str, Any]) -> datetime | None:
    text = headers.get(c.H_DEAD_AT) or _death_time(headers)
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Filter:
    account: str | None = None
    reason: str | None = None
    code: str | None = None
    since: datetime | None = None
    ids: frozenset[str] = frozenset()
    unique_id: str | None = None
    before: datetime | None = None  # a replay's own start: what it sends back to sms.dead is not taken again

    def __call__(self, letter: DeadLetter) -> bool:
        if self.ids and letter.id not in self.ids:
            return False
        if self.unique_id is not None and letter.unique_id != self.unique_id:
            return False
        if self.account is not None and letter.account != self.account:
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.code is not None and letter.code != self.code:
            return False
        if self.before is not None and letter.at is not None and letter.at >= self.before:
            return False
        return not (self.since is not None and (letter.at is None or letter.at < self.since))


async def depth(channel: AbstractChannel) -> int:
    queue = await channel.declare_queue(c.DEAD_QUEUE, passive=True)
    return int(queue.declaration_result.message_count or 0)


BROWSE_EMPTY_LOOKS = 2
BROWSE_EMPTY_WAIT_S = 0.1


async def browse(channel: AbstractChannel) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
    """Every letter the queue holds now, unacked: what the caller does not ack goes back to the
    queue when the channel closes.

    "Now" is the ready count at the start, and then whatever else is ready, up to as many again:
    letters another reader held (a listing that just closed its channel, a replay that was
    killed) come back to the queue a moment after that reader is gone, behind the count."""
    queue = await channel.declare_queue(c.DEAD_QUEUE, passive=True)
    ready = int(queue.declaration_result.message_count or 0)
    empty = 0
    for _ in range(2 * ready + 100):
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            # A reader that just closed its channel (the previous command) has its letters put back
            # a moment after its close: look again twice before calling the queue read.
            if empty == BROWSE_EMPTY_LOOKS:
                return
            empty += 1
            await asyncio.sleep(BROWSE_EMPTY_WAIT_S)
            continue
        empty = 0
        yield message, read(message)


async def listing(connection: AbstractConnection, keep: Filter, limit: int | None = None) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    async with connection.channel() as channel:
        async for _message, letter in browse(channel):
            if keep(letter):
                out.append(letter)
                if limit is not None and len(out) >= limit:
                    break
    return out  # the channel closed: every letter is back in the queue


def replay_headers(headers: dict[str, Any] | None, replay_id: str) -> dict[str, Any]:
    """A dead letter's headers as its replay carries them: the producer's own (traceparent, ...),
    none of the gateway's or the broker's bookkeeping, and the replay marker."""
    kept = {
        k: v
        for k, v in (headers or {}).items()
        if not k.startswith(c.GATEWAY_HEADER_PREFIX) and k not in c.BROKER_HEADERS and k != c.H_RETRY_DELAY
    }
    kept[c.H_REPLAY] = replay_id
    return kept


@dataclass(slots=True)
class Summary:
    matched: int = 0
    done: int = 0  # replayed (or purged)
    skipped: int = 0  # a letter without an account cannot be routed: left in place

    def as_dict(self) -> dict[str, int]:
        return {"matched": self.matched, "done": self.done, "skipped": self.skipped}


async def replay(
    connection: AbstractConnection,
    keep: Filter,
    *,
    limit: int | None = None,
    chunk: int = 200,
    progress: Callable[[int], None] = lambda _n: None,
) -> Summary:
    """Republish the matching letters into sms.send, each acked only after its copy is confirmed."""
    replay_id = uuid.uuid4().hex[:12]
    keep = replace(keep, before=datetime.now(UTC))
    summary = Summary()
    async with connection.channel(publisher_confirms=True) as out, connection.channel() as src:
        exchanges = {name: await out.get_exchange(name, ensure=True) for name in (c.SEND_EXCHANGE, c.OPTOUT_EXCHANGE)}

        async def flush(batch: list[tuple[AbstractIncomingMessage, DeadLetter]]) -> None:
            await asyncio.gather(
                *(exchanges[d.exchange].publish(_copy(m, replay_id), routing_key=d.replay_key) for m, d in batch)
            )
            for m, _d in batch:
                await m.ack()
            summary.done += len(batch)
            progress(len(batch))

        await _select(src, keep, limit, chunk, summary, flush)
    return summary


async def purge(connection: AbstractConnection, keep: Filter, *, limit: int | None = None) -> Summary:
    summary = Summary()
    async with connection.channel() as src:

        async def flush(batch: list[tuple[AbstractIncomingMessage, DeadLetter]]) -> None:
            for m, _d in batch:
                await m.ack()
            summary.done += len(batch)

        await _select(src, keep, limit, 500, summary, flush, routable_only=False)
    return summary


async def _select(
    src: AbstractChannel,
    keep: Filter,
    limit: int | None,
    chunk: int,
    summary: Summary,
    flush: Callable[[list[tuple[AbstractIncomingMessage, DeadLetter]]], Awaitable[None]],
    *,
    routable_only: bool = True,
) -> None:
    batch: list[tuple[AbstractIncomingMessage, DeadLetter]] = []
    async for message, letter in browse(src):
        if not keep(letter):
            continue  # not acked: back in the queue when the channel closes
        if routable_only and not letter.account:
            summary.skipped += 1
            continue
        summary.matched += 1
        batch.append((message, letter))
        if len(batch) >= chunk:
            await flush(batch)
            batch = []
        if limit is not None and summary.matched >= limit:
            break
    if batch:
        await flush(batch)


def _copy(message: AbstractIncomingMessage, replay_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=replay_headers(message.headers, replay_id),
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        app_id=message.app_id,
    )
