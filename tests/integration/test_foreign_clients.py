"""The sandbox against code nobody here wrote: SerwerSMS's official Python client (PyPI
`serwersmsv2api`, unmodified; only its API URL is pointed at the sandbox) and Mobizon's documented
curl form requests (mobizon-api-docs `_example/curl.md.php`), run with the real curl."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any, cast

import pytest
from serwersms import SerwerSMS  # type: ignore[import-untyped]

from testkit import Process, Sandbox

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox(sandbox_process: tuple[Process, Sandbox]) -> Sandbox:
    return sandbox_process[1]


def official(sandbox: Sandbox, token: str = "official-token") -> SerwerSMS:
    client = SerwerSMS(token)
    client.api_url = sandbox.url + "/"
    return client


def test_official_client_send_sms_with_details_and_unique_ids(sandbox: Sandbox) -> None:
    client = official(sandbox)
    doc = json.loads(
        client.message.send_sms(
            ["+48500600700", "+48500600701"],
            "Hello from the official client",
            "Sandbox",
            {"details": "true", "unique_id": ["off1", "off2"]},
        )
    )
    assert doc["success"] is True
    assert (doc["queued"], doc["unsent"]) == (2, 0)
    assert [i["phone"] for i in doc["items"]] == ["+48500600700", "+48500600701"]
    assert all(i["status"] == "queued" and len(i["id"]) == 10 for i in doc["items"])
    assert sandbox.ledger()["by_unique_id"] == {"off1": 1, "off2": 1}


def test_official_client_personalized_send(sandbox: Sandbox) -> None:
    client = official(sandbox)
    messages = [{"phone": "48500600702", "text": "First"}, {"phone": "48500600703", "text": "Second: a:b"}]
    doc = json.loads(client.message.send_personalized(messages, "Sandbox", {"details": "true"}))
    assert doc["queued"] == 2
    # The client joins `phone:text]|[...` and then cuts 4 characters for a 3-character separator,
    # so the last text loses its last character on the wire; the sandbox, like the API, takes the
    # text after the first colon as given (colons inside the text survive).
    assert [i["text"] for i in doc["items"]] == ["First", "Second: a:"]


def test_official_client_reports_and_view(sandbox: Sandbox) -> None:
    client = official(sandbox)
    sent = json.loads(
        client.message.send_sms("+48500600704", "Report me", "", {"details": "true", "unique_id": "rep1"})
    )
    message_id = sent["items"][0]["id"]
    reports = json.loads(client.message.reports({"unique_id": ["rep1"]}))
    assert [i["id"] for i in reports["items"]] == [message_id]
    assert reports["items"][0]["status"] in ("sent", "delivered")
    assert set(reports["paging"]) == {"page", "count"}
    viewed = json.loads(client.message.view(message_id, {}))
    assert viewed["phone"] == "+48500600704"


def test_official_client_sees_the_error_envelope(sandbox: Sandbox) -> None:
    doc = json.loads(official(sandbox).message.send_sms("+48500600705", "", "", {}))
    assert doc["error"]["code"] == 3101
    sandbox.fault(match="token:official-token", code=1001)
    doc = json.loads(official(sandbox).message.send_sms("+48500600705", "x", "", {}))
    assert doc["error"] == {"code": 1001, "type": "InvalidUser", "message": "incorrect login, password or token"}


def curl(sandbox: Sandbox, path: str, *form: str, key: str = "kzdemo") -> dict[str, object]:
    """The request exactly as Mobizon's curl example makes it."""
    assert shutil.which("curl"), "curl is needed for the Mobizon documentation examples"
    args = [
        "curl",
        "-s",
        "-X",
        "POST",
        f"{sandbox.url}/service/{path}?output=json&api=v1&apiKey={key}",
        "-H",
        "cache-control: no-cache",
        "-H",
        "content-type: application/x-www-form-urlencoded",
    ]
    for item in form:
        args += ["--data-urlencode" if "=" in item and not item.startswith("params") else "-d", item]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=10).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


def test_mobizon_curl_single_send_and_status(sandbox: Sandbox) -> None:
    sent = curl(
        sandbox, "message/sendsmsmessage", "recipient=77771234567", "text=Test sms message", "params[validity]=1440"
    )
    assert sent["code"] == 0
    data = sent["data"]
    assert isinstance(data, dict)
    assert isinstance(data["messageId"], str)
    assert isinstance(data["campaignId"], str)
    assert data["status"] == 2
    status = curl(sandbox, "message/getsmsstatus", f"ids[0]={data['messageId']}")
    assert status["code"] == 0
    (row,) = cast(list[dict[str, Any]], status["data"])
    assert row["id"] == data["messageId"]
    assert row["status"] in ("ACCEPTD", "DELIVRD")
    listed = curl(sandbox, "Message/List", "criteria[to]=77771234567", "criteria[text]=Test sms message")
    assert listed["data"]["totalItemCount"] == "1"  # type: ignore[index]


def test_mobizon_curl_campaign_flow_with_partial_result(sandbox: Sandbox) -> None:
    created = curl(sandbox, "campaign/create", "data[type]=2", "data[text]=Campaign text", "data[from]=Shop")
    campaign = created["data"]
    assert created["code"] == 0
    assert isinstance(campaign, str)
    added = curl(
        sandbox,
        "campaign/addrecipients",
        f"id={campaign}",
        "recipients[0]=77011234567",
        "recipients[1]=12",
        "recipients[2]=77011234567",
    )
    assert added["code"] == 98
    assert [r["code"] for r in cast(list[dict[str, Any]], added["data"])] == [0, 3, 4]
    sent = curl(sandbox, "campaign/send", f"id={campaign}")
    assert (sent["code"], sent["data"]) == (0, 2)
    assert sandbox.ledger()["by_recipient"] == {"77011234567": 1}


def test_mobizon_curl_errors(sandbox: Sandbox) -> None:
    assert curl(sandbox, "message/sendsmsmessage", "recipient=77771234567", "text=x", key="")["code"] == 8
    assert curl(sandbox, "nosuch/method")["code"] == 4
    ids = [f"ids[{i}]={i}" for i in range(101)]
    assert curl(sandbox, "message/getsmsstatus", *ids)["code"] == 12
    too_many = [f"recipients[{i}]=7701{i:07d}" for i in range(501)]
    campaign = curl(sandbox, "campaign/create", "data[type]=2", "data[text]=x")["data"]
    assert curl(sandbox, "campaign/addrecipients", f"id={campaign}", *too_many)["code"] == 12
