from __future__ import annotations

import json

import pytest

from gateway import contract as c


def decode(doc: object, *, message_id: str | None = None, max_bytes: int = 65536) -> c.SendRequest | c.InvalidRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return c.decode_request(body, message_id=message_id, max_bytes=max_bytes)


def test_valid_request_is_decoded_and_template_rendered() -> None:
    req = decode({"v": 1, "unique_id": "a1", "to": "500600700", "text": "Hi {name}", "vars": {"name": "Ann"}})
    assert isinstance(req, c.SendRequest)
    assert (req.unique_id, req.to, req.text) == ("a1", "500600700", "Hi Ann")


def test_unique_id_falls_back_to_message_id() -> None:
    req = decode({"to": "+48500600700", "text": "x"}, message_id="from-prop")
    assert isinstance(req, c.SendRequest)
    assert req.unique_id == "from-prop"


def test_literal_braces_survive_rendering() -> None:
    assert c.render_text("{{not a var}}", {}) == "{not a var}"


@pytest.mark.parametrize("text", ["price: {5} EUR", "{", "}} {{", 'JSON: {"a": 1}', "{name}"])
def test_text_without_vars_is_literal(text: str) -> None:
    """Braces are placeholders only when `vars` is given: free text needs no escaping."""
    for doc in ({"unique_id": "a", "to": "1", "text": text}, {"unique_id": "a", "to": "1", "text": text, "vars": None}):
        req = decode(doc)
        assert isinstance(req, c.SendRequest), req
        assert (req.text, req.template) == (text, None)


def test_literal_text_still_has_a_length_limit() -> None:
    req = c.decode_request(json.dumps({"unique_id": "a", "to": "1", "text": "{x}" * 11}).encode(),
                           message_id=None, max_bytes=65536, max_text_chars=32)  # fmt: skip
    assert isinstance(req, c.InvalidRequest)
    assert req.code == "text_too_long"


def test_with_vars_braces_are_placeholders() -> None:
    req = decode({"unique_id": "a", "to": "1", "text": "{{literal}} {code}", "vars": {"code": 7}})
    assert isinstance(req, c.SendRequest)
    assert (req.text, req.template) == ("{literal} 7", "{{literal}} {code}")


def test_unknown_fields_are_ignored_within_v1() -> None:
    """Contract evolution (docs/contract.md): v1 only grows by optional fields, so a gateway ignores fields it
    does not know, whether newer or a producer's own."""
    req = decode({"v": 1, "unique_id": "a", "to": "1", "text": "x", "priority": "high", "x-app": {"k": [1]}})
    assert isinstance(req, c.SendRequest)
    assert req.text == "x"


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        ({"v": 2, "unique_id": "a", "to": "1", "text": "x"}, "bad_version"),
        ({"to": "1", "text": "x"}, "missing_field"),
        ({"unique_id": "has space", "to": "1", "text": "x"}, "bad_field"),
        ({"unique_id": "a", "text": "x"}, "missing_field"),
        ({"unique_id": "a", "to": 48500600700, "text": "x"}, "bad_field"),
        ({"unique_id": "a", "to": "1"}, "missing_field"),
        ({"unique_id": "a", "to": "1", "text": ""}, "bad_field"),
        ({"unique_id": "a", "to": "1", "text": "Hi {name}", "vars": {}}, "missing_var"),
        ({"unique_id": "a", "to": "1", "text": "Hi {0}", "vars": {"0": "x"}}, "bad_template"),
        ({"unique_id": "a", "to": "1", "text": "Hi {", "vars": {}}, "bad_template"),
        ({"unique_id": "a", "to": "1", "text": "x", "vars": {"a": True}}, "bad_field"),
        ({"unique_id": "a", "to": "1", "text": "x", "flash": "yes"}, "bad_field"),
        ({"unique_id": "a", "to": "1", "text": "x", "expires_at": "tomorrow"}, "bad_field"),
    ],
)
def test_invalid_requests_say_what_is_wrong(doc: object, code: str) -> None:
    result = decode(doc)
    assert isinstance(result, c.InvalidRequest)
    assert result.code == code
    assert result.message


def test_too_large_body_is_refused_before_parsing() -> None:
    result = decode({"unique_id": "a", "to": "1", "text": "x" * 2000}, message_id="mid", max_bytes=1024)
    assert isinstance(result, c.InvalidRequest)
    assert (result.code, result.unique_id) == ("too_large", "mid")


def test_invalid_request_keeps_readable_id_and_meta() -> None:
    result = decode({"unique_id": "keep", "to": "1", "text": "", "meta": {"order": 7}})
    assert isinstance(result, c.InvalidRequest)
    assert (result.unique_id, result.meta) == ("keep", {"order": 7})


def test_outcome_body_carries_the_contract_fields() -> None:
    body = c.outcome_body(
        unique_id="u",
        account="acme",
        to="+48500600700",
        status=c.Status.DUPLICATE,
        provider="serwersms",
        provider_message_id="abc",
        parts=1,
        attempts=0,
        error=None,
        meta={"k": 1},
        original={"status": "accepted"},
    )
    doc = json.loads(body)
    assert doc["v"] == 1
    assert doc["status"] == "duplicate"
    assert doc["original"] == {"status": "accepted"}
    assert doc["at"].endswith("Z")
    assert {
        "unique_id",
        "account",
        "to",
        "provider",
        "provider_message_id",
        "parts",
        "attempts",
        "error",
        "meta",
    } <= set(doc)
