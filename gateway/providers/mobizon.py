"""Mobizon API v1 (contract: shared/providers/mobizon.md).

- `https://{host}/service/{Module}/{Method}?apiKey=...&output=json&api=v1`, parameters as an
  `application/x-www-form-urlencoded` body in PHP bracket notation; every answer is HTTP 200 with
  `{"code", "data", "message"}`. Ids arrive as strings or integers.
- Few messages: one `Message/SendSmsMessage` each, several in flight (the rate limit was taken by
  the caller for the whole batch).
- Many messages with one text (or one template): the campaign flow. `Campaign/Create` (type 2, or 3
  with `{placeholders}`), `Campaign/AddRecipients` at most 500 per call (per-recipient codes;
  overall 0 / 98 / 99), then `Campaign/Send`. Nothing is sent before `Campaign/Send`, so any doubt
  while adding recipients abandons the campaign and retries its messages safely.
- Code 13 (wrong regional host) names the right host in `data`: followed once per call, and
  remembered for the life of the adapter.
- Mobizon has no test mode: requests with `test: true` are validated and answered `accepted`
  (provider_status `test`) without any API call.
- Mobizon has no client message id, so an ambiguous send is looked up with `Message/List`
  (recipient + exact text since shortly before the attempt): none found means not sent, one found
  means sent, more than one means nobody can tell (`failed`, never a blind resend).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.config import Account
from gateway.providers.base import Action as A
from gateway.providers.base import CodeRule, ItemResult, LookupFailed, Outbound, ProviderError, Verdict
from gateway.providers.http import decode_json, make_client, traced_post, transport_failure
from gateway.telemetry import get_logger

log = get_logger("gateway.providers.mobizon")

NAME = "mobizon"
MAX_RECIPIENTS_PER_ADD = 500
CAMPAIGN_MIN = 20  # fewer same-text messages than this go out as single sends
LOOKUP_CONCURRENCY = 8
# Mobizon's server time zone is not documented; a lookup window this much wider than our own
# clock covers any offset.
LOOKUP_MARGIN = timedelta(hours=15)

# Request-level codes (shared/providers/mobizon.md B11). The user's rule: 3, 10, 30 are retryable.
CODES: dict[int, CodeRule] = {
    1: CodeRule("ValidationError", "validation error", A.PERMANENT),
    2: CodeRule("NotFound", "record not found", A.PERMANENT),
    3: CodeRule("ApplicationError", "unidentified application error", A.AMBIGUOUS),
    4: CodeRule("BadModule", "wrong module", A.PERMANENT),
    5: CodeRule("BadMethod", "wrong method", A.PERMANENT),
    6: CodeRule("BadFormat", "wrong output format", A.PERMANENT),
    8: CodeRule("LoginFailed", "login failed (bad API key)", A.ACCOUNT),
    9: CodeRule("NoAccess", "no access to the method", A.PERMANENT),
    10: CodeRule("ConcurrentWrite", "concurrent-write error, record locked", A.RETRYABLE),
    11: CodeRule("MissingParams", "required parameters missing", A.PERMANENT),
    12: CodeRule("LimitBroken", "a parameter breaks a limit", A.SPLIT),
    13: CodeRule("WrongHost", "wrong regional API host", A.REDIRECT),
    14: CodeRule("AccountBlocked", "account blocked or deleted", A.ACCOUNT),
    15: CodeRule("OperationError", "operation error", A.PERMANENT),
    30: CodeRule("RateLimited", "too many calls to this method", A.THROTTLE),
    98: CodeRule("PartialSuccess", "some items processed", A.RETRYABLE),
    99: CodeRule("NothingProcessed", "no item processed", A.RETRYABLE),
    999: CodeRule("ServiceError", "general service error", A.AMBIGUOUS),
}
# Per-recipient codes of Campaign/AddRecipients (B6): only 51 and 99 are worth another try.
RECIPIENT_CODES: dict[int, CodeRule] = {
    1: CodeRule("EmptyNumber", "empty number", A.PERMANENT),
    2: CodeRule("NumberNotFound", "number not found in the data", A.PERMANENT),
    3: CodeRule("NotInternational", "number not in international format", A.PERMANENT),
    4: CodeRule("DuplicateInCampaign", "number already in this campaign", A.RETRYABLE),
    5: CodeRule("StopList", "number is on the stop list", A.PERMANENT),
    6: CodeRule("CountryBlocked", "country blocked by account settings", A.PERMANENT),
    7: CodeRule("UnknownOperator", "unknown operator or country", A.PERMANENT),
    8: CodeRule("OperatorNotSupported", "operator not supported", A.PERMANENT),
    20: CodeRule("MissingPlaceholders", "placeholder values missing", A.PERMANENT),
    30: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    31: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    32: CodeRule("ContactCard", "contact card problem", A.PERMANENT),
    51: CodeRule("ShortLinkUnavailable", "short link temporarily unavailable", A.RETRYABLE),
    99: CodeRule("SystemError", "system error", A.RETRYABLE),
}
UNKNOWN = CodeRule("Unknown", "code not in the Mobizon table", A.PERMANENT)
SUCCESS = {0, 100}  # 100: accepted as a background task


def _code(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def classify(code: Any, message: str | None = None, *, table: dict[int, CodeRule] = CODES) -> ItemResult:
    number = _code(code)
    rule = table.get(number, UNKNOWN) if number is not None else UNKNOWN
    return ItemResult.from_rule(str(code), rule, message or None)


def digits(phone: str) -> str:
    return phone.lstrip("+")


def _id(value: Any) -> str | None:
    """Ids come as strings or integers."""
    if value is None or isinstance(value, bool):
        return None
    return str(value)


def flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """PHP bracket notation: {"data": {"text": "x"}} -> data[text]=x; lists -> name[0]=..."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}[{k}]" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            flatten(f"{prefix}[{i}]", v, out)
    elif value is not None:
        out.append((prefix, "1" if value is True else "0" if value is False else str(value)))
    return out


