"""SerwerSMS.pl HTTPS API v2, the adapter (the API's facts: docs/providers.md).

- One text to many numbers: `messages/send_sms` with `phone` and `unique_id` arrays.
- Different texts: `messages/send_personalized` with `messages: [{phone, text}]`.
- Always `details=true`, so each number gets an item (`queued` with an id, or `unsent` with a code).
- `utf=true` when the text needs UCS-2 and a sender is set (SMS FULL; ECO+ has no such flag).
- Every message carries a deterministic provider-safe `unique_id`, so a resend after a crash is
  recognisable and `messages/reports?unique_id=` can tell whether an ambiguous send went out.
- Auth: `Authorization: Bearer <token>` or `username`/`password` in the JSON body.
- API errors come as HTTP 200 with `{"error": {"code", "type", "message"}}`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from gateway.config import Account
from gateway.errors import LookupFailed
from gateway.obs.logs import get_logger
from gateway.providers.base import (
    Action,
    ItemResult,
    Outbound,
    StatusReport,
    Verdict,
    batch_key,
    fan_out,
)
from gateway.providers.http import decode_json, make_client, traced_post, transport_failure
from gateway.providers.serwersms.codes import NAME, STATUSES, classify
from gateway.segments import Encoding

log = get_logger("gateway.providers.serwersms")

MAX_NUMBERS = 100_000  # per send_sms request
MAX_PERSONALIZED = 10_000  # per send_personalized request
LOOKUP_CONCURRENCY = 8
MAX_REPORT_IDS = 500  # per messages/reports query
WARSAW = ZoneInfo("Europe/Warsaw")

_BAD_RESPONSE = ItemResult.failure("bad_response", "BadResponse", "unexpected answer layout", Action.AMBIGUOUS)
_MISSING = ItemResult.failure("missing_item", "MissingItem", "no item for this message in the answer", Action.AMBIGUOUS)
# Report statuses meaning the provider holds the message (sent or on its way).
_HELD = {"queued", "saved", "in_progress", "sent", "delivered", "undelivered"}


def provider_date(ts: datetime) -> str:
    return ts.astimezone(WARSAW).strftime("%Y-%m-%d %H:%M:%S")


def build_send(batch: Sequence[Outbound]) -> tuple[str, dict[str, Any]]:
    """The action path and JSON body (without credentials) for one compatible batch."""
    first = batch[0]
    body: dict[str, Any] = {"details": True, "unique_id": [o.provider_ref for o in batch]}
    if len({o.text for o in batch}) == 1:
        path = "messages/send_sms.json"
        body["phone"] = [o.phone for o in batch]
        body["text"] = first.text
    else:
        path = "messages/send_personalized.json"
        body["messages"] = [{"phone": o.phone, "text": o.text} for o in batch]
    if first.sender:
        body["sender"] = first.sender
        if first.encoding is Encoding.UCS2:
            body["utf"] = True  # FULL messages only: without it the provider does not keep diacritics
    if first.flash:
        body["flash"] = True
    if first.test:
        body["test"] = True
    if first.send_at is not None:
        body["date"] = provider_date(first.send_at)
    return path, body


def _item_result(item: dict[str, Any]) -> ItemResult:
    status = str(item.get("status", ""))
    if status in _HELD:  # the provider has it; `undelivered` (from a lookup) went out, too
        parts = item.get("parts")
        return ItemResult(
            Verdict.ACCEPTED,
            provider_message_id=str(item["id"]) if item.get("id") is not None else None,
            parts=int(parts) if isinstance(parts, int | str) and str(parts).isdigit() else None,
        )
    if status == "unsent":
        result = classify(item.get("error_code", item.get("reason")), item.get("error_message"))
        return ItemResult(result.verdict, error=result.error)
    bad = ItemResult.failure("bad_item", "BadItem", f"unexpected item status {status[:40]!r}", Action.AMBIGUOUS)
    return ItemResult(Verdict.AMBIGUOUS, error=bad.error)


def parse_send(batch: Sequence[Outbound], doc: Any) -> list[ItemResult]:
    """Per-item results of a send answer; items map back by unique_id, else by order, else by phone."""
    if not isinstance(doc, dict):
        return [_BAD_RESPONSE] * len(batch)
    if isinstance(doc.get("error"), dict):
        err = doc["error"]
        return [classify(err.get("code"), err.get("message"), answer=doc)] * len(batch)
    items = doc.get("items")
    if not isinstance(items, list):
        if doc.get("success") is True and doc.get("queued") == len(batch) and not doc.get("unsent"):
            return [ItemResult(Verdict.ACCEPTED)] * len(batch)
        return [_BAD_RESPONSE] * len(batch)
    items = [i for i in items if isinstance(i, dict)]
    by_ref = {str(i["unique_id"]): i for i in items if i.get("unique_id")}
    if by_ref:
        return [_item_or_missing(by_ref.get(o.provider_ref)) for o in batch]
    if len(items) == len(batch):
        return [_item_result(i) for i in items]
    by_phone: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
    for i in items:
        by_phone[str(i.get("phone", "")).lstrip("+")].append(i)
    out = []
    for o in batch:
        queue = by_phone.get(o.phone.lstrip("+"))
        out.append(_item_or_missing(queue.popleft() if queue else None))
    return out


def _item_or_missing(item: dict[str, Any] | None) -> ItemResult:
    if item is None:
        return _MISSING
    return _item_result(item)


def parse_report(doc: Any) -> ItemResult | None:
    """One `messages/reports` answer filtered by a single unique_id: what the provider holds, if any."""
    if not isinstance(doc, dict) or isinstance(doc.get("error"), dict) or not isinstance(doc.get("items"), list):
        raise LookupFailed(f"unexpected messages/reports answer: {str(doc)[:200]}")
    items = [i for i in doc["items"] if isinstance(i, dict)]
    if not items:
        return None
    held = [i for i in items if i.get("status") in _HELD]
    return _item_result(held[0] if held else items[0])


def parse_statuses(doc: Any) -> list[StatusReport]:
    """A `messages/reports` answer filtered by ids: one report per item."""
    if not isinstance(doc, dict) or isinstance(doc.get("error"), dict) or not isinstance(doc.get("items"), list):
        raise LookupFailed(f"unexpected messages/reports answer: {str(doc)[:200]}")
    out = []
    for item in doc["items"]:
        if isinstance(item, dict) and item.get("id") is not None:
            when = _warsaw(item.get("delivered") or item.get("sent"))
            out.append(STATUSES.report(str(item["id"]), item.get("status"), item.get("reason"), when))
    return out


def _warsaw(value: Any) -> datetime | None:
    """A SerwerSMS timestamp (`YYYY-MM-DD HH:MM:SS`, Warsaw time), or None."""
    try:
        return datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S").replace(tzinfo=WARSAW)
    except ValueError:
        return None


class SerwerSmsAdapter:
    name = NAME
    max_batch = MAX_PERSONALIZED
    max_status_ids = MAX_REPORT_IDS

    def __init__(
        self, account: Account, client: httpx.AsyncClient | None = None, *, proxy_from_env: bool = False
    ) -> None:
        self._account = account
        self._client = client or make_client(
            account.base_url,
            account.http_timeout_s,
            max(account.concurrency, account.max_concurrency),
            proxy_from_env=proxy_from_env,
        )
        self._headers: dict[str, str] = {}
        self._auth_body: dict[str, str] = {}
        if account.token is not None:
            self._headers["Authorization"] = f"Bearer {account.token.get_secret_value()}"
        elif account.username and account.password is not None:
            self._auth_body = {"username": account.username, "password": account.password.get_secret_value()}

    def __repr__(self) -> str:
        return f"SerwerSmsAdapter(account={self._account.name!r})"

    batch_key = staticmethod(batch_key)

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await traced_post(
            self._client,
            path,
            account=self._account.name,
            provider=NAME,
            json_body={**body, **self._auth_body},
            headers=self._headers,
        )

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        if not batch:
            return []
        path, body = build_send(batch)
        try:
            response = await self._post(path, body)
        except httpx.HTTPError as exc:
            return [transport_failure(exc)] * len(batch)
        doc, failure = decode_json(response)
        if failure is not None:
            return [failure] * len(batch)
        return parse_send(batch, doc)

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        return await fan_out(batch, self._lookup_one, LOOKUP_CONCURRENCY)

    async def _lookup_one(self, item: Outbound) -> ItemResult | None:
        try:
            response = await self._post("messages/reports.json", {"unique_id": item.provider_ref})
        except httpx.HTTPError as exc:
            raise LookupFailed(f"messages/reports: {type(exc).__name__}") from exc
        doc, failure = decode_json(response)
        if failure is not None:
            raise LookupFailed(f"messages/reports: {failure.error.message if failure.error else ''}")
        return parse_report(doc)

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        body = {"id": list(message_ids), "limit": len(message_ids)}
        try:
            response = await self._post("messages/reports.json", body)
        except httpx.HTTPError as exc:
            raise LookupFailed(f"messages/reports: {type(exc).__name__}") from exc
        doc, failure = decode_json(response)
        if failure is not None:
            raise LookupFailed(f"messages/reports: {failure.error.message if failure.error else ''}")
        return parse_statuses(doc)

    async def close(self) -> None:
        await self._client.aclose()
