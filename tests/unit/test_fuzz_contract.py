"""Property-based: whatever bytes a producer sends, decoding answers a request or a reason, never
raises, and the outcome for it is strict JSON. Runs derandomized (the seed is the test's name), so
a failure found in CI reproduces anywhere; HYPOTHESIS_PROFILE=deep searches wider and at random."""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import contract as c
from gateway.errors import InvalidNumber
from gateway.numbers import normalize
from tests.unit.test_hostile_input import assert_outcome_is_strict_json

settings.register_profile("ci", derandomize=True, max_examples=300, deadline=None)
settings.register_profile("deep", max_examples=20_000, deadline=None)
settings.load_profile("ci")

# Strings with what trips parsers and encoders: lone surrogates, braces, control characters, emoji.
nasty_text = st.lists(
    st.one_of(
        st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF),
        st.sampled_from(["{", "}", "{{", "}}", "{a}", "{a:>9}", "{0}", "\ud800", "\udfff", "\x00", "€", "😀"]),
    ),
    max_size=30,
).map("".join)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=25,
)
field_values = st.one_of(json_values, st.just("+48500600700"), st.just("hello {name}"))
documents = st.dictionaries(
    st.sampled_from(
        ["v", "unique_id", "to", "text", "vars", "sender", "send_at", "expires_at", "flash", "test", "meta"]
    )
    | nasty_text,
    field_values,
    max_size=10,
)


def _encode(doc: Any) -> bytes:
    # Python's encoder writes lone surrogates as \ud800 escapes and NaN as a bare NaN, as a sloppy
    # producer would.
    return json.dumps(doc, ensure_ascii=True, allow_nan=True).encode()


def _check(body: bytes, message_id: str | None) -> None:
    result = c.decode_request(body, message_id=message_id, max_bytes=65536)
    assert isinstance(result, c.SendRequest | c.InvalidRequest)
    if isinstance(result, c.SendRequest):
        assert len(result.text) <= c.MAX_TEXT_CHARS
        assert result.text.encode("utf-8")  # encodable for the provider
    assert_outcome_is_strict_json(result)


@given(documents, st.one_of(st.none(), st.text(max_size=20)))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_document_decodes_to_a_request_or_a_reason(doc: dict[str, Any], message_id: str | None) -> None:
    _check(_encode(doc), message_id)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_request_or_a_reason(body: bytes) -> None:
    _check(body, None)


@given(st.integers(min_value=1, max_value=40), st.sampled_from([b"[", b"{", b'{"a":', b"[{"]))
def test_any_nesting_decodes_to_a_request_or_a_reason(depth: int, opener: bytes) -> None:
    _check(b'{"unique_id":"n","to":"1","text":"x","meta":' + opener * depth * 30, None)


@given(
    st.text(alphabet=string.ascii_letters + " @£$¥èéùìòÇ", min_size=150, max_size=165)
    | st.text(alphabet="ąćęłńóśźżАБВ€", min_size=60, max_size=75),
)
def test_texts_around_the_segment_limits_pass_unchanged(text: str) -> None:
    # 153/160 GSM-7 and 67/70 UCS-2 characters per part: the gateway passes the text through, the
    # provider splits it; nothing is cut or re-encoded on the way.
    result = c.decode_request(
        json.dumps({"unique_id": "s", "to": "+48500600700", "text": text}).encode(), message_id=None, max_bytes=65536
    )
    assert isinstance(result, c.SendRequest)
    assert result.text == text


@given(st.text(max_size=40), st.sampled_from(["PL", "US", "DE", "KZ"]))
def test_any_phone_string_is_normalized_or_refused(raw: str, region: str) -> None:
    try:
        number = normalize(raw, region)
    except InvalidNumber:
        return
    assert number.startswith("+")
    assert number[1:].isdigit()
