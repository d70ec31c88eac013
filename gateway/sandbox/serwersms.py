"""SerwerSMS API v2 as the sandbox serves it (docs/providers.md).

Accepted like the real API: POST JSON, POST form (`phone[]=`, `phone[0]=`, `phone=`), GET query;
paths with or without `.json`; `Authorization: Bearer` or `username`/`password`. Answers are HTTP
200 with the success body or the `{"error": {...}}` envelope.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway import segments
from gateway.providers.serwersms import CODES
from gateway.sandbox.state import SandboxState, SendRecord

WARSAW = ZoneInfo("Europe/Warsaw")
UNIQUE_ID_RE = re.compile(r"^[a-zA-Z0-9]{3,50}$")
PHONE_RE = re.compile(r"^\+?[0-9]{9,15}$")
MAX_NUMBERS = 100_000
MAX_PERSONALIZED = 10_000


class ApiError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def envelope(code: int) -> dict[str, Any]:
    rule = CODES.get(code)
    return {
        "error": {
            "code": code,
            "type": rule.type if rule else "Error",
            "message": rule.meaning if rule else "",
        }
    }


def _now() -> str:
    return datetime.now(WARSAW).strftime("%Y-%m-%d %H:%M:%S")


async def read_params(request: web.Request) -> dict[str, Any]:
    """Flatten JSON, form or query parameters into one dict; `a[]`/`a[0]` become lists."""
    params: dict[str, Any] = {}
    if request.method == "POST" and request.content_type == "application/json":
        try:
            doc = await request.json()
        except json.JSONDecodeError:
            raise ApiError(1006) from None
        if not isinstance(doc, dict):
            raise ApiError(1006)
        params.update(doc)
    else:
        pairs = list(request.query.items())
        if request.method == "POST":
            pairs += [(k, v) for k, v in (await request.post()).items() if isinstance(v, str)]
        for key, value in pairs:
            m = re.match(r"^([A-Za-z_]+)\[(\d*)\]$", key)
            if m:
                params.setdefault(m.group(1), []).append(value)
            else:
                params[key] = value
    return params


def truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true")) or value == 1


def identity(request: web.Request, params: dict[str, Any]) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer ") and auth[7:].strip():
        return "token:" + auth[7:].strip()
    if params.get("username") and params.get("password"):
        return "user:" + str(params["username"])
    raise ApiError(1001)


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def parse_messages(value: Any) -> list[tuple[str, str]]:
    """send_personalized `messages`: a JSON array of {phone, text} or `phone:text]|[phone:text`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pairs = []
            for chunk in value.split("]|["):
                phone, sep, text = chunk.partition(":")
                if not sep:
                    raise ApiError(1006) from None
                pairs.append((phone, text))
            return pairs
    if not isinstance(value, list):
        raise ApiError(2000)
    out = []
    for m in value:
        if not isinstance(m, dict) or "phone" not in m or "text" not in m:
            raise ApiError(1006)
        out.append((str(m["phone"]), str(m["text"])))
    return out


class SerwerSmsApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        out = []
        for name, handler in (
            ("messages/send_sms", self.send_sms),
            ("messages/send_personalized", self.send_personalized),
            ("messages/reports", self.reports),
            ("messages/view", self.view),
        ):
            for suffix in ("", ".json"):
                out.append(web.route("*", f"/{name}{suffix}", self._wrap(handler)))
        out.append(web.route("*", "/error/{code}", self.error_lookup))
        return out

    def _wrap(self, handler: Any) -> Any:
        async def run(request: web.Request) -> web.StreamResponse:
            if request.method not in ("GET", "POST"):
                raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
            received = time.time()  # the ledger times a send by its arrival, as a provider would
            try:
                params = await read_params(request)
                who = identity(request, params)
                fault, swallow = await self.state.faults.before(who, request, envelope)
                if fault is not None:
                    return fault
                self.state.requests += 1
                self.state.count_call("serwersms:" + request.path.lower().strip("/").removesuffix(".json"), request)
                doc = handler(who, params, received)
            except ApiError as exc:
                self.state.count_answer("serwersms", exc.code)
                return web.json_response(envelope(exc.code))
            if swallow:
                await self.state.faults.swallow()
            return web.json_response(doc)

        return run

    async def error_lookup(self, request: web.Request) -> web.Response:
        try:
            code = int(request.match_info["code"])
        except ValueError:
            code = 2002
        return web.json_response(envelope(code if code in CODES else 2002))

    def _send(
        self, who: str, params: dict[str, Any], pairs: list[tuple[str, str]], limit: int, at: float
    ) -> dict[str, Any]:
        if not pairs:
            raise ApiError(3104)
        if len(pairs) > limit:
            raise ApiError(3110)
        if any(not text for _phone, text in pairs):
            raise ApiError(3101)
        uids = as_list(params.get("unique_id"))
        if uids:
            if any(not UNIQUE_ID_RE.match(u) for u in uids):
                raise ApiError(3200)
            if len(set(uids)) != len(uids):
                raise ApiError(3201)
            if len(uids) != len(pairs):
                raise ApiError(3202)
        test = truthy(params.get("test"))
        if self.state.duplicate_control and not test and any(self.state.holds(who, u) for u in uids):
            raise ApiError(3111)
        sender = str(params.get("sender") or "")
        utf = truthy(params.get("utf"))
        stat_id = str(secrets.randbelow(9_000_000) + 1_000_000)
        items = []
        for n, (phone, text) in enumerate(pairs):
            uid = uids[n] if uids else None
            item: dict[str, Any] = {
                "id": secrets.token_hex(5),
                "phone": phone,
                "queued": _now(),
                "text": text,
            }
            if not PHONE_RE.match(phone):
                item.update(status="unsent", error_code=2001, error_message="Invalid phone number")
            else:
                item.update(status="queued", parts=segments.count(text).parts)
                if not test:
                    self.state.record(SendRecord(who, uid, phone, text, sender, item["id"], stat_id, at, utf))
            items.append(item)
        queued = sum(1 for i in items if i["status"] == "queued")
        doc: dict[str, Any] = {"success": True, "queued": queued, "unsent": len(items) - queued}
        if truthy(params.get("details")):
            doc["items"] = items
        return doc

    def send_sms(self, who: str, params: dict[str, Any], at: float) -> dict[str, Any]:
        if "text" not in params:
            raise ApiError(2000)
        text = str(params["text"])
        return self._send(who, params, [(p, text) for p in as_list(params.get("phone"))], MAX_NUMBERS, at)

    def send_personalized(self, who: str, params: dict[str, Any], at: float) -> dict[str, Any]:
        if "messages" not in params:
            raise ApiError(2000)
        return self._send(who, params, parse_messages(params["messages"]), MAX_PERSONALIZED, at)

    def reports(self, who: str, params: dict[str, Any], _at: float = 0.0) -> dict[str, Any]:
        ids = set(as_list(params.get("id")))
        if len(ids) > 500:
            raise ApiError(3110)
        uids = set(as_list(params.get("unique_id")))
        phones = {p.lstrip("+") for p in as_list(params.get("phone"))}
        if ids:
            self.state.polls(ids)
        rows = [
            r
            for r in self.state.sends
            if r.who == who
            and (not ids or r.provider_id in ids)
            and (not uids or r.unique_id in uids)
            and (not phones or r.phone.lstrip("+") in phones)
        ]
        return {"paging": {"page": 1, "count": 1}, "items": [self.state.report_item(r) for r in rows]}

    def view(self, who: str, params: dict[str, Any], _at: float = 0.0) -> dict[str, Any]:
        doc = self.reports(who, {"id": params.get("id"), "unique_id": params.get("unique_id")})
        if not doc["items"]:
            raise ApiError(1004)
        item: dict[str, Any] = doc["items"][0]
        return item
