"""SerwerSMS.pl HTTPS API v2 (contract: shared/providers/serwersms.md).

- One text to many numbers: `messages/send_sms` with `phone` and `unique_id` arrays.
- Different texts: `messages/send_personalized` with `messages: [{phone, text}]`.
- Always `details=true`, so each number gets an item (`queued` with an id, or `unsent` with a code).
- Every message carries a deterministic provider-safe `unique_id`, so a resend after a crash is
  recognisable and `messages/reports?unique_id=` can tell whether an ambiguous send went out.
- Auth: `Authorization: Bearer <token>` or `username`/`password` in the JSON body.
- API errors come as HTTP 200 with `{"error": {"code", "type", "message"}}`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from gateway.config import Account
from gateway.providers.base import Action as A
from gateway.providers.base import CodeRule, ItemResult, LookupFailed, Outbound, Verdict
from gateway.providers.http import decode_json, make_client, traced_post, transport_failure
from gateway.telemetry import get_logger

log = get_logger("gateway.providers.serwersms")

NAME = "serwersms"
MAX_NUMBERS = 100_000  # per send_sms request
MAX_PERSONALIZED = 10_000  # per send_personalized request
LOOKUP_CONCURRENCY = 8
WARSAW = ZoneInfo("Europe/Warsaw")

# The full table, 1000-4602. The user's rule: 3xxx and 4xxx are permanent. Refinements from the
# contract: account-level codes pause the account; 3110 splits the request; 3111 (duplicate
# unique_id under the account's duplicate control) means the provider already has the message.
CODES: dict[int, CodeRule] = {
    1000: CodeRule("NoAction", "no action given", A.PERMANENT),
    1001: CodeRule("InvalidUser", "incorrect login, password or token", A.ACCOUNT),
    1002: CodeRule("NoApiAccess", "the user may not use the API", A.ACCOUNT),
    1003: CodeRule("InvalidIP", "IP address not authorized", A.ACCOUNT),
    1004: CodeRule("InvalidId", "invalid ID parameter", A.PERMANENT),
    1005: CodeRule("NoPermission", "no permission", A.ACCOUNT),
    1006: CodeRule("InvalidFormat", "invalid data format", A.PERMANENT),
    1007: CodeRule("AccountInactive", "account not fully active", A.ACCOUNT),
    1008: CodeRule("NoNumbersPermission", "no permission to view numbers", A.PERMANENT),
    2000: CodeRule("MissingParams", "required parameters missing", A.PERMANENT),
    2001: CodeRule("InvalidPhone", "invalid phone number", A.PERMANENT),
    2002: CodeRule("InvalidErrorCode", "invalid error code", A.PERMANENT),
    3000: CodeRule("LimitEco", "SMS ECO+ quota exhausted", A.ACCOUNT),
    3001: CodeRule("NoPermissionEco", "no permission for SMS ECO+", A.PERMANENT),
    3002: CodeRule("LimitFull", "SMS FULL quota exhausted", A.ACCOUNT),
    3003: CodeRule("NoPermissionFull", "no permission for SMS FULL", A.PERMANENT),
    3004: CodeRule("LimitMms", "MMS quota exhausted", A.ACCOUNT),
    3005: CodeRule("NoPermissionMms", "no permission for MMS", A.PERMANENT),
    3006: CodeRule("LimitVoice", "VOICE quota exhausted", A.ACCOUNT),
    3007: CodeRule("NoPermissionVoice", "no permission for VOICE", A.PERMANENT),
    3008: CodeRule("NoPermissionFlash", "no permission for flash SMS", A.PERMANENT),
    3009: CodeRule("NoPermissionSms", "no permission to send SMS", A.PERMANENT),
    3100: CodeRule("SendingBlocked", "sending is blocked on the account", A.ACCOUNT),
    3101: CodeRule("EmptyMessage", "message is empty", A.PERMANENT),
    3102: CodeRule("MessageTooLong", "message exceeds the allowed length", A.PERMANENT),
    3103: CodeRule("WrongRecipientCount", "wrong number of recipients", A.PERMANENT),
    3104: CodeRule("NoNumbers", "no phone numbers given", A.PERMANENT),
    3105: CodeRule("InvalidMessage", "invalid message", A.PERMANENT),
    3106: CodeRule("SenderNotAllowed", "sender name may not be used", A.PERMANENT),
    3107: CodeRule("NoPersonalized", "no permission for personalized messages", A.PERMANENT),
    3108: CodeRule("InvalidDate", "invalid send time", A.PERMANENT),
    3109: CodeRule("InvalidFile", "invalid file", A.PERMANENT),
    3110: CodeRule("TooManyMessages", "too many messages in one request", A.SPLIT),
    3111: CodeRule("UniquenessError", "unique_id already used", A.ALREADY_ACCEPTED),
    3200: CodeRule("InvalidUniqueId", "invalid characters in unique_id", A.PERMANENT),
    3201: CodeRule("UniqueIdNotUnique", "unique_id repeated within the request", A.PERMANENT),
    3202: CodeRule("UniqueIdCount", "unique_id count does not match the messages", A.PERMANENT),
    3330: CodeRule("NoMessages", "no messages", A.PERMANENT),
    3331: CodeRule("NoMessages", "no messages", A.PERMANENT),
    4000: CodeRule("FileTooLarge", "file too large", A.PERMANENT),
    4001: CodeRule("FileMissing", "file does not exist", A.PERMANENT),
    4002: CodeRule("InvalidFile", "invalid file", A.PERMANENT),
    # HLR codes: the contract calls 4100/4105 transient for HLR lookups; the user's rule (4xxx is
    # permanent) wins for sends, which never use HLR.
    4100: CodeRule("HlrConnection", "HLR connection error", A.PERMANENT),
    4101: CodeRule("HlrInvalidNumber", "HLR: invalid number", A.PERMANENT),
    4102: CodeRule("HlrNoPermission", "no permission for HLR", A.PERMANENT),
    4103: CodeRule("HlrLimit", "HLR query quota exhausted", A.PERMANENT),
    4104: CodeRule("HlrLockout", "HLR: account lockout", A.PERMANENT),
    4105: CodeRule("HlrWaiting", "HLR: waiting for reply", A.PERMANENT),
    4106: CodeRule("HlrInvalidId", "HLR: invalid ID", A.PERMANENT),
    4200: CodeRule("PremiumSend", "premium SMS sending error", A.PERMANENT),
    4201: CodeRule("PremiumData", "premium SMS: incorrect data", A.PERMANENT),
    **{
        code: CodeRule("AccountData", meaning, A.PERMANENT)
        for code, meaning in {
            4300: "no login",
            4301: "no password",
            4302: "no phone number",
            4303: "no e-mail",
            4304: "no name",
            4305: "no surname",
            4306: "no company name",
            4307: "wrong number",
            4308: "incorrect e-mail address",
            4309: "login too short",
            4310: "incorrect login",
            4311: "incorrect company",
            4312: "login exists",
            4313: "registration error",
            4320: "current password not given",
            4321: "current password incorrect",
            4322: "new password not given",
            4323: "new passwords differ",
            4324: "login not given",
            4325: "invalid login",
        }.items()
    },
    4400: CodeRule("SenderExists", "sender name already exists", A.PERMANENT),
    4401: CodeRule("SenderNumber", "a number cannot be a sender name", A.PERMANENT),
    4402: CodeRule("SenderInvalid", "incorrect sender name", A.PERMANENT),
    4403: CodeRule("SenderBadNumber", "incorrect number", A.PERMANENT),
    4404: CodeRule("SenderBadCode", "incorrect code or number", A.PERMANENT),
    4405: CodeRule("SenderActive", "number already active", A.PERMANENT),
    4500: CodeRule("SubaccountDepartment", "no permission for department users", A.PERMANENT),
    4501: CodeRule("SubaccountNested", "a subaccount cannot create subaccounts", A.PERMANENT),
    4502: CodeRule("SubaccountLoginBusy", "login taken", A.PERMANENT),
    4503: CodeRule("SubaccountTemplates", "no template permissions", A.PERMANENT),
    4504: CodeRule("SubaccountLogin", "incorrect login or password", A.PERMANENT),
    4600: CodeRule("BlacklistNoOp", "no blacklist operation", A.PERMANENT),
    4601: CodeRule("BlacklistExists", "number already on the list", A.PERMANENT),
    4602: CodeRule("BlacklistMissing", "number not found", A.PERMANENT),
}
UNKNOWN = CodeRule("Unknown", "code not in the SerwerSMS table", A.PERMANENT)
# Report statuses meaning the provider holds the message (sent or on its way).
_HELD = {"queued", "saved", "in_progress", "sent", "delivered", "undelivered"}


def classify(code: Any, message: str | None = None) -> ItemResult:
    try:
        number = int(code)
    except (TypeError, ValueError):
        number = -1
    rule = CODES.get(number, UNKNOWN)
    return ItemResult.from_rule(str(code), rule, message)


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
            provider_status=status,
        )
    if status == "unsent":
        result = classify(item.get("error_code", item.get("reason")), item.get("error_message"))
        return ItemResult(result.verdict, error=result.error, provider_status=status)
    return ItemResult(Verdict.AMBIGUOUS, error=classify("bad_item").error, provider_status=status or None)


def parse_send(batch: Sequence[Outbound], doc: Any) -> list[ItemResult]:
    """Per-item results of a send answer; items map back by unique_id, else by order, else by phone."""
    if not isinstance(doc, dict):
        return [ItemResult(Verdict.AMBIGUOUS, error=classify("bad_response").error)] * len(batch)
    if isinstance(doc.get("error"), dict):
        err = doc["error"]
        result = classify(err.get("code"), err.get("message"))
        if result.error is not None and result.error.type == UNKNOWN.type:
            log.warning("serwersms_unknown_code", code=str(err.get("code"))[:20], body=str(doc)[:500])
        return [result] * len(batch)
    items = doc.get("items")
    if not isinstance(items, list):
        if doc.get("success") is True and doc.get("queued") == len(batch) and not doc.get("unsent"):
            return [ItemResult(Verdict.ACCEPTED)] * len(batch)
        return [ItemResult(Verdict.AMBIGUOUS, error=classify("bad_response").error)] * len(batch)
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
        return ItemResult(Verdict.AMBIGUOUS, error=classify("missing_item").error)
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


class SerwerSmsAdapter:
    name = NAME
    max_batch = MAX_PERSONALIZED

    def __init__(self, account: Account, client: httpx.AsyncClient | None = None) -> None:
        self._account = account
        self._client = client or make_client(account.base_url, account.http_timeout_s, account.concurrency)
        self._headers: dict[str, str] = {}
        self._auth_body: dict[str, str] = {}
        if account.token is not None:
            self._headers["Authorization"] = f"Bearer {account.token.get_secret_value()}"
        elif account.username and account.password is not None:
            self._auth_body = {"username": account.username, "password": account.password.get_secret_value()}

    def __repr__(self) -> str:
        return f"SerwerSmsAdapter(account={self._account.name!r})"

    def batch_key(self, item: Outbound) -> Hashable:
        return (item.sender, item.flash, item.test, item.send_at)

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
        results = parse_send(batch, doc)
        if len(batch) > 1 and results[0].error is not None and results[0].error.code == "3110":
            half = len(batch) // 2
            first, second = await asyncio.gather(self.send(batch[:half]), self.send(batch[half:]))
            return first + second
        return results

    async def lookup(self, batch: Sequence[Outbound]) -> list[ItemResult | None]:
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(item: Outbound) -> ItemResult | None:
            async with gate:
                try:
                    response = await self._post("messages/reports.json", {"unique_id": item.provider_ref})
                except httpx.HTTPError as exc:
                    raise LookupFailed(f"messages/reports: {type(exc).__name__}") from exc
            doc, failure = decode_json(response)
            if failure is not None:
                raise LookupFailed(f"messages/reports: {failure.error.message if failure.error else ''}")
            return parse_report(doc)

        return list(await asyncio.gather(*(one(o) for o in batch)))

    async def close(self) -> None:
        await self._client.aclose()


__all__ = ["CODES", "NAME", "SerwerSmsAdapter", "build_send", "classify", "parse_send"]
