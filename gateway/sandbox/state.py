"""What the sandbox remembers: a ledger of every send it accepted, and the faults it was told to inject.

The ledger is the ground truth that tests and benchmarks count duplicates and rates from. A fault
rule matches requests by API identity (`token:<t>`, `user:<name>` or `*`) and path fragment, fires
with a probability and, optionally, a limited number of times, and then does one of:

- `code`: answer the provider's error envelope with that code (HTTP 200, as the real API does);
- `http_status`: answer that HTTP status with an HTML body;
- `latency_ms` (+ `jitter_ms`): delay the answer, then carry on;
- `reset`: drop the connection before the request is processed;
- `hang`: never answer, and do not process the request either;
- `swallow`: process the request (the send counts), then never answer: the ambiguous case.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from pydantic import BaseModel, Field

from gateway import segments
from gateway.sandbox.dlr import Fate, Lifecycle, local_ts

WARSAW = ZoneInfo("Europe/Warsaw")
NEVER_S = 3600.0


@dataclass(slots=True)
class SendRecord:
    who: str
    unique_id: str | None
    phone: str
    text: str
    sender: str
    provider_id: str
    stat_id: str
    at: float = field(default_factory=time.time)
    utf: bool = False  # SerwerSMS: sent with `utf` (diacritics kept)
    parts: int = field(init=False)  # counted once: the ledger lists every send

    def __post_init__(self) -> None:
        self.parts = segments.count(self.text).parts


class FaultRule(BaseModel):
    match: str = Field(default="*", description="API identity (token:<t>, user:<name>) or *")
    path: str = Field(
        default="send",
        description="applies to request paths containing this (lower case); the default hits the send calls of "
        "both APIs (messages/send_*, Message/SendSmsMessage, Campaign/Send)",
    )
    rate: float = Field(default=1.0, ge=0, le=1)
    count: int | None = Field(default=None, ge=1, description="fire this many times, then retire")
    code: int | None = None
    http_status: int | None = Field(default=None, ge=400, le=599)
    latency_ms: float = Field(default=0, ge=0)
    jitter_ms: float = Field(default=0, ge=0)
    reset: bool = False
    hang: bool = False
    swallow: bool = False

    def matches(self, who: str, path: str) -> bool:
        return (self.match in ("*", who)) and self.path in path


@dataclass(slots=True)
class _Armed:
    id: int
    rule: FaultRule
    fired: int = 0


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self._rules: list[_Armed] = []
        self._ids = count(1)
        self._random = random.Random(seed)

    def add(self, rule: FaultRule) -> int:
        armed = _Armed(next(self._ids), rule)
        self._rules.append(armed)
        return armed.id

    def clear(self) -> None:
        self._rules.clear()

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": a.id, "fired": a.fired, **a.rule.model_dump()} for a in self._rules]

    def _pick(self, who: str, path: str) -> list[FaultRule]:
        fired = []
        for armed in list(self._rules):
            if not armed.rule.matches(who, path) or self._random.random() >= armed.rule.rate:
                continue
            armed.fired += 1
            if armed.rule.count is not None and armed.fired >= armed.rule.count:
                self._rules.remove(armed)
            fired.append(armed.rule)
        return fired

    async def before(
        self, who: str, request: web.Request, error_body: Callable[[int], dict[str, Any]]
    ) -> tuple[web.StreamResponse | None, bool]:
        """Apply the rules that act before the request is processed: (a response that ends it there,
        whether the answer is to be swallowed after processing). `error_body` is the served API's
        error envelope for a code."""
        rules = self._pick(who, request.path.lower())
        swallow = any(r.swallow for r in rules)
        for r in rules:
            if r.latency_ms or r.jitter_ms:
                await asyncio.sleep((r.latency_ms + self._random.uniform(0, r.jitter_ms)) / 1000)
        for r in rules:
            if r.reset:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if r.hang:
                await asyncio.sleep(NEVER_S)
            if r.http_status is not None:
                body = "<html><body>Server error</body></html>"
                return web.Response(status=r.http_status, text=body, content_type="text/html"), False
            if r.code is not None:
                return web.json_response(error_body(r.code)), False
        return None, swallow

    @staticmethod
    async def swallow() -> None:
        await asyncio.sleep(NEVER_S)  # processed and recorded; the answer never comes


class SandboxState:
    def __init__(self, *, duplicate_control: bool = False, seed: int | None = None) -> None:
        self.faults = Faults(seed)
        self.duplicate_control = duplicate_control
        self.requests = 0
        self.sends: list[SendRecord] = []
        self._by_uid: dict[tuple[str, str], int] = {}
        self._by_recipient: dict[str, int] = {}
        self.answers: dict[str, int] = {}  # error codes answered, e.g. {"mobizon:13": 1}
        # Mobizon: the regional host each API key belongs to (code 13 elsewhere), and a per-key,
        # per-method request rate above which calls get code 30.
        self.mobizon_home: dict[str, str] = {}
        self.mobizon_rate_per_s: float | None = None
        # Mobizon: numbers that get this per-recipient AddRecipients code once (partial results).
        self.mobizon_recipient_codes: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # API calls that reached a handler, by "api:method"
        # The W3C trace context of the latest API calls, as a provider-side tracer would continue it.
        self.traceparents: deque[str] = deque(maxlen=1000)
        # Delivery: each accepted message's fate, Mobizon's webhooks, and when each id was polled.
        self.lifecycle = Lifecycle(random.Random(seed))
        self.fates: dict[str, Fate] = {}  # provider message id -> fate
        self.polled: dict[str, list[float]] = {}  # provider message id -> times of the status polls

    def reset(self) -> None:
        self.faults.clear()
        self.requests = 0
        self.sends.clear()
        self._by_uid.clear()
        self._by_recipient.clear()
        self.answers.clear()
        self.calls.clear()
        self.traceparents.clear()
        self.fates.clear()
        self.polled.clear()
        self.mobizon_recipient_codes.clear()

    def holds(self, who: str, unique_id: str) -> bool:
        return (who, unique_id) in self._by_uid

    def count_call(self, name: str, request: web.Request) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if traceparent := request.headers.get("traceparent"):
            self.traceparents.append(traceparent)

    def count_answer(self, api: str, code: int) -> None:
        key = f"{api}:{code}"
        self.answers[key] = self.answers.get(key, 0) + 1

    def record(self, rec: SendRecord) -> None:
        fate = self.lifecycle.fate(rec)
        self.fates[rec.provider_id] = fate
        if rec.who.startswith("key:"):
            self.lifecycle.recorded(rec, fate)
        self.sends.append(rec)
        phone = rec.phone.lstrip("+")
        self._by_recipient[phone] = self._by_recipient.get(phone, 0) + 1
        if rec.unique_id:
            key = (rec.who, rec.unique_id)
            self._by_uid[key] = self._by_uid.get(key, 0) + 1

    def polls(self, ids: Iterable[str]) -> None:
        now = time.time()
        for i in ids:
            self.polled.setdefault(i, []).append(now)

    def mobizon_status(self, provider_id: str) -> str:
        fate = self.fates.get(provider_id)
        return "ACCEPTD" if fate is None else self.lifecycle.mobizon_status(fate, time.time())

    def report_item(self, r: SendRecord) -> dict[str, Any]:
        """A `messages/reports` item, from the message's lifecycle (`sent`, then its fate)."""
        queued = datetime.fromtimestamp(r.at, WARSAW).strftime("%Y-%m-%d %H:%M:%S")
        fate = self.fates.get(r.provider_id)
        status, reason = ("sent", None) if fate is None else self.lifecycle.serwersms_status(fate, time.time())
        final_at = local_ts(fate.final_at) if fate is not None and status != "sent" else None
        parts = r.parts
        return {
            "id": r.provider_id,
            "phone": r.phone,
            "status": status,
            "reason": reason,
            "queued": queued,
            "sent": queued,
            "delivered": final_at if status == "delivered" else None,
            "sender": r.sender,
            "type": "full",
            "text": r.text,
            "parts": parts,
            "unique_id": r.unique_id,
            "stat_id": r.stat_id,
        }

    def ledger(self) -> dict[str, Any]:
        """Counts per unique_id and one row per accepted send (its parts, not its text)."""
        per_uid: dict[str, int] = {}
        for (_who, uid), n in self._by_uid.items():
            per_uid[uid] = per_uid.get(uid, 0) + n
        return {
            "requests": self.requests,
            "sends": len(self.sends),
            "by_unique_id": per_uid,
            "by_recipient": dict(self._by_recipient),
            "answers": dict(self.answers),
            "calls": dict(self.calls),
            "polled": {i: len(ts) for i, ts in self.polled.items()},
            "webhooks": {
                "posts": self.lifecycle.webhook_posts,
                "answers": dict(self.lifecycle.webhook_answers),
                "events": len(self.lifecycle.events),
                "pending": self.lifecycle.pending(),
            },
            "records": [
                {
                    "t": r.at,
                    "who": r.who,
                    "unique_id": r.unique_id,
                    "phone": r.phone,
                    "id": r.provider_id,
                    "parts": r.parts,
                    "utf": r.utf,
                }
                for r in self.sends
            ],
        }
