"""contract/: the JSON Schemas and the AsyncAPI document are what the code generates (drift
test), the schemas are valid 2020-12 schemas that accept every example message (the README,
docs/contract.md, the tests' own request helper) and refuse what the gateway refuses, and the
AsyncAPI document passes the AsyncAPI Initiative's own parser."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from gateway import contract as c
from gateway.bus import topology
from gateway.ops import schema
from testkit import ROOT
from testkit.bus import request
from testkit.toolchains import npm_install, require

CONTRACT = ROOT / "contract"


def validator(name: str) -> Draft202012Validator:
    doc = json.loads((CONTRACT / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc, format_checker=FormatChecker())


def test_committed_artifacts_are_what_the_code_generates() -> None:
    """Run `make contract` after changing the contract; this fails until the files are updated."""
    generated = schema.documents()
    committed = {p.name: p.read_text() for p in CONTRACT.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(generated)
    stale = [name for name, text in generated.items() if committed[name] != text]
    assert stale == [], f"contract/ is stale: run `make contract` ({stale})"


def readme_examples() -> list[dict[str, Any]]:
    """Every JSON example a producer may copy: the README's and the contract page's."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "contract.md").read_text()
    docs = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        for line in block.strip().splitlines():
            docs.append(json.loads(line))
    return docs


def test_every_example_message_validates() -> None:
    requests, outcomes, optouts = validator("send-request"), validator("outcome"), validator("optout")
    examples = readme_examples()
    assert len(examples) >= 3
    for doc in examples:
        (outcomes if "status" in doc else optouts if "action" in doc else requests).validate(doc)
    for doc in schema.EXAMPLES["send-request"]:
        requests.validate(doc)
        assert isinstance(c.decode_request(json.dumps(doc).encode(), message_id=None, max_bytes=65536), c.SendRequest)
    for doc in schema.EXAMPLES["outcome"]:
        outcomes.validate(doc)
    for doc in schema.EXAMPLES["optout"]:
        optouts.validate(doc)
        assert isinstance(c.decode_optout(json.dumps(doc).encode(), now=datetime.now(UTC)), c.OptOutMessage)
    requests.validate(json.loads(request("t-1", vars={"code": 7}, meta={"k": "v"})))  # the tests' own producer


def test_an_outcome_with_what_the_text_costs_validates() -> None:
    body = c.outcome_body(unique_id="u2", account="acme", to="+48500600700", status=c.Status.ACCEPTED,
                          provider="serwersms", parts=2, attempts=1, encoding="ucs2", cost=0.14)  # fmt: skip
    validator("outcome").validate(json.loads(body))
    body = c.outcome_body(unique_id="u3", account="acme", to="+48500600700", status=c.Status.ACCEPTED,
                          provider="serwersms", parts=1, encoding="gsm7", transliterated="full")  # fmt: skip
    validator("outcome").validate(json.loads(body))
    bad = {**json.loads(body), "encoding": "utf-16"}
    assert not validator("outcome").is_valid(bad)


def test_an_optout_the_decoder_refuses_the_schema_refuses_too() -> None:
    now = datetime.now(UTC)
    for doc in (
        {"to": "+48500600700"},  # no action
        {"to": "+48500600700", "action": "delete"},
        {"to": "", "action": "add"},
        {"to": "+48500600700", "action": "add", "at": "yesterday"},
        {"to": "+48500600700", "action": "add", "source": "x" * 201},
    ):
        assert isinstance(c.decode_optout(json.dumps(doc).encode(), now=now), c.InvalidRequest), doc
        assert not validator("optout").is_valid(doc), doc


def test_an_outcome_the_gateway_writes_validates() -> None:
    error = c.OutcomeError("3005", "NoPermissionMms", "no permission for MMS", False)
    body = c.outcome_body(unique_id="u1", account="acme", to="+48500600700", status=c.Status.REJECTED,
                          provider="serwersms", attempts=1, error=error, meta={"a": 1})  # fmt: skip
    validator("outcome").validate(json.loads(body))
    assert set(validator("outcome").schema["properties"]["status"]["enum"]) == {str(s) for s in c.Status}


@pytest.mark.parametrize(
    "doc",
    [
        {"unique_id": "a", "text": "x"},  # no to
        {"unique_id": "has space", "to": "1", "text": "x"},
        {"unique_id": "a", "to": "1", "text": ""},
        {"unique_id": "a", "to": "1", "text": "x", "vars": {"a": [1]}},
        {"unique_id": "a", "to": "1", "text": "x", "flash": "yes"},
        {"unique_id": "a", "to": "1", "text": "x", "v": 2},
        {"unique_id": "a", "to": "1", "text": "x", "send_at": "tomorrow"},
    ],
)
def test_the_schema_refuses_what_the_gateway_refuses(doc: dict[str, Any]) -> None:
    assert not validator("send-request").is_valid(doc)
    assert isinstance(c.decode_request(json.dumps(doc).encode(), message_id=None, max_bytes=65536), c.InvalidRequest)


def test_dead_letter_headers_name_every_reason() -> None:
    headers = validator("dead-letter-headers")
    headers.validate({c.H_REASON: "rejected", c.H_ERROR_CODE: "3005", c.H_ACCOUNT: "acme", c.H_ATTEMPTS: 1})
    assert not headers.is_valid({c.H_REASON: "lost", c.H_ERROR_CODE: "x", c.H_ACCOUNT: "acme"})
    assert set(headers.schema["properties"][c.H_REASON]["enum"]) == {str(r) for r in c.DeadReason}


@pytest.mark.toolchains
@pytest.mark.timeout(1800)  # the first run installs Node.js (apt) and the parser (npm)
def test_asyncapi_document_passes_the_asyncapi_parser() -> None:
    folder = ROOT / "tests" / "contract"
    npm_install(folder)
    node = require("node")
    done = subprocess.run(
        [node, "validate-asyncapi.mjs", str(CONTRACT / "asyncapi.json")],
        cwd=folder, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parsed: 23 channels, 4 operations" in done.stdout
    assert "error" not in done.stdout


def test_asyncapi_document_names_every_exchange_and_queue_with_its_arguments() -> None:
    doc = json.loads((CONTRACT / "asyncapi.json").read_text())
    addresses = {ch["address"] for ch in doc["channels"].values()}
    plan = topology.layout(["{account}"], [1, 5, 30, 120, 600, 1800])
    assert {x.name for x in plan.exchanges} | {q.name for q in plan.queues} == addresses
    queue = doc["channels"]["queue_sms_send_account"]
    assert '"x-delivery-limit": 20' in queue["description"]
    assert '"x-dead-letter-exchange": "sms.dead"' in queue["description"]
