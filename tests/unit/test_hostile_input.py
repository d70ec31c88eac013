"""Inputs that used to crash the handler (and so ended as `poison`, or wedged a batch) are
`invalid` with a reason, and keep their unique_id so the producer gets an outcome."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from gateway import contract as c
from gateway.obs.logs import setup_logging

GOOD = {"v": 1, "unique_id": "h1", "to": "+48500600700", "text": "hi"}


def decode(body: bytes, **kw: int) -> c.SendRequest | c.InvalidRequest:
    return c.decode_request(body, message_id=None, max_bytes=kw.pop("max_bytes", 65536), **kw)


def with_fields(**fields: object) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def assert_outcome_is_strict_json(result: c.SendRequest | c.InvalidRequest) -> None:
    """Whatever came in, the outcome echoing it (id, number, meta) parses as strict JSON."""
    out = c.outcome_body(
        unique_id=result.unique_id, account="a", to=result.to, status=c.Status.INVALID, provider=None, meta=result.meta
    )
    json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in an outcome"))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        # Lone UTF-16 surrogates: valid JSON, but no UTF-8 encoder (httpx, the outcome) can write them.
        (b'{"unique_id":"h1","to":"+48500600700","text":"\\ud800 x"}', "bad_unicode"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"x","sender":"\\udfff"}', "bad_unicode"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"x","meta":{"k":"\\ud800"}}', "bad_unicode"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"x","meta":{"\\ud800":1}}', "bad_unicode"),
        # Numbers JSON does not have, or too large to be anyone's value.
        (b'{"unique_id":"h1","to":"+48500600700","text":"{a}","vars":{"a":NaN}}', "bad_json"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"x","meta":{"a":-Infinity}}', "bad_json"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"{a}","vars":{"a":1e999}}', "bad_number"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"x","v":' + b"9" * 5000 + b"}", "bad_number"),
        (b'{"unique_id":"h1","to":"+48500600700","text":"{a}","vars":{"a":' + b"1" * 5000 + b"}}", "bad_number"),
        # Format specs, conversions, indexing: only {name} is a placeholder.
        (with_fields(text="{a:d}", vars={"a": 1}), "bad_template"),
        (with_fields(text="{a:{b}}", vars={"a": 1, "b": 2}), "bad_template"),
        (with_fields(text="{a!x}", vars={"a": 1}), "bad_template"),
        (with_fields(text="{a!r}", vars={"a": "x"}), "bad_template"),
        (with_fields(text="{a[0]}", vars={"a": "x"}), "bad_template"),
        (with_fields(text="{a.real}", vars={"a": 1}), "bad_template"),
        (with_fields(text="{a:>2000000}", vars={"a": 1}), "bad_template"),
        # Timestamps that overflow when moved to UTC.
        (with_fields(expires_at="9999-12-31T23:59:59-14:00"), "bad_field"),
        (with_fields(send_at="0001-01-01T00:00:00+14:00"), "bad_field"),
    ],
)
def test_hostile_input_is_invalid_and_keeps_its_unique_id(body: bytes, code: str) -> None:
    result = decode(body)
    assert isinstance(result, c.InvalidRequest), result
    assert result.code == code, result
    assert result.unique_id == "h1"
    assert_outcome_is_strict_json(result)


def test_nesting_is_bounded_before_the_parser_recurses() -> None:
    deep = b'{"unique_id":"h1","to":"1","text":"x","meta":' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}"
    result = decode(deep)
    assert isinstance(result, c.InvalidRequest)
    assert result.code == "bad_json"
    assert "deeper" in result.message
    assert decode(b"[" * 60000).code == "bad_json"  # type: ignore[union-attr]
    # Brackets inside strings are text, not nesting.
    ok = decode(with_fields(text="[" * 100 + "{" * 100))
    assert isinstance(ok, c.SendRequest)


def test_paired_surrogate_escapes_are_one_character_and_fine() -> None:
    result = decode(b'{"unique_id":"h1","to":"+48500600700","text":"ok \\ud83d\\ude00"}')
    assert isinstance(result, c.SendRequest)
    assert result.text == "ok \U0001f600"


def test_rendered_text_is_bounded() -> None:
    long_var = decode(with_fields(text="code {a}", vars={"a": "x" * 1600}))
    assert isinstance(long_var, c.InvalidRequest)
    assert long_var.code == "text_too_long"
    assert long_var.unique_id == "h1"
    plain = decode(with_fields(text="y" * 1531))
    assert isinstance(plain, c.InvalidRequest)
    assert plain.code == "text_too_long"
    assert isinstance(decode(with_fields(text="y" * 1530)), c.SendRequest)
    assert isinstance(decode(with_fields(text="y" * 2000), max_text_chars=2000), c.SendRequest)


def test_numbers_in_vars_render_as_written() -> None:
    result = decode(with_fields(text="{a} {b} {{x}}", vars={"a": 12345678901234567890, "b": 2.5}))
    assert isinstance(result, c.SendRequest)
    assert result.text == "12345678901234567890 2.5 {x}"


def test_outcome_body_refuses_nan_instead_of_writing_it() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        c.outcome_body(
            unique_id="a", account="a", to=None, status=c.Status.ACCEPTED, provider=None, meta={"x": float("nan")}
        )


def test_library_log_lines_are_json_when_json_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json", "INFO")
        logging.getLogger("aiormq.connection").warning("connection lost to %s", "127.0.0.1")
        try:
            _ = {"present": 1}["missing"]
        except KeyError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        logging.getLogger("aiormq.connection").info("below the library threshold")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()  # later tests' loggers must not write to this test's stderr
    lines = [json.loads(line) for line in err.getvalue().splitlines()]  # every line is one JSON object
    assert [d["event"] for d in lines] == ["connection lost to 127.0.0.1", "Task exception was never retrieved"]
    assert lines[0]["logger"] == "aiormq.connection"
    assert lines[0]["level"] == "warning"
    assert "KeyError: 'missing'" in lines[1]["exception"]


def test_negative_small_header_values_survive_a_copy() -> None:
    # Found by the fuzz test: pamqp cannot write -128..-1 in a header table, so the dead letter or
    # retry copy of a message carrying such a header could never be published.
    from pamqp import decode, frame
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from gateway.bus import publisher

    headers = publisher._clean_headers({"retries": -1, "low": -128, "nested": {"x": -5}, "big": 2**40})
    props = Basic.Properties(headers=headers)
    raw = frame.marshal(ContentHeader(body_size=0, properties=props), 1)
    _consumed, _channel, decoded = frame.unmarshal(raw)
    assert isinstance(decoded, ContentHeader)
    assert decoded.properties.headers == {"retries": -1, "low": -128, "nested": {"x": -5}, "big": 2**40}
    assert decode.embedded_value(b"s\xff\xff")[1] == -1
