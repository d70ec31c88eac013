"""Mobizon API v1 as the sandbox serves it (docs/providers.md).

`/service/{module}/{method}` (case-insensitive); `apiKey`, `output`, `api` in the query (the key is
also accepted in the body); parameters as a form body in PHP bracket notation, as a query string,
or as a JSON body (unofficial clients send JSON). Every answer is HTTP 200 with
`{"code", "data", "message"}`, ids as strings, the send `status` as an integer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.sandbox.dlr import HOLD
from gateway.sandbox.state import SandboxState, SendRecord

ALMATY = ZoneInfo("Asia/Almaty")  # the sandbox plays a .kz server: its timestamps are local time
MAX_ADD = 500
MAX_STATUS_IDS = 100
NUMBER_RE = re.compile(r"^[0-9]{9,15}$")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z0-9_-]+)\}")
MESSAGES = {
    1: "One or more fields contain invalid data",
    2: "Record not found",
    4: "Module not found",
    5: "Method not found",
    8: "Authorization failed: check your API key",
    10: "Record is locked",
    11: "Required parameters missing",
    12: "Parameter exceeds its limit",
    13: "Wrong API domain for this account",
    30: "Too many requests to this method",
    98: "Some items were not processed",
    99: "No item was processed",
}


class MobizonError(Exception):
    def __init__(self, code: int, data: Any = None) -> None:
        super().__init__(code)
        self.code = code
        self.data = data


def envelope(code: int, data: Any = None) -> dict[str, Any]:
    return {"code": code, "data": data, "message": MESSAGES.get(code, "")}


def local_ts(at: float) -> str:
    return datetime.fromtimestamp(at, ALMATY).strftime("%Y-%m-%d %H:%M:%S")


def nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`a[b][0]=x` pairs into nested dicts; dicts keyed 0..n-1 become lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "[]":
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break
    result: dict[str, Any] = _lists(root)
    return result


def fill(template: str, values: dict[str, str]) -> str:
    return PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


async def read_params(request: web.Request) -> dict[str, Any]:
    pairs = list(request.query.items())
    if request.method == "POST":
        if request.content_type == "application/json":
            try:
                doc = await request.json()
            except json.JSONDecodeError:
                raise MobizonError(1) from None
            params = nest(pairs)
            if isinstance(doc, dict):
                params.update(doc)
            return params
        pairs += [(k, v) for k, v in (await request.post()).items() if isinstance(v, str)]
    return nest(pairs)


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [x for x in re.split(r"[,\n]", str(value)) if x.strip()]


@dataclass
class Campaign:
    id: str
    who: str
    type: int
    text: str
    sender: str
    status: str = "NEW"
    recipients: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)  # number -> (id, vars)


@dataclass
class Message:
    id: str
    campaign: str
    who: str
    to: str
    text: str
    sender: str
    at: float


class MobizonApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self._ids = count(41_000_000)
        self._campaigns: dict[str, Campaign] = {}
        self.messages: dict[str, Message] = {}
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._handlers = {
            ("message", "sendsmsmessage"): self.send_sms_message,
            ("message", "getsmsstatus"): self.get_sms_status,
            ("message", "list"): self.list_messages,
            ("campaign", "create"): self.campaign_create,
            ("campaign", "addrecipients"): self.campaign_add,
            ("campaign", "send"): self.campaign_send,
            ("taskqueue", "getstatus"): self.task_status,
            ("user", "getownbalance"): self.balance,
        }

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/service/{module}/{method}", self.dispatch)]

    def reset(self) -> None:
        self._campaigns.clear()
        self.messages.clear()
        self._buckets.clear()

    def _new_id(self) -> str:
        return str(next(self._ids))

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "POST"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        received = time.time()
        module, method = request.match_info["module"].lower(), request.match_info["method"].lower()
        try:
            params = await read_params(request)
            who = self._authorize(request, params)
            fault, swallow = await self.state.faults.before(who, request, envelope)
            if fault is not None:
                return fault
            self._throttle(who, method)
            handler = self._handler(module, method)
            self.state.requests += 1
            self.state.count_call(f"mobizon:{module}/{method}", request)
            held: list[asyncio.Event] = []
            HOLD.set(held)
            data = handler(who, params, received)
            if held:  # early delivery reports: answer the send only after its webhooks were answered
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in held)), timeout=10)
        except MobizonError as exc:
            self.state.count_answer("mobizon", exc.code)
            return web.json_response(envelope(exc.code, exc.data))
        if swallow:
            await self.state.faults.swallow()
        code = 0
        if isinstance(data, tuple):
            code, data = data
        return web.json_response({"code": code, "data": data, "message": MESSAGES.get(code, "")})

    def _authorize(self, request: web.Request, params: dict[str, Any]) -> str:
        key = str(params.get("apiKey") or "")
        if not key:
            raise MobizonError(8)
        home = self.state.mobizon_home.get(key)
        if home is not None and request.host != home:
            raise MobizonError(13, home)
        return "key:" + key

    def _handler(self, module: str, method: str) -> Any:
        handler = self._handlers.get((module, method))
        if handler is None:
            raise MobizonError(4 if module not in {m for m, _ in self._handlers} else 5)
        return handler

    def _throttle(self, who: str, method: str) -> None:
        rate = self.state.mobizon_rate_per_s
        if not rate:
            return
        now = time.monotonic()
        tokens, ts = self._buckets.get((who, method), (rate, now))
        tokens = min(rate, tokens + (now - ts) * rate)
        if tokens < 1:
            self._buckets[(who, method)] = (tokens, now)
            raise MobizonError(30)
        self._buckets[(who, method)] = (tokens - 1, now)

    # -- messages ---------------------------------------------------------------------------------

    def _record(self, who: str, campaign: str, to: str, text: str, sender: str, at: float) -> Message:
        msg = Message(self._new_id(), campaign, who, to, text, sender, at)
        self.messages[msg.id] = msg
        self.state.record(SendRecord(who, None, to, text, sender, msg.id, campaign, at))
        return msg

    def send_sms_message(self, who: str, params: dict[str, Any], at: float) -> dict[str, Any]:
        recipient = str(params.get("recipient") or "").lstrip("+").strip()
        text = params.get("text")
        errors = {}
        if not NUMBER_RE.match(recipient):
            errors["recipient"] = "Invalid recipient number"
        if not isinstance(text, str) or not text:
            errors["text"] = "Text is required"
        if errors:
            raise MobizonError(1, errors)
        assert isinstance(text, str)
        campaign = self._new_id()
        msg = self._record(who, campaign, recipient, text, str(params.get("from") or ""), at)
        return {"campaignId": campaign, "messageId": msg.id, "status": 2}

    def _status(self, msg: Message) -> str:
        return self.state.mobizon_status(msg.id)

    def get_sms_status(self, who: str, params: dict[str, Any], _at: float) -> list[dict[str, Any]]:
        ids = [str(i).strip() for i in _list(params.get("ids"))]
        if not ids:
            raise MobizonError(2)
        if len(ids) > MAX_STATUS_IDS:
            raise MobizonError(12)
        self.state.polls(ids)
        out = []
        for i in ids:
            msg = self.messages.get(i)
            if msg is None or msg.who != who:
                continue  # unknown or foreign ids are left out
            out.append(
                {
                    "id": msg.id,
                    "status": self._status(msg),
                    "segNum": "1",
                    "startSendTs": local_ts(msg.at),
                    "statusUpdateTs": local_ts(time.time()),
                }
            )
        return out

    def list_messages(self, who: str, params: dict[str, Any], _at: float) -> dict[str, Any]:
        criteria = params.get("criteria") or {}
        if not isinstance(criteria, dict):
            raise MobizonError(1, {"criteria": "must be an object"})
        since = criteria.get("campaignCreateTsFrom")
        rows = [
            m
            for m in self.messages.values()
            if m.who == who
            and ("to" not in criteria or m.to == str(criteria["to"]).lstrip("+"))
            and ("text" not in criteria or m.text == criteria["text"])
            and (not since or local_ts(m.at) >= str(since))
        ]
        page = params.get("pagination") or {}
        size = int(page.get("pageSize", 25)) if isinstance(page, dict) else 25
        current = int(page.get("currentPage", 0)) if isinstance(page, dict) else 0
        chunk = rows[current * size : (current + 1) * size]
        items = [
            {
                "id": m.id,
                "campaignId": m.campaign,
                "segNum": "1",
                "from": m.sender,
                "to": m.to,
                "text": m.text,
                "status": self._status(m),
                "startSendTs": local_ts(m.at),
            }
            for m in chunk
        ]
        return {"items": items, "totalItemCount": str(len(rows))}

    # -- campaigns --------------------------------------------------------------------------------

    def campaign_create(self, who: str, params: dict[str, Any], _at: float) -> str:
        data = params.get("data") or {}
        if not isinstance(data, dict):
            raise MobizonError(1, {"data": "must be an object"})
        try:
            kind = int(data.get("type", 1))
        except (TypeError, ValueError):
            kind = 0
        if kind not in (1, 2, 3):
            raise MobizonError(1, {"type": "must be 1, 2 or 3"})
        if not isinstance(data.get("text"), str) or not data["text"]:
            raise MobizonError(1, {"text": "Text is required"})
        campaign = Campaign(self._new_id(), who, kind, data["text"], str(data.get("from") or ""))
        self._campaigns[campaign.id] = campaign
        return campaign.id

    def _campaign(self, who: str, params: dict[str, Any]) -> Campaign:
        campaign = self._campaigns.get(str(params.get("id", "")))
        if campaign is None or campaign.who != who:
            raise MobizonError(2)
        return campaign

    def campaign_add(self, who: str, params: dict[str, Any], _at: float) -> tuple[int, list[dict[str, Any]]]:
        campaign = self._campaign(who, params)
        if campaign.status != "NEW":
            raise MobizonError(10)
        recipients = _list(params.get("recipients"))
        if len(recipients) > MAX_ADD:
            raise MobizonError(12)
        options = params.get("params") if isinstance(params.get("params"), dict) else {}
        reject_missing = str((options or {}).get("placeholdersFlag", "1")) == "3"
        needed = set(PLACEHOLDER_RE.findall(campaign.text)) if campaign.type == 3 else set()
        rows = []
        for entry in recipients:
            values = {str(k): str(v) for k, v in entry.items()} if isinstance(entry, dict) else {}
            number = (values.pop("recipient", "") if isinstance(entry, dict) else str(entry)).strip().lstrip("+")
            row: dict[str, Any] = {"recipient": number, "number": number}
            if not number:
                row["code"] = 1
            elif not NUMBER_RE.match(number):
                row["code"] = 3
            elif number in campaign.recipients:
                row["code"] = 4
            elif reject_missing and not needed <= set(values):
                row["code"] = 20
            elif number in self.state.mobizon_recipient_codes:
                row["code"] = self.state.mobizon_recipient_codes.pop(number)
            else:
                message_id = self._new_id()
                campaign.recipients[number] = (message_id, values)
                row.update(code=0, messageId=message_id)
            rows.append(row)
        added = sum(1 for r in rows if r["code"] == 0)
        return (0 if added == len(rows) else 98 if added else 99), rows

    def campaign_send(self, who: str, params: dict[str, Any], at: float) -> int:
        campaign = self._campaign(who, params)
        if campaign.status != "NEW":
            raise MobizonError(10)
        campaign.status = "SENT"
        for number, (message_id, values) in campaign.recipients.items():
            text = fill(campaign.text, values)
            msg = Message(message_id, campaign.id, who, number, text, campaign.sender, at)
            self.messages[msg.id] = msg
            self.state.record(SendRecord(who, None, number, text, campaign.sender, msg.id, campaign.id, at))
        return 2

    def task_status(self, _who: str, params: dict[str, Any], _at: float) -> dict[str, Any]:
        if not params.get("id"):
            raise MobizonError(2)
        return {"progress": 100, "status": 2}

    def balance(self, _who: str, _params: dict[str, Any], _at: float) -> dict[str, Any]:
        return {"balance": "100.0000", "currency": "KZT"}