def redirect_host(data: Any) -> str | None:
    """Code 13's `data` names the right host: a string, or an object holding one (shape unknown)."""
    if isinstance(data, str) and data.strip():
        return data.strip()
    if isinstance(data, dict):
        for key in ("domain", "host", "server", "apiServer", "url"):
            if isinstance(data.get(key), str) and data[key].strip():
                return str(data[key]).strip()
        for value in data.values():
            if isinstance(value, str) and "." in value:
                return value.strip()
    return None


class MobizonAdapter:
    name = NAME
    max_batch = 10_000

    def __init__(self, account: Account, client: httpx.AsyncClient | None = None) -> None:
        assert account.api_key is not None
        self._account = account
        self._base = account.base_url
        self._client = client or make_client(account.base_url, account.http_timeout_s, account.concurrency)
        self._query = {"output": "json", "api": "v1", "apiKey": account.api_key.get_secret_value()}
        self._gate = asyncio.Semaphore(account.concurrency)

    def __repr__(self) -> str:
        return f"MobizonAdapter(account={self._account.name!r})"

    def batch_key(self, item: Outbound) -> Hashable:
        return (item.sender, item.flash, item.test, item.send_at)

    # -- one API call, with the code-13 redirect ---------------------------------------------------

    async def call(self, method: str, params: dict[str, Any]) -> tuple[Any, ItemResult | None]:
        """(`{code, data, message}` document, None) or (None, the failure for every item of the call).
        Raises httpx.HTTPError for transport failures."""
        for redirected in (False, True):
            response = await traced_post(
                self._client,
                f"{self._base}/service/{method}",
                account=self._account.name,
                provider=NAME,
                form=flatten("", params, []),
                params=self._query,
            )
            doc, failure = decode_json(response)
            if failure is not None:
                return None, failure
            if not isinstance(doc, dict) or "code" not in doc:
                error = ProviderError("bad_response", "BadResponse", "answer has no code", retryable=True)
                return None, ItemResult(Verdict.AMBIGUOUS, error=error)
            if _code(doc["code"]) == 13 and not redirected:
                host = redirect_host(doc.get("data"))
                if host is not None:
                    self._follow(host)
                    continue
            return doc, None
        return doc, None

    def _follow(self, host: str) -> None:
        scheme = urlsplit(self._base).scheme or "https"
        target = host if "://" in host else f"{scheme}://{host}"
        log.warning("mobizon_host_moved", account=self._account.name, host=urlsplit(target).netloc)
        self._base = target.rstrip("/")

    @staticmethod
    def _failure(doc: dict[str, Any], table: dict[int, CodeRule] = CODES) -> ItemResult:
        code = doc.get("code")
        result = classify(code, str(doc.get("message") or ""), table=table)
        if _code(code) not in table:
            log.warning("mobizon_unknown_code", code=str(code)[:20], body=str(doc)[:500])
        return result

    # -- sending ----------------------------------------------------------------------------------

    async def send(self, batch: Sequence[Outbound]) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(batch)
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, item in enumerate(batch):
            if item.test:  # Mobizon has no test mode: a dry run must never reach the API
                results[i] = ItemResult(Verdict.ACCEPTED, provider_status="test")
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
                jobs.append(self._campaign(batch, unique, text, templated, results))
            else:
                singles += unique
        jobs += [self._single(batch, i, results) for i in singles]
        await asyncio.gather(*jobs)
        return [r if r is not None else ItemResult(Verdict.AMBIGUOUS, error=_missing()) for r in results]

    def _options(self, item: Outbound) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if item.send_at is not None:
            params["deferredToTs"] = item.send_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        if item.flash:
            params["mclass"] = 0
        return params

    async def _single(self, batch: Sequence[Outbound], i: int, results: list[ItemResult | None]) -> None:
        item = batch[i]
        form: dict[str, Any] = {"recipient": digits(item.phone), "text": item.text}
        if item.sender:
            form["from"] = item.sender
        if params := self._options(item):
            form["params"] = params
        async with self._gate:
            try:
                doc, failure = await self.call("Message/SendSmsMessage", form)
            except httpx.HTTPError as exc:
                results[i] = transport_failure(exc)
                return
        if failure is not None:
            results[i] = failure
        elif _code(doc["code"]) in SUCCESS and isinstance(doc.get("data"), dict):
            results[i] = ItemResult(
                Verdict.ACCEPTED,
                provider_message_id=_id(doc["data"].get("messageId")),
                provider_status=str(doc["data"].get("status")),
            )
        else:
            results[i] = self._failure(doc)

    async def _campaign(
        self, batch: Sequence[Outbound], idx: list[int], text: str, templated: bool, results: list[ItemResult | None]
    ) -> None:
        first = batch[idx[0]]
        data: dict[str, Any] = {"type": 3 if templated else 2, "text": text, **self._options(first)}
        if first.sender:
            data["from"] = first.sender
        async with self._gate:
            try:
                doc, failure = await self.call("Campaign/Create", {"data": data})
            except httpx.HTTPError as exc:
                failure = _unsent(exc)  # creating a campaign sends nothing
        if failure is None and _code(doc["code"]) not in SUCCESS:
            failure = self._failure(doc)
        campaign = _id(doc.get("data")) if failure is None else None
        if failure is not None or campaign is None:
            _fill(results, idx, _not_sent(failure))
            return
        added: dict[int, str | None] = {}
        for start in range(0, len(idx), MAX_RECIPIENTS_PER_ADD):
            chunk = idx[start : start + MAX_RECIPIENTS_PER_ADD]
            ok = await self._add(batch, campaign, chunk, templated, results, added)
            if not ok:  # unsure what was added: never send this campaign, retry everything in it
                error = ProviderError("campaign_abandoned", "CampaignAbandoned", "adding recipients failed", True)
                _fill(results, idx, ItemResult(Verdict.RETRY, error=error), overwrite=True)
                return
        if not added:
            return
        async with self._gate:
            try:
                doc, failure = await self.call("Campaign/Send", {"id": campaign})
            except httpx.HTTPError as exc:
                failure = transport_failure(exc)
        if failure is None and _code(doc["code"]) not in SUCCESS:
            failure = self._failure(doc)
        if failure is not None:
            _fill(results, list(added), failure)
            return
        for i, message_id in added.items():
            results[i] = ItemResult(Verdict.ACCEPTED, provider_message_id=message_id, provider_status=str(doc["data"]))
        log.info("mobizon_campaign_sent", account=self._account.name, campaign=campaign, recipients=len(added))

    async def _add(
        self,
        batch: Sequence[Outbound],
        campaign: str,
        chunk: list[int],
        templated: bool,
        results: list[ItemResult | None],
        added: dict[int, str | None],
    ) -> bool:
        """Add one chunk; False when it is unknown what was added (the campaign must not be sent)."""
        if templated:
            recipients: list[Any] = [{"recipient": digits(batch[i].phone), **dict(batch[i].vars)} for i in chunk]
            form: dict[str, Any] = {"id": campaign, "recipients": recipients, "params": {"placeholdersFlag": 3}}
        else:
            form = {"id": campaign, "recipients": [digits(batch[i].phone) for i in chunk]}
        async with self._gate:
            try:
                doc, failure = await self.call("Campaign/AddRecipients", form)
            except httpx.HTTPError:
                return False
        if failure is not None:
            return False
        code = _code(doc["code"])
        if code not in (0, 98, 99):
            _fill(results, chunk, _not_sent(self._failure(doc)))
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
            row_code = _code(row.get("code"))
            if row_code == 0:
                added[i] = _id(row.get("messageId"))
            else:
                results[i] = classify(row.get("code"), table=RECIPIENT_CODES)
        return True

    # -- reconciling ------------------------------------------------------------------------------

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(item: Outbound) -> ItemResult | None:
            since = datetime.fromtimestamp(item.attempted_at or time.time(), UTC) - LOOKUP_MARGIN
            form = {
                "criteria": {
                    "to": digits(item.phone),
                    "text": item.text,
                    "campaignCreateTsFrom": since.strftime("%Y-%m-%d %H:%M:%S"),
                },
                "pagination": {"pageSize": 25, "currentPage": 0},
            }
            async with gate:
                try:
                    doc, failure = await self.call("Message/List", form)
                except httpx.HTTPError as exc:
                    raise LookupFailed(f"Message/List: {type(exc).__name__}") from exc
            if failure is not None or _code(doc["code"]) != 0 or not isinstance(doc.get("data"), dict):
                raise LookupFailed(f"Message/List answered {str(doc)[:200] if doc else failure}")
            items = [
                x
                for x in doc["data"].get("items") or []
                if isinstance(x, dict)
                and digits(str(x.get("to", ""))) == digits(item.phone)
                and x.get("text") == item.text
            ]
            if not items:
                return None
            if len(items) > 1:
                error = ProviderError(
                    "unreconciled",
                    "Unreconciled",
                    f"{len(items)} messages with this recipient and text; cannot tell whether this one was sent",
                    retryable=False,
                )
                return ItemResult(Verdict.UNDECIDED, error=error)
            return ItemResult(Verdict.ACCEPTED, provider_message_id=_id(items[0].get("id")))

        return list(await asyncio.gather(*(one(o) for o in batch)))

    async def close(self) -> None:
        await self._client.aclose()


def _missing() -> ProviderError:
    return ProviderError("missing_item", "MissingItem", "no result for this message", retryable=True)


def _unsent(exc: Exception) -> ItemResult:
    result = transport_failure(exc)
    return ItemResult(Verdict.RETRY, error=result.error)


def _not_sent(result: ItemResult | None) -> ItemResult:
    """A failure before `Campaign/Send`: nothing went out, so an ambiguous verdict is a plain retry."""
    assert result is not None
    if result.verdict is Verdict.AMBIGUOUS:
        return ItemResult(Verdict.RETRY, error=result.error)
    return result


def _fill(results: list[ItemResult | None], idx: list[int], value: ItemResult, *, overwrite: bool = False) -> None:
    for i in idx:
        if overwrite or results[i] is None:
            results[i] = value


__all__ = ["CODES", "NAME", "RECIPIENT_CODES", "MobizonAdapter", "classify", "flatten", "redirect_host"]
