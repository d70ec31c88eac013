"""Mobizon: both code tables row by row, form encoding, the code-13 host, and the campaign logic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from pydantic import SecretStr

from gateway.config import Account
from gateway.providers.base import Outbound, Verdict
from gateway.providers.mobizon import (
    CODES,
    RECIPIENT_CODES,
    RECIPIENT_TABLE,
    MobizonAdapter,
    classify,
    flatten,
    redirect_host,
)

# The rule, written independently of the table: (verdict, pauses the account, slows the account).
EXPECTED = {
    1: (Verdict.REJECTED, False, False),
    2: (Verdict.REJECTED, False, False),
    3: (Verdict.AMBIGUOUS, False, False),  # user rule: retryable; it may have been done: reconcile first
    4: (Verdict.REJECTED, False, False),
    5: (Verdict.REJECTED, False, False),
    6: (Verdict.REJECTED, False, False),
    8: (Verdict.REJECTED, True, False),
    9: (Verdict.REJECTED, False, False),
    10: (Verdict.RETRY, False, False),
    11: (Verdict.REJECTED, False, False),
    12: (Verdict.RETRY, False, False),  # split and resend
    13: (Verdict.RETRY, False, False),  # only when following the host once did not help
    14: (Verdict.REJECTED, True, False),
    15: (Verdict.REJECTED, False, False),
    30: (Verdict.RETRY, False, True),
    98: (Verdict.RETRY, False, False),
    99: (Verdict.RETRY, False, False),
    999: (Verdict.AMBIGUOUS, False, False),
}
RECIPIENT_RETRYABLE = {4, 51, 99}


def test_request_table_is_exactly_the_documented_codes() -> None:
    assert set(CODES) == set(EXPECTED)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_request_code_is_classified(code: int) -> None:
    result = classify(code)
    verdict, pauses, slows = EXPECTED[code]
    assert result.verdict is verdict
    assert result.error is not None
    assert result.error.code == str(code)
    assert result.error.pause_account is pauses
    assert result.error.throttle is slows


@pytest.mark.parametrize("code", sorted(RECIPIENT_CODES))
def test_every_recipient_code_is_classified(code: int) -> None:
    result = classify(code, table=RECIPIENT_TABLE)
    assert result.verdict is (Verdict.RETRY if code in RECIPIENT_RETRYABLE else Verdict.REJECTED)


def test_unknown_code_is_permanent() -> None:
    assert classify(4242).verdict is Verdict.REJECTED
    assert classify("not-a-number").verdict is Verdict.REJECTED


def test_bracket_notation() -> None:
    form = flatten("", {"id": 7, "recipients": [{"recipient": "7701", "name": "Ann"}], "params": {"x": True}}, [])
    assert form == [
        ("id", "7"),
        ("recipients[0][recipient]", "7701"),
        ("recipients[0][name]", "Ann"),
        ("params[x]", "1"),
    ]


@pytest.mark.parametrize(
    ("data", "host"),
    [
        ("api.mobizon.kz", "api.mobizon.kz"),
        ({"domain": "api.mobizon.uz"}, "api.mobizon.uz"),
        ({"x": "a.b"}, "a.b"),
        (None, None),
    ],
)
def test_code_13_host_from_a_string_or_an_object(data: Any, host: str | None) -> None:
    assert redirect_host(data) == host


def account() -> Account:
    return Account(name="kz", provider="mobizon", base_url="https://api.mobizon.kz", api_key=SecretStr("kz-secret-key"))


def item(i: int, text: str = "same") -> Outbound:
    return Outbound(f"u{i}", f"r{i}", f"+7701{i:07d}", text, "Shop")


async def test_wire_format_and_host_redirect() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.mobizon.kz":
            return httpx.Response(200, json={"code": 13, "data": "api.mobizon.uz", "message": "wrong domain"})
        return httpx.Response(
            200, json={"code": 0, "data": {"campaignId": 5, "messageId": 77, "status": 2}, "message": ""}
        )

    adapter = MobizonAdapter(account(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    (first,) = await adapter.send([item(1, "one")])
    (second,) = await adapter.send([item(2, "two")])
    await adapter.close()
    assert (first.verdict, first.provider_message_id) == (Verdict.ACCEPTED, "77")  # integer ids accepted
    assert second.verdict is Verdict.ACCEPTED
    assert [r.url.host for r in seen] == ["api.mobizon.kz", "api.mobizon.uz", "api.mobizon.uz"]
    req = seen[-1]
    assert req.url.path == "/service/Message/SendSmsMessage"
    assert dict(req.url.params) == {"output": "json", "api": "v1", "apiKey": "kz-secret-key"}
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(req.content.decode())) == {"recipient": "77010000002", "text": "two", "from": "Shop"}
    assert "kz-secret-key" not in repr(adapter)


async def test_campaign_abandoned_when_adding_recipients_is_in_doubt() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 2)[-2] + "/" + request.url.path.rsplit("/", 1)[-1]
        calls.append(method)
        if method == "Campaign/Create":
            return httpx.Response(200, json={"code": 0, "data": "900", "message": ""})
        if method == "Campaign/AddRecipients" and calls.count(method) == 2:
            raise httpx.ReadTimeout("no answer", request=request)
        rows = [
            {"recipient": v, "code": 0, "messageId": "1"}
            for k, v in parse_qsl(request.content.decode())
            if k.startswith("recipients")
        ]
        return httpx.Response(200, json={"code": 0, "data": rows, "message": ""})

    adapter = MobizonAdapter(account(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    results = await adapter.send([item(i) for i in range(600)])
    await adapter.close()
    assert "Campaign/Send" not in calls
    assert {r.verdict for r in results} == {Verdict.RETRY}  # nothing was sent: safe to retry all


async def test_test_requests_never_reach_mobizon() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"code": 0, "data": {"messageId": "1"}, "message": ""})

    adapter = MobizonAdapter(account(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    dry = Outbound("t1", "r", "+77010000001", "hi", None, test=True)
    (result,) = await adapter.send([dry])
    await adapter.close()
    assert (result.verdict, result.provider_message_id) == (Verdict.ACCEPTED, None)
    assert calls == []


@pytest.mark.parametrize(("matches", "verdict"), [(0, None), (1, Verdict.ACCEPTED), (2, Verdict.UNDECIDED)])
async def test_lookup_decides_only_on_exactly_one_match(matches: int, verdict: Verdict | None) -> None:
    from gateway.core.decisions import Finish, decide
    from gateway.core.retry import RetryPolicy

    def handler(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        assert request.url.path == "/service/Message/List"
        assert form["criteria[to]"] == "77010000001"
        assert form["criteria[text]"] == "hi"
        items = [{"id": str(i), "to": "77010000001", "text": "hi"} for i in range(matches)]
        return httpx.Response(200, json={"code": 0, "data": {"items": items, "totalItemCount": str(matches)}})

    adapter = MobizonAdapter(account(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    (found,) = await adapter.lookup([Outbound("u", "r", "+77010000001", "hi", None, attempted_at=1.8e9)])
    await adapter.close()
    assert (found.verdict if found else None) is verdict
    if verdict is Verdict.UNDECIDED:
        assert found is not None
        decision = decide(found, 1, RetryPolicy([1], 5), "mobizon", datetime.now(UTC))
        assert isinstance(decision, Finish)
        assert decision.status == "failed"
        assert decision.result.error is not None
        assert decision.result.error.code == "unreconciled"
