"""The campaign flow: many messages with one text (or one template) in a few calls.

`Campaign/Create` (type 2, or 3 with `{placeholders}`), `Campaign/AddRecipients` at most 500 per
call (per-recipient codes; overall 0 / 98 / 99), then `Campaign/Send`. Nothing is sent before
`Campaign/Send`, so any doubt while adding recipients abandons the campaign and retries its
messages safely. A number may appear once per campaign: the adapter sends repeats on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from gateway.obs.logs import get_logger
from gateway.providers.base import Action, ItemResult, Outbound, Verdict
from gateway.providers.http import transport_failure
from gateway.providers.mobizon.api import MobizonApi, digits, ident, options, succeeded
from gateway.providers.mobizon.codes import ADD_OVERALL, RECIPIENT_TABLE, SUCCESS, number

log = get_logger("gateway.providers.mobizon")

MAX_RECIPIENTS_PER_ADD = 500
Results = list[ItemResult | None]


async def send_campaign(
    api: MobizonApi, batch: Sequence[Outbound], idx: list[int], text: str, templated: bool, results: Results
) -> None:
    """Send `batch[i] for i in idx` (one text) as one campaign; fills `results` at those places."""
    first = batch[idx[0]]
    data: dict[str, Any] = {"type": 3 if templated else 2, "text": text, **options(first)}
    if first.sender:
        data["from"] = first.sender
    async with api.gate:
        try:
            doc, failure = await api.call("Campaign/Create", {"data": data})
        except httpx.HTTPError as exc:
            failure = _unsent(transport_failure(exc))  # creating a campaign sends nothing
    if failure is None and not succeeded(doc, SUCCESS):
        failure = api.failure(doc)
    campaign = ident(doc.get("data")) if failure is None else None
    if failure is not None or campaign is None:
        _fill(results, idx, _unsent(failure or _NO_ID))
        return
    added: dict[int, str | None] = {}
    for start in range(0, len(idx), MAX_RECIPIENTS_PER_ADD):
        chunk = idx[start : start + MAX_RECIPIENTS_PER_ADD]
        if not await _add(api, batch, campaign, chunk, templated, results, added):
            # Unsure what was added: never send this campaign, retry everything in it.
            _fill(results, idx, _ABANDONED, overwrite=True)
            return
    if not added:
        return
    async with api.gate:
        try:
            doc, failure = await api.call("Campaign/Send", {"id": campaign})
        except httpx.HTTPError as exc:
            failure = transport_failure(exc)
    if failure is None and not succeeded(doc, SUCCESS):
        failure = api.failure(doc)
    if failure is not None:
        _fill(results, list(added), failure)
        return
    for i, message_id in added.items():
        results[i] = ItemResult(Verdict.ACCEPTED, provider_message_id=message_id)
    log.info("mobizon_campaign_sent", account=api.account, campaign=campaign, recipients=len(added))


async def _add(
    api: MobizonApi,
    batch: Sequence[Outbound],
    campaign: str,
    chunk: list[int],
    templated: bool,
    results: Results,
    added: dict[int, str | None],
) -> bool:
    """Add one chunk; False when it is unknown what was added (the campaign must not be sent)."""
    if templated:
        recipients: list[Any] = [{"recipient": digits(batch[i].phone), **dict(batch[i].vars)} for i in chunk]
        form: dict[str, Any] = {"id": campaign, "recipients": recipients, "params": {"placeholdersFlag": 3}}
    else:
        form = {"id": campaign, "recipients": [digits(batch[i].phone) for i in chunk]}
    async with api.gate:
        try:
            doc, failure = await api.call("Campaign/AddRecipients", form)
        except httpx.HTTPError:
            return False
    if failure is not None:
        return False
    code = number(doc["code"])
    if code not in ADD_OVERALL:
        _fill(results, chunk, _unsent(api.failure(doc)))
        return True
    by_number: dict[str, dict[str, Any]] = {}
    for row in doc.get("data") or []:
        if isinstance(row, dict):
            by_number[digits(str(row.get("recipient") or row.get("number") or ""))] = row
    for i in chunk:
        row = by_number.get(digits(batch[i].phone))
        if row is None:
            if code == 0:  # all added, rows omitted
                added[i] = None
                continue
            return False
        if number(row.get("code")) == 0:
            added[i] = ident(row.get("messageId"))
        else:
            results[i] = RECIPIENT_TABLE.classify(row.get("code"))
    return True


_ABANDONED = ItemResult.failure("campaign_abandoned", "CampaignAbandoned", "adding recipients failed", Action.RETRYABLE)
_NO_ID = ItemResult.failure("bad_response", "BadResponse", "Campaign/Create answered no id", Action.RETRYABLE)


def _unsent(result: ItemResult) -> ItemResult:
    """A failure before `Campaign/Send`: nothing went out, so an ambiguous verdict is a plain retry."""
    if result.verdict is Verdict.AMBIGUOUS:
        return ItemResult(Verdict.RETRY, error=result.error)
    return result


def _fill(results: Results, idx: list[int], value: ItemResult, *, overwrite: bool = False) -> None:
    for i in idx:
        if overwrite or results[i] is None:
            results[i] = value
