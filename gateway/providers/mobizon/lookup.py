"""Did an ambiguous send go out? Mobizon has no client message id, so a message is looked up with
`Message/List` by recipient and exact text since shortly before the attempt: none found means not
sent, one found means sent, more than one means nobody can tell (`failed`, never a blind resend)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx

from gateway.errors import LookupFailed
from gateway.providers.base import Action, ItemResult, Outbound, Verdict
from gateway.providers.mobizon.api import MobizonApi, digits, ident
from gateway.providers.mobizon.codes import number

# Mobizon's server time zone is not documented; a lookup window this much wider than our own
# clock covers any offset.
LOOKUP_MARGIN = timedelta(hours=15)


async def find(api: MobizonApi, item: Outbound) -> ItemResult | None:
    since = datetime.fromtimestamp(item.attempted_at or time.time(), UTC) - LOOKUP_MARGIN
    form = {
        "criteria": {
            "to": digits(item.phone),
            "text": item.text,
            "campaignCreateTsFrom": since.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "pagination": {"pageSize": 25, "currentPage": 0},
    }
    async with api.gate:
        try:
            doc, failure = await api.call("Message/List", form)
        except httpx.HTTPError as exc:
            raise LookupFailed(f"Message/List: {type(exc).__name__}") from exc
    if failure is not None or number(doc["code"]) != 0 or not isinstance(doc.get("data"), dict):
        raise LookupFailed(f"Message/List answered {str(doc)[:200] if doc else failure}")
    items = [
        x
        for x in doc["data"].get("items") or []
        if isinstance(x, dict) and digits(str(x.get("to", ""))) == digits(item.phone) and x.get("text") == item.text
    ]
    if not items:
        return None
    if len(items) > 1:
        why = f"{len(items)} messages with this recipient and text; cannot tell whether this one was sent"
        result = ItemResult.failure("unreconciled", "Unreconciled", why, Action.PERMANENT)
        return ItemResult(Verdict.UNDECIDED, error=result.error)
    return ItemResult(Verdict.ACCEPTED, provider_message_id=ident(items[0].get("id")))
