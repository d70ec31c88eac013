"""The sandbox speaks SerwerSMS API v2's encodings and answer shapes (serwersms.md A3-A13)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.sandbox.app import start_sandbox
from gateway.sandbox.state import SandboxState
from testkit import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, SandboxState]]:
    state = SandboxState()
    port = free_port()
    runner = await start_sandbox("127.0.0.1", port, state)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client, state
    await runner.cleanup()


BEARER = {"Authorization": "Bearer tok"}


async def test_json_send_sms_with_details(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, state = api
    r = await client.post(
        "/messages/send_sms.json",
        headers=BEARER,
        json={"phone": ["+48500600700", "48500600701"], "text": "hi", "details": True, "unique_id": ["aaa1", "aaa2"]},
    )
    doc = r.json()
    assert r.status_code == 200
    assert (doc["success"], doc["queued"], doc["unsent"]) == (True, 2, 0)
    assert [i["status"] for i in doc["items"]] == ["queued", "queued"]
    assert all(len(i["id"]) == 10 for i in doc["items"])
    assert state.ledger()["by_unique_id"] == {"aaa1": 1, "aaa2": 1}


async def test_form_encoding_with_login_and_no_json_suffix(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, state = api
    form = {"username": "u", "password": "p", "phone[]": ["500600700", "500600701"], "text": "hi"}
    r = await client.post("/messages/send_sms", data=form)
    assert r.json() == {"success": True, "queued": 2, "unsent": 0}
    assert {rec.who for rec in state.sends} == {"user:u"}


async def test_personalized_in_both_encodings(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, _ = api
    as_json = await client.post(
        "/messages/send_personalized.json",
        headers=BEARER,
        json={"messages": [{"phone": "48500600700", "text": "a"}, {"phone": "48500600701", "text": "b"}]},
    )
    as_string = await client.post(
        "/messages/send_personalized", headers=BEARER, data={"messages": "48500600700:a]|[48500600701:b"}
    )
    assert as_json.json()["queued"] == 2
    assert as_string.json()["queued"] == 2


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        ({"phone": ["48500600700"], "text": "x"}, {}, 1001),
        ({"phone": ["48500600700"]}, BEARER, 2000),
        ({"phone": ["48500600700"], "text": "x", "unique_id": ["bad id!"]}, BEARER, 3200),
        ({"phone": ["48500600700", "48500600701"], "text": "x", "unique_id": ["a12", "a12"]}, BEARER, 3201),
        ({"phone": ["48500600700", "48500600701"], "text": "x", "unique_id": ["a12"]}, BEARER, 3202),
    ],
)
async def test_errors_come_as_http_200_envelopes(
    api: tuple[httpx.AsyncClient, SandboxState], body: dict[str, object], headers: dict[str, str], code: int
) -> None:
    client, state = api
    r = await client.post("/messages/send_sms.json", headers=headers, json=body)
    assert r.status_code == 200
    assert r.json()["error"]["code"] == code
    assert set(r.json()["error"]) == {"code", "type", "message"}
    assert state.sends == []


async def test_bad_number_is_an_unsent_item(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, _ = api
    r = await client.post(
        "/messages/send_sms.json", headers=BEARER, json={"phone": ["12", "48500600700"], "text": "x", "details": True}
    )
    doc = r.json()
    assert (doc["queued"], doc["unsent"]) == (1, 1)
    assert doc["items"][0]["status"] == "unsent"
    assert doc["items"][0]["error_code"] == 2001


async def test_reports_find_a_send_by_unique_id(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, _ = api
    await client.post(
        "/messages/send_sms.json", headers=BEARER, json={"phone": ["48500600700"], "text": "x", "unique_id": ["abc"]}
    )
    found = (await client.post("/messages/reports.json", headers=BEARER, json={"unique_id": "abc"})).json()
    missing = (await client.post("/messages/reports.json", headers=BEARER, json={"unique_id": "zzz"})).json()
    other_user = (
        await client.post("/messages/reports.json", headers={"Authorization": "Bearer x"}, json={"unique_id": "abc"})
    ).json()
    assert [i["status"] for i in found["items"]] == ["sent"]
    assert missing["items"] == []
    assert other_user["items"] == []


async def test_duplicate_control_answers_3111(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, state = api
    state.duplicate_control = True
    body = {"phone": ["48500600700"], "text": "x", "unique_id": ["dup1"]}
    first = await client.post("/messages/send_sms.json", headers=BEARER, json=body)
    second = await client.post("/messages/send_sms.json", headers=BEARER, json=body)
    assert first.json()["queued"] == 1
    assert second.json()["error"]["code"] == 3111
    assert state.ledger()["by_unique_id"] == {"dup1": 1}


async def test_fault_rules_fire_count_times_for_the_matching_identity(
    api: tuple[httpx.AsyncClient, SandboxState],
) -> None:
    client, _ = api
    rule = (await client.post("/_sandbox/faults", json={"match": "token:tok", "code": 3106, "count": 2})).json()
    assert rule["id"] >= 1
    body = {"phone": ["48500600700"], "text": "x"}
    codes = []
    for headers in (BEARER, {"Authorization": "Bearer other"}, BEARER, BEARER):
        doc = (await client.post("/messages/send_sms.json", headers=headers, json=body)).json()
        codes.append(doc.get("error", {}).get("code"))
    assert codes == [3106, None, 3106, None]
    bad = await client.post("/_sandbox/faults", json={"rate": 7})
    assert bad.status_code == 400


async def test_config_merges_the_keys_given_and_answers_get(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    client, _state = api
    defaults = (await client.get("/_sandbox/config")).json()
    assert defaults["dlr"]["delay_s"] == 1.0
    assert defaults["dlr"]["webhooks"] == {}
    hook_a = {"url": "http://127.0.0.1:9/a", "secret": "s-a"}
    hook_b = {"url": "http://127.0.0.1:9/b", "secret": "s-b"}
    r = await client.post("/_sandbox/config", json={"dlr": {"delay_s": 0.2, "webhooks": {"key-a": hook_a}}})
    assert r.status_code == 200
    # A second call changes what it names and keeps the rest: the first call's webhook stays.
    await client.post("/_sandbox/config", json={"dlr": {"mix": {"undelivered": 1.0}, "webhooks": {"key-b": hook_b}}})
    await client.post("/_sandbox/config", json={"duplicate_control": True})
    now = (await client.get("/_sandbox/config")).json()
    assert now["dlr"]["delay_s"] == 0.2
    assert now["dlr"]["mix"] == {"undelivered": 1.0}
    assert sorted(now["dlr"]["webhooks"]) == ["key-a", "key-b"]
    assert now["duplicate_control"] is True


async def test_the_documented_defaults_are_the_sandbox_defaults(api: tuple[httpx.AsyncClient, SandboxState]) -> None:
    import json
    import re

    from testkit import ROOT

    client, _state = api
    doc = (ROOT / "docs" / "sandbox.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| (.*?) \|", doc, re.M))
    config = (await client.get("/_sandbox/config")).json()
    flat = {**{k: v for k, v in config.items() if k != "dlr"}, **{f"dlr.{k}": v for k, v in config["dlr"].items()}}
    assert set(rows) == set(flat)
    for key, value in flat.items():
        written = rows[key].strip("`")
        assert value in (None, 0) if written == "unset" else json.loads(written) == value, key
