"""Mobizon delivery-report webhooks: the JSON body, and its `sign`.

    {"eventId", "eventType": "sms-delivery-report", "eventCreateTs", "webhookId", "attempt",
     "data": {"campaignId", "messageId", "segNum", "statusUpdateTs", "status", "to"}, "sign"}

`sign = sha1(eventId|attempt|eventCreateTs|secret)`, lowercase hex, absent when the webhook has no
secret. Mobizon sends one event per whole message and only for final statuses, retries up to ten
times with the same `eventId` and wants a 2xx within 5 s. Only `eventId`, `attempt` and
`eventCreateTs` are signed: nothing else of the body (message id, status, `webhookId`) can be
trusted from the webhook itself. The `raw` and `xml` formats are undocumented; a form-encoded body
(bracket notation) is read the same way as JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from gateway.errors import BadWebhook
from gateway.providers.base import StatusReport
from gateway.providers.mobizon.codes import STATUSES

MAX_BODY_BYTES = 16 * 1024
DELIVERY_REPORT = "sms-delivery-report"
__all__ = ["BadWebhook", "WebhookEvent", "created_at", "parse", "signature", "verify"]


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    event_id: str
    event_type: str
    created: str  # eventCreateTs, as sent (part of the signature)
    webhook_id: str
    attempt: str
    sign: str | None
    report: StatusReport | None  # for delivery reports
    to: str | None


def created_at(event: WebhookEvent) -> float | None:
    """`eventCreateTs` as epoch seconds: documented as `2026-01-15 11:42:28` in an unstated time zone
    (read as UTC; callers allow for any zone), also taken as epoch seconds or milliseconds. None
    when it is neither (the signature still covers it)."""
    text = event.created.strip()
    if text.isdigit():
        value = float(text)
        return value / 1000 if value > 1e11 else value
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        return None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def signature(event_id: str, attempt: str, created: str, secret: str) -> str:
    return hashlib.sha1(f"{event_id}|{attempt}|{created}|{secret}".encode(), usedforsecurity=False).hexdigest()


def verify(event: WebhookEvent, secret: str) -> bool:
    """Constant-time check of the event's `sign` against the secret."""
    expected = signature(event.event_id, event.attempt, event.created, secret)
    return event.sign is not None and hmac.compare_digest(event.sign.strip().lower(), expected)


def parse(body: bytes, content_type: str = "application/json") -> WebhookEvent:
    if len(body) > MAX_BODY_BYTES:
        raise BadWebhook(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        if content_type.startswith("application/x-www-form-urlencoded"):
            doc: Any = _unflatten(parse_qsl(text, keep_blank_values=True))
        else:
            doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadWebhook(f"unreadable body: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise BadWebhook("body is not an object")
    event_id, created, attempt = _scalar(doc, "eventId"), _scalar(doc, "eventCreateTs"), _scalar(doc, "attempt")
    event_type = _scalar(doc, "eventType", DELIVERY_REPORT)
    sign = doc.get("sign")
    if sign is not None and not isinstance(sign, str):
        raise BadWebhook("sign is not a string")
    report, to = None, None
    if event_type == DELIVERY_REPORT:
        data = doc.get("data")
        if not isinstance(data, dict):
            raise BadWebhook("data is not an object")
        message_id = _scalar(data, "messageId")
        report = STATUSES.report(message_id, _scalar(data, "status"))
        to = str(data["to"]) if isinstance(data.get("to"), str | int) else None
    return WebhookEvent(event_id, event_type, created, _scalar(doc, "webhookId", "0"), attempt, sign, report, to)


def _scalar(doc: dict[str, Any], key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "" or len(str(value)) > 200:
        raise BadWebhook(f"{key} missing or not a short string or number")
    return str(value)


def _unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """PHP bracket notation back into objects: data[status]=DELIVRD -> {"data": {"status": "DELIVRD"}}."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BadWebhook(f"{key} mixes a value and an object")
            node = child
        node[parts[-1]] = value
    return out
