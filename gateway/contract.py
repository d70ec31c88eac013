"""The bus contract, version 1 (ARCHITECTURE.md section 1).

Everything a producer or consumer in another language sees is named here: exchange and queue
names, header names, the send-request schema and the outcome body. Nothing in this module does
I/O; `decode_request` turns raw AMQP bytes into either a `SendRequest` or an `InvalidRequest`
that says exactly what is wrong.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

CONTRACT_VERSION = 1

# Exchanges and queues (fixed names: producers and consumers in other languages depend on them).
SEND_EXCHANGE = "sms.send"
UNROUTABLE_EXCHANGE = "sms.send.unroutable"
UNROUTABLE_QUEUE = "sms.send.unroutable"
OUTCOMES_EXCHANGE = "sms.outcomes"
DEAD_EXCHANGE = "sms.dead"
DEAD_QUEUE = "sms.dead"
RETRY_EXCHANGE = "sms.retry"


def account_queue(account: str) -> str:
    return f"{SEND_EXCHANGE}.{account}"


def retry_queue(delay_ms: int) -> str:
    return f"{RETRY_EXCHANGE}.{delay_ms}ms"


# Headers the gateway writes.
H_ATTEMPTS = "x-gateway-attempts"  # provider attempts made so far (retry copies carry it)
H_WAITS = "x-gateway-waits"  # times this copy waited for another worker's in-flight claim
H_SENT_AT = "x-gateway-sent-at"  # epoch seconds of an attempt whose fate is unknown (ambiguous)
# Selects the retry TTL queue through the headers exchange. Deliberately without the `x-` prefix:
# RabbitMQ ignores `x-` headers when matching `x-match: all`, which would route to every queue.
H_RETRY_DELAY = "gateway-retry-delay"
H_REASON = "x-gateway-reason"
H_ERROR_CODE = "x-gateway-error-code"
H_ERROR_MESSAGE = "x-gateway-error-message"
H_ACCOUNT = "x-gateway-account"
H_DELIVERY_COUNT = "x-delivery-count"  # set by RabbitMQ quorum queues on redelivery


class Status(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    INVALID = "invalid"
    EXPIRED = "expired"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"


class DeadReason(StrEnum):
    INVALID = "invalid"
    REJECTED = "rejected"
    RETRIES_EXHAUSTED = "retries_exhausted"
    EXPIRED = "expired"
    UNKNOWN_ACCOUNT = "unknown_account"
    POISON = "poison"


UNIQUE_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
MAX_META_BYTES = 4096
_PLACEHOLDER_FIELDS = string.Formatter()


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A validated send request. `to` is still the producer's text; numbers are the account's job."""

    unique_id: str
    to: str
    text: str
    sender: str | None = None
    send_at: datetime | None = None
    expires_at: datetime | None = None
    flash: bool = False
    test: bool = False
    meta: dict[str, Any] | None = None
    vars: dict[str, str | int | float] = field(default_factory=dict)
    template: str | None = None  # the text as sent, when it had placeholders (`text` is rendered)


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """Why a request was refused. `unique_id` is set when it could be read, so an outcome can name it."""

    code: str
    message: str
    unique_id: str | None = None
    to: str | None = None
    meta: dict[str, Any] | None = None


