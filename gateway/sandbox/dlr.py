"""Delivery in the sandbox: each accepted message's status lifecycle, and Mobizon's webhooks.

Every send the sandbox accepts gets a fate when it is recorded: a final outcome drawn from `mix`
(delivered, undelivered, expired, rejected) and the time it is reached (`delay_s` + up to
`jitter_s`). Until then a message is in flight (SerwerSMS `sent`; Mobizon `ACCEPTD`, or `PDLIVRD`
for the `partial_share` that deliver some segments first). `messages/reports` and
`Message/GetSMSStatus` answer from this lifecycle.

For a Mobizon API key with a webhook (`webhooks`: key -> url and secret), the final status is also
POSTed as Mobizon does: the documented JSON body with `sign`, retried with the same `eventId` and a
growing gap while the answer is not a 2xx (at most `max_attempts`). To test a receiver, a share of
events is sent again although it was answered (`retry_share`, attempt + 1), a share is sent twice at
once (`duplicate_share`), and a share goes out before the send's own answer (`early_share`: the
final status at once, and the send call answers only after the webhook was answered).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import httpx
from pydantic import BaseModel, Field

from gateway.numbers import country_of


class SendRecord(Protocol):
    """What the lifecycle reads of a recorded send (state.SendRecord)."""

    who: str
    phone: str
    provider_id: str
    stat_id: str
    at: float


WARSAW = ZoneInfo("Europe/Warsaw")
FATES = ("delivered", "undelivered", "expired", "rejected")
MOBIZON_FINAL = {"delivered": "DELIVRD", "undelivered": "UNDELIV", "expired": "EXPIRED", "rejected": "REJECTD"}
SERWERSMS_REASON = {"undelivered": "wrong_number", "expired": "message_expired", "rejected": "message_rejected"}
# The webhooks a send call waits for before it answers (early reports), per request task.
HOLD: contextvars.ContextVar[list[asyncio.Event] | None] = contextvars.ContextVar("hold", default=None)


class Webhook(BaseModel):
    url: str
    secret: str | None = None


class Undelivered(BaseModel):
    """A share of one identity's messages to one country that end undelivered, whatever `mix` says
    (a route that accepts and then drops)."""

    match: str = Field(default="*", description="API identity (token:<t>, user:<name>, key:<apiKey>) or *")
    country: str = Field(default="*", description="ISO 3166 alpha-2 of the recipient, or *")
    share: float = Field(ge=0, le=1)


class DlrConfig(BaseModel):
    delay_s: float = Field(default=1.0, ge=0, description="time from the send to the final status")
    jitter_s: float = Field(default=0.0, ge=0, description="plus up to this much, at random")
    mix: dict[str, float] = Field(
        default_factory=lambda: {"delivered": 1.0}, description="weights of the final outcomes (FATES)"
    )
    partial_share: float = Field(default=0.0, ge=0, le=1, description="Mobizon: PDLIVRD before the final status")
    webhooks: dict[str, Webhook] = Field(default_factory=dict, description="Mobizon API key -> its webhook")
    retry_share: float = Field(default=0.0, ge=0, le=1)
    duplicate_share: float = Field(default=0.0, ge=0, le=1)
    early_share: float = Field(default=0.0, ge=0, le=1)
    retry_gap_s: float = Field(default=60.0, gt=0, description="Mobizon: one minute, growing by one per attempt")
    max_attempts: int = Field(default=10, ge=1)
    undelivered: list[Undelivered] = Field(
        default_factory=list, description="shares of an identity's messages to a country that end undelivered"
    )


@dataclass(slots=True)
class Fate:
    outcome: str  # one of FATES
    sent_at: float
    final_at: float
    partial: bool = False


def sign(event_id: int, attempt: int, created: str, secret: str) -> str:
    return hashlib.sha1(f"{event_id}|{attempt}|{created}|{secret}".encode(), usedforsecurity=False).hexdigest()


def local_ts(at: float) -> str:
    return datetime.fromtimestamp(at, WARSAW).strftime("%Y-%m-%d %H:%M:%S")


class Lifecycle:
    def __init__(self, rnd: random.Random) -> None:
        self.config = DlrConfig()
        self._random = rnd
        self._events = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.webhook_posts = 0
        self.webhook_answers: dict[str, int] = {}
        self.events: dict[int, str] = {}  # event id -> provider message id

    def fate(self, rec: SendRecord) -> Fate:
        cfg = self.config
        names = [f for f in FATES if cfg.mix.get(f, 0) > 0] or ["delivered"]
        outcome = self._random.choices(names, weights=[cfg.mix.get(f, 1.0) for f in names])[0]
        if cfg.undelivered:
            country = country_of("+" + rec.phone.lstrip("+")) or ""
            for rule in cfg.undelivered:
                if rule.match in ("*", rec.who) and rule.country.upper() in ("*", country):
                    if self._random.random() < rule.share:
                        outcome = "undelivered"
                    break
        delay = cfg.delay_s + self._random.uniform(0, cfg.jitter_s)
        return Fate(outcome, rec.at, rec.at + delay, self._random.random() < cfg.partial_share)

    def mobizon_status(self, fate: Fate, now: float) -> str:
        if now >= fate.final_at:
            return MOBIZON_FINAL[fate.outcome]
        return "PDLIVRD" if fate.partial and now >= (fate.sent_at + fate.final_at) / 2 else "ACCEPTD"

    @staticmethod
    def serwersms_status(fate: Fate, now: float) -> tuple[str, str | None]:
        if now < fate.final_at:
            return "sent", None
        if fate.outcome == "delivered":
            return "delivered", None
        return "undelivered", SERWERSMS_REASON[fate.outcome]

    # -- Mobizon webhooks ---------------------------------------------------------------------------

    def recorded(self, rec: SendRecord, fate: Fate) -> None:
        """A Mobizon send was recorded: schedule its webhook, if its key has one."""
        key = rec.who.removeprefix("key:")
        hook = self.config.webhooks.get(key)
        if hook is None:
            return
        early = self._random.random() < self.config.early_share
        answered = asyncio.Event()
        if early:
            fate.final_at = rec.at  # final at once: the report races the send's own answer
            held = HOLD.get()
            if held is not None:
                held.append(answered)
        task = asyncio.get_running_loop().create_task(self._emit(rec, fate, hook, answered))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, rec: SendRecord, fate: Fate, hook: Webhook, answered: asyncio.Event) -> None:
        await asyncio.sleep(max(0.0, fate.final_at - time.time()))
        self._events += 1
        event_id = self._events
        self.events[event_id] = rec.provider_id
        cfg = self.config
        created = local_ts(time.time())
        again = self._random.random() < cfg.retry_share
        twice = self._random.random() < cfg.duplicate_share
        try:
            for attempt in range(1, cfg.max_attempts + 1):
                body = self._body(rec, fate, event_id, attempt, created, hook.secret)
                posts = [self._post(hook.url, body)] * (2 if twice and attempt == 1 else 1)
                oks = await asyncio.gather(*posts)
                answered.set()
                if all(oks) and not (again and attempt == 1):
                    return
                await asyncio.sleep(cfg.retry_gap_s * attempt)
        finally:
            answered.set()

    def _body(
        self, rec: SendRecord, fate: Fate, event_id: int, attempt: int, created: str, secret: str | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "eventId": event_id,
            "eventType": "sms-delivery-report",
            "eventCreateTs": created,
            "webhookId": 1,
            "attempt": attempt,
            "data": {
                "campaignId": int(rec.stat_id) if rec.stat_id.isdigit() else rec.stat_id,
                "messageId": int(rec.provider_id) if rec.provider_id.isdigit() else rec.provider_id,
                "segNum": 1,
                "statusUpdateTs": local_ts(fate.final_at),
                "status": MOBIZON_FINAL[fate.outcome],
                "to": rec.phone.lstrip("+"),
            },
        }
        if secret:
            body["sign"] = sign(event_id, attempt, created, secret)
        return body

    async def _post(self, url: str, body: dict[str, Any]) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0, trust_env=False)
        self.webhook_posts += 1
        try:
            response = await self._client.post(url, json=body)
        except httpx.HTTPError as exc:
            self.webhook_answers[type(exc).__name__] = self.webhook_answers.get(type(exc).__name__, 0) + 1
            return False
        key = str(response.status_code)
        self.webhook_answers[key] = self.webhook_answers.get(key, 0) + 1
        return response.is_success

    def pending(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
