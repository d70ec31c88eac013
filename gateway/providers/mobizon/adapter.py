"""Mobizon API v1, the adapter (the API's facts: docs/providers.md).

- Few messages: one `Message/SendSmsMessage` each, several in flight (the rate limit was taken by
  the caller for the whole batch).
- Many messages with one text (or one template): the campaign flow (campaign.py).
- Mobizon has no test mode: requests with `test: true` are validated and answered `accepted`
  (without a provider message id) without any API call.
- Ambiguous sends are looked up by recipient and text (lookup.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.config import Account
from gateway.errors import LookupFailed
from gateway.providers.base import Action, ItemResult, Outbound, StatusReport, Verdict, batch_key, fan_out
from gateway.providers.http import transport_failure
from gateway.providers.mobizon import lookup
from gateway.providers.mobizon.api import MobizonApi, digits, ident, options, succeeded
from gateway.providers.mobizon.campaign import Results, send_campaign
from gateway.providers.mobizon.codes import NAME, STATUSES, SUCCESS

CAMPAIGN_MIN = 20  # fewer same-text messages than this go out as single sends
LOOKUP_CONCURRENCY = 8
MAX_STATUS_IDS = 100  # per Message/GetSMSStatus call (more: code 12)
_MISSING = ItemResult.failure("missing_item", "MissingItem", "no result for this message", Action.AMBIGUOUS)


class MobizonAdapter:
    name = NAME
    max_batch = 10_000
    max_status_ids = MAX_STATUS_IDS
    batch_key = staticmethod(batch_key)

    def __init__(
        self, account: Account, client: httpx.AsyncClient | None = None, *, proxy_from_env: bool = False
    ) -> None:
        self._api = MobizonApi(account, client, proxy_from_env=proxy_from_env)

    def __repr__(self) -> str:
        return f"MobizonAdapter(account={self._api.account!r})"

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        results: Results = [None] * len(batch)
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, item in enumerate(batch):
            if item.test:  # Mobizon has no test mode: a dry run must never reach the API
                results[i] = ItemResult(Verdict.ACCEPTED)
                continue
            templated = item.template is not None and "{{" not in item.template and "}}" not in item.template
            groups[(item.template if templated and item.template else item.text, templated)].append(i)
        jobs = []
        singles: list[int] = []
        for (text, templated), idx in groups.items():
            seen: set[str] = set()
            unique: list[int] = []
            for i in idx:  # a number may appear once per campaign
                (singles if digits(batch[i].phone) in seen else unique).append(i)
                seen.add(digits(batch[i].phone))
            if len(unique) >= CAMPAIGN_MIN:
                jobs.append(send_campaign(self._api, batch, unique, text, templated, results))
            else:
                singles += unique
        jobs += [self._single(batch[i], i, results) for i in singles]
        await asyncio.gather(*jobs)
        return [r if r is not None else _MISSING for r in results]

    async def _single(self, item: Outbound, i: int, results: Results) -> None:
        form: dict[str, Any] = {"recipient": digits(item.phone), "text": item.text}
        if item.sender:
            form["from"] = item.sender
        if params := options(item):
            form["params"] = params
        async with self._api.gate:
            try:
                doc, failure = await self._api.call("Message/SendSmsMessage", form)
            except httpx.HTTPError as exc:
                results[i] = transport_failure(exc)
                return
        if failure is not None:
            results[i] = failure
        elif succeeded(doc, SUCCESS) and isinstance(doc.get("data"), dict):
            results[i] = ItemResult(
                Verdict.ACCEPTED,
                provider_message_id=ident(doc["data"].get("messageId")),
            )
        else:
            results[i] = self._api.failure(doc)

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        return await fan_out(batch, lambda item: lookup.find(self._api, item), LOOKUP_CONCURRENCY)

    async def statuses(self, message_ids: Sequence[str]) -> list[StatusReport]:
        """`Message/GetSMSStatus`. Its `statusUpdateTs` is in the server's undocumented time zone,
        so the reports carry no time of their own."""
        async with self._api.gate:
            try:
                doc, failure = await self._api.call("Message/GetSMSStatus", {"ids": list(message_ids)})
            except httpx.HTTPError as exc:
                raise LookupFailed(f"Message/GetSMSStatus: {type(exc).__name__}") from exc
        if failure is not None or not succeeded(doc, {0}) or not isinstance(doc.get("data"), list):
            raise LookupFailed(f"Message/GetSMSStatus answered {str(doc)[:200] if doc else failure}")
        return [
            STATUSES.report(str(row["id"]), row.get("status"))
            for row in doc["data"]
            if isinstance(row, dict) and row.get("id") is not None
        ]

    async def close(self) -> None:
        await self._api.close()
