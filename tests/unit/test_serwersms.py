"""SerwerSMS: the code table row by row, request building, answer parsing, the 3110 split."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.config import Account
from gateway.providers.base import Outbound, Verdict, provider_ref, send_split
from gateway.providers.serwersms import CODES, SerwerSmsAdapter, build_send, classify, parse_send

ACCOUNT_LEVEL = {1001, 1002, 1003, 1005, 1007, 3000, 3002, 3004, 3006, 3100}


def expected_verdict(code: int) -> tuple[Verdict, bool]:
    """The classification rule, stated independently of the table: (verdict, pauses the account)."""
    if code == 3110:
        return Verdict.RETRY, False  # split and resend
    if code == 3111:
        return Verdict.AMBIGUOUS, False  # already accepted: reconcile, never resend
    return Verdict.REJECTED, code in ACCOUNT_LEVEL


def test_table_covers_the_documented_range() -> None:
    assert min(CODES) == 1000
    assert max(CODES) == 4602
    assert {1000, 1008, 2000, 2002, 3000, 3009, 3100, 3111, 3200, 3202, 3330, 4000, 4106, 4325, 4405, 4504} <= set(
        CODES
    )


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_is_classified(code: int) -> None:
    result = classify(code)
    verdict, pauses = expected_verdict(code)
    assert result.verdict is verdict
    assert result.error is not None
    assert result.error.code == str(code)
    assert result.error.pause_account is pauses
    assert result.error.retryable is (verdict is not Verdict.REJECTED)


def test_unknown_code_is_permanent() -> None:
    result = classify(9999, "something new")
    assert result.verdict is Verdict.REJECTED
    assert result.error is not None
    assert result.error.message == "something new"


def item(uid: str, phone: str = "+48500600700", text: str = "hi") -> Outbound:
    return Outbound(uid, provider_ref("acme", uid), phone, text, "Acme")


def test_one_text_uses_send_sms_with_unique_ids() -> None:
    batch = [item("a", "+48500600701"), item("b", "+48500600702")]
    path, body = build_send(batch)
    assert path == "messages/send_sms.json"
    assert body["phone"] == ["+48500600701", "+48500600702"]
    assert body["unique_id"] == [provider_ref("acme", "a"), provider_ref("acme", "b")]
    assert body["details"] is True
    assert body["sender"] == "Acme"


def test_different_texts_use_send_personalized() -> None:
    path, body = build_send([item("a", text="one"), item("b", text="two")])
    assert path == "messages/send_personalized.json"
    assert body["messages"] == [{"phone": "+48500600700", "text": "one"}, {"phone": "+48500600700", "text": "two"}]


def test_provider_ref_is_deterministic_and_provider_safe() -> None:
    ref = provider_ref("acme", "order-1/ä")
    assert ref == provider_ref("acme", "order-1/ä")
    assert ref != provider_ref("other", "order-1/ä")
    assert ref.isalnum()
    assert ref.isascii()
    assert 3 <= len(ref) <= 50


def test_items_map_back_by_order_when_unique_id_is_not_echoed() -> None:
    batch = [item("a", "+48500600701"), item("b", "+48500600702")]
    doc = {
        "success": True,
        "queued": 1,
        "unsent": 1,
        "items": [
            {"id": "aaa1", "phone": "+48500600701", "status": "queued", "parts": 1},
            {"phone": "+48500600702", "status": "unsent", "error_code": 2001, "error_message": "Invalid"},
        ],
    }
    first, second = parse_send(batch, doc)
    assert (first.verdict, first.provider_message_id) == (Verdict.ACCEPTED, "aaa1")
    assert second.verdict is Verdict.REJECTED
    assert second.error is not None
    assert second.error.code == "2001"


def test_items_map_back_by_unique_id_when_echoed_in_any_order() -> None:
    batch = [item("a"), item("b")]
    doc = {
        "success": True,
        "items": [
            {"id": "bbb", "unique_id": provider_ref("acme", "b"), "status": "queued"},
            {"id": "aaa", "unique_id": provider_ref("acme", "a"), "status": "queued"},
        ],
    }
    assert [r.provider_message_id for r in parse_send(batch, doc)] == ["aaa", "bbb"]


def test_error_envelope_applies_to_every_item() -> None:
    results = parse_send([item("a"), item("b")], {"error": {"code": 1001, "type": "x", "message": "Nieprawidłowy"}})
    assert {r.verdict for r in results} == {Verdict.REJECTED}
    assert all(r.error is not None and r.error.pause_account for r in results)


def test_missing_item_is_ambiguous_never_accepted() -> None:
    batch = [item("a", "+48500600701"), item("b", "+48500600702"), item("c", "+48500600703")]
    doc = {"success": True, "items": [{"id": "x", "phone": "+48500600701", "status": "queued"}]}
    results = parse_send(batch, doc)
    assert [r.verdict for r in results] == [Verdict.ACCEPTED, Verdict.AMBIGUOUS, Verdict.AMBIGUOUS]


def account(**kw: Any) -> Account:
    return Account(name="acme", provider="serwersms", base_url="http://sandbox.invalid", **kw)


async def test_3110_splits_the_batch_until_it_fits() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        n = len(body["phone"])
        sizes.append(n)
        if n > 2:
            return httpx.Response(200, json={"error": {"code": 3110, "type": "x", "message": "too many"}})
        items = [{"id": f"id{p[-2:]}", "phone": p, "status": "queued"} for p in body["phone"]]
        return httpx.Response(200, json={"success": True, "queued": n, "unsent": 0, "items": items})

    client = httpx.AsyncClient(base_url="http://sandbox.invalid", transport=httpx.MockTransport(handler))
    adapter = SerwerSmsAdapter(account(token="t"), client)
    batch = [item(str(i), f"+485006007{i:02d}") for i in range(5)]
    results = await send_split(adapter.send, batch)
    await adapter.close()
    assert [r.verdict for r in results] == [Verdict.ACCEPTED] * 5
    assert [r.provider_message_id for r in results] == [f"id{i:02d}" for i in range(5)]
    assert sorted(sizes) == [1, 2, 2, 3, 5]  # 5 -> 2 + 3 -> 3 -> 1 + 2


async def test_credentials_go_in_the_header_or_body_never_the_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"success": True, "queued": 1, "unsent": 0})

    for acc in (account(token="secret-token"), account(username="u", password="secret-pass")):
        client = httpx.AsyncClient(base_url="http://sandbox.invalid", transport=httpx.MockTransport(handler))
        adapter = SerwerSmsAdapter(acc, client)
        await adapter.send([item("a")])
        await adapter.close()
        assert "secret" not in repr(adapter)
    bearer, login = seen
    assert bearer.headers["Authorization"] == "Bearer secret-token"
    assert json.loads(login.content)["password"] == "secret-pass"
    assert all("secret" not in str(r.url) for r in seen)


async def test_transport_failures_before_and_after_the_request_left() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def timed_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def server_error(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="<html>oops</html>")

    verdicts = []
    for handler in (refused, timed_out, server_error):
        client = httpx.AsyncClient(base_url="http://sandbox.invalid", transport=httpx.MockTransport(handler))
        adapter = SerwerSmsAdapter(account(token="t"), client)
        (result,) = await adapter.send([item("a")])
        await adapter.close()
        verdicts.append(result.verdict)
    assert verdicts == [Verdict.RETRY, Verdict.AMBIGUOUS, Verdict.AMBIGUOUS]