def _parse_ts(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise _Invalid("bad_field", f"{name} must be an RFC 3339 timestamp string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise _Invalid("bad_field", f"{name} is not an RFC 3339 timestamp") from None
    if ts.tzinfo is None:
        raise _Invalid("bad_field", f"{name} must carry a UTC offset")
    return ts.astimezone(UTC)


class _Invalid(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _placeholders(text: str) -> set[str]:
    names: set[str] = set()
    for _literal, name, _spec, _conv in _PLACEHOLDER_FIELDS.parse(text):
        if name is not None:
            names.add(name)
    return names


def render_text(text: str, values: dict[str, str | int | float]) -> str:
    """Fill `{placeholders}`; `{{` and `}}` are literal braces. Raises _Invalid on a missing value."""
    try:
        names = _placeholders(text)
    except ValueError as exc:
        raise _Invalid("bad_template", f"text is not a valid template: {exc}") from None
    missing = sorted(n for n in names if n not in values)
    if missing:
        raise _Invalid("missing_var", f"no value for placeholder(s): {', '.join(missing)}")
    if any(not n.isidentifier() for n in names):
        raise _Invalid("bad_template", "placeholders must be plain names like {name}")
    return text.format_map(values) if names else text.replace("{{", "{").replace("}}", "}")


def decode_request(body: bytes, *, message_id: str | None, max_bytes: int) -> SendRequest | InvalidRequest:
    """Parse and validate one send request (contract v1)."""
    uid = message_id if message_id and UNIQUE_ID_RE.match(message_id) else None
    if len(body) > max_bytes:
        return InvalidRequest("too_large", f"body is {len(body)} bytes, limit {max_bytes}", uid)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return InvalidRequest("bad_json", f"body is not UTF-8 JSON: {exc}", uid)
    if not isinstance(doc, dict):
        return InvalidRequest("bad_json", "body must be a JSON object", uid)
    raw_uid = doc.get("unique_id", message_id)
    uid = raw_uid if isinstance(raw_uid, str) and UNIQUE_ID_RE.match(raw_uid) else None
    raw_to = doc.get("to") if isinstance(doc.get("to"), str) else None
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else None
    try:
        return _validate(doc, uid, raw_to, meta)
    except _Invalid as exc:
        return InvalidRequest(exc.code, exc.message, uid, raw_to, meta)


def _validate(doc: dict[str, Any], uid: str | None, to: str | None, meta: dict[str, Any] | None) -> SendRequest:
    version = doc.get("v", CONTRACT_VERSION)
    if version != CONTRACT_VERSION or isinstance(version, bool):
        raise _Invalid("bad_version", f"unsupported contract version {version!r}")
    if uid is None:
        if "unique_id" in doc:
            raise _Invalid("bad_field", "unique_id must be 1-128 printable ASCII characters without spaces")
        raise _Invalid("missing_field", "unique_id is required (or the AMQP message_id property)")
    if to is None:
        raise _Invalid("missing_field" if "to" not in doc else "bad_field", "to must be a string")
    text = doc.get("text")
    if not isinstance(text, str) or not text:
        raise _Invalid("missing_field" if "text" not in doc else "bad_field", "text must be a non-empty string")
    values = doc.get("vars") or {}
    if not isinstance(values, dict) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in values.values()
    ):
        raise _Invalid("bad_field", "vars must be an object of string to string or number")
    rendered = render_text(text, values)
    sender = doc.get("sender")
    if sender is not None and (not isinstance(sender, str) or not sender.strip()):
        raise _Invalid("bad_field", "sender must be a non-empty string")
    flags = {}
    for name in ("flash", "test"):
        value = doc.get(name, False)
        if not isinstance(value, bool):
            raise _Invalid("bad_field", f"{name} must be a boolean")
        flags[name] = value
    if "meta" in doc and doc["meta"] is not None:
        if not isinstance(doc["meta"], dict):
            raise _Invalid("bad_field", "meta must be an object")
        if len(json.dumps(doc["meta"], separators=(",", ":")).encode()) > MAX_META_BYTES:
            raise _Invalid("bad_field", f"meta is larger than {MAX_META_BYTES} bytes")
    send_at = _parse_ts(doc["send_at"], "send_at") if doc.get("send_at") is not None else None
    expires_at = _parse_ts(doc["expires_at"], "expires_at") if doc.get("expires_at") is not None else None
    return SendRequest(
        unique_id=uid,
        to=to,
        text=rendered,
        sender=sender,
        send_at=send_at,
        expires_at=expires_at,
        flash=flags["flash"],
        test=flags["test"],
        meta=meta,
        vars=values,
        template=text if _placeholders(text) else None,
    )


@dataclass(frozen=True, slots=True)
class OutcomeError:
    code: str
    type: str
    message: str
    retryable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "type": self.type, "message": self.message, "retryable": self.retryable}


def outcome_body(
    *,
    unique_id: str | None,
    account: str,
    to: str | None,
    status: Status,
    provider: str | None,
    provider_message_id: str | None = None,
    parts: int | None = None,
    attempts: int = 0,
    error: OutcomeError | None = None,
    provider_status: str | None = None,
    meta: dict[str, Any] | None = None,
    at: datetime | None = None,
    original: dict[str, Any] | None = None,
) -> bytes:
    """The outcome document. `original` (only on `duplicate`) is the first copy's stored result."""
    doc = {
        "v": CONTRACT_VERSION,
        "unique_id": unique_id,
        "account": account,
        "to": to,
        "status": str(status),
        "provider": provider,
        "provider_message_id": provider_message_id,
        "parts": parts,
        "attempts": attempts,
        "error": error.as_dict() if error else None,
        "provider_status": provider_status,
        "meta": meta,
        "at": (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
    }
    if original is not None:
        doc["original"] = original
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
