"""The bus contract, version 1 (docs/contract.md; contract/ holds its schemas).

Everything a producer or consumer in another language sees is named here: exchange and queue
names, header names, the send-request schema and the outcome body. Nothing in this module does
I/O; `decode_request` turns raw AMQP bytes into either a `SendRequest` or an `InvalidRequest`
that says exactly what is wrong.
"""

from __future__ import annotations

import functools
import json
import math
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
# A stream of each batch's tracked messages and of the delivered / undelivered events: what the
# gateway rebuilds its delivery tracking from after the state store lost it.
TRACKING_STREAM = "sms.tracking"
RETRY_EXCHANGE = "sms.retry"
OPTOUT_EXCHANGE = "sms.optout"  # opt-outs from any language: routing key <account> or `all`
OPTOUT_QUEUE = "sms.optout"  # one queue, one active consumer at a time: the changes apply in order
OPTOUT_ALL_KEY = "all"


class Lane(StrEnum):
    """A send class. The producer chooses it with the routing key alone (`lane_key`); each lane is
    its own queue, and the account's rate serves urgent before normal before bulk."""

    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"


LANES = (Lane.URGENT, Lane.NORMAL, Lane.BULK)  # in priority order: a lane's rank is its index


def lane_key(account: str, lane: Lane = Lane.NORMAL) -> str:
    """The routing key of an account's lane: `<account>.urgent`, `<account>`, `<account>.bulk`."""
    return account if lane is Lane.NORMAL else f"{account}.{lane}"


def split_key(routing_key: str) -> tuple[str, Lane]:
    """The account and lane a routing key names (account names hold no dot)."""
    account, _, suffix = routing_key.partition(".")
    for lane in (Lane.URGENT, Lane.BULK):
        if suffix == lane:
            return account, lane
    return routing_key, Lane.NORMAL


def account_queue(account: str, lane: Lane = Lane.NORMAL) -> str:
    return f"{SEND_EXCHANGE}.{lane_key(account, lane)}"


def retry_queue(delay_ms: int) -> str:
    return f"{RETRY_EXCHANGE}.{delay_ms}ms"


# Headers the gateway writes.
H_ATTEMPTS = "x-gateway-attempts"  # provider attempts made so far (retry copies carry it)
H_WAITS = "x-gateway-waits"  # times this copy waited for another worker's in-flight claim
H_SENT_AT = "x-gateway-sent-at"  # epoch seconds of an attempt whose fate is unknown (ambiguous)
# Epoch seconds when this request first found another worker's live claim on its id: its wait for
# that claim is bounded by time from here (pipeline.Pipeline.wait). Only wait copies carry it.
H_WAITING_SINCE = "x-gateway-waiting-since"
# The copy is the gateway's own (a redelivery, a retry copy, or a wait copy of one), not a second
# copy from a producer: when its id is done it gets the original outcome again, never `duplicate`.
H_OWN = "x-gateway-own"
# On a batch's copy of its tracked messages in the tracking stream (tracking.py).
H_TRACKED = "x-gateway-tracked"
# Selects the retry TTL queue through the headers exchange. Deliberately without the `x-` prefix:
# RabbitMQ ignores `x-` headers when matching `x-match: all`, which would route to every queue.
H_RETRY_DELAY = "gateway-retry-delay"
H_REASON = "x-gateway-reason"
H_ERROR_CODE = "x-gateway-error-code"
H_ERROR_MESSAGE = "x-gateway-error-message"
H_ACCOUNT = "x-gateway-account"
H_LANE = "x-gateway-lane"  # on a dead letter: the lane it was consumed from, where a replay sends it back
# On a dead letter of an exchange other than sms.send (an `sms.optout` message): where a replay sends
# it back, with its account header as the routing key.
H_EXCHANGE = "x-gateway-exchange"
# Epoch seconds after which an urgent request without `expires_at` ends `expired` (its validity
# counted from its AMQP timestamp, or its first consumption): retry and wait copies carry it.
H_VALID_UNTIL = "x-gateway-valid-until"
# The configured accounts an earlier attempt of this copy may have reached (comma-separated): its
# reconcile asks each of them before any send (core/routes.py). Retry and wait copies carry it.
H_VIA = "x-gateway-via"
H_DEAD_AT = "x-gateway-dead-at"  # RFC 3339 time the gateway dead-lettered the message
H_DELIVERY_COUNT = "x-delivery-count"  # set by RabbitMQ quorum queues on redelivery
# Set by whoever re-drives a dead letter (`gateway dlq replay`, or any tool): a request whose earlier
# result was `rejected`, `failed` or `expired` is sent again (after a provider lookup) instead of
# being answered `duplicate`. Any non-empty value; the CLI writes the replay's id.
H_REPLAY = "x-gateway-replay"
# What a replay strips from a dead letter before it goes back to sms.send: the gateway's own
# bookkeeping (a replay starts with a clean attempt count) and the broker's dead-lettering history.
GATEWAY_HEADER_PREFIX = "x-gateway-"
BROKER_HEADERS = frozenset(
    {"x-death", H_DELIVERY_COUNT, "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason"}
)
REPLAYABLE = frozenset({"rejected", "failed", "expired"})  # earlier results a replay may send again


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


class PolicyCode(StrEnum):
    """`error.code` of a request the account's rules refused before any send: outcome `rejected`,
    no provider call, no dead letter."""

    OPTED_OUT = "opted_out"
    QUOTA_EXCEEDED = "quota_exceeded"
    COUNTRY_BLOCKED = "country_blocked"
    VELOCITY_BLOCKED = "velocity_blocked"
    FREQUENCY_CAPPED = "frequency_capped"


UNIQUE_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
MAX_META_BYTES = 4096
MAX_DEPTH = 32  # nesting of arrays and objects in a request
MAX_INT_DIGITS = 20  # an integer anywhere in a request (a 64-bit value has at most 20 digits)
MAX_BODY_BYTES = 65536  # a request body, bytes
MAX_TEXT_CHARS = 1530  # the rendered text: 10 parts of GSM-7 (153 each), 23 of UCS-2 (67 each)
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
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
        raise _Invalid("bad_field", f"{name} is out of range") from None


class _Invalid(Exception):
    def __init__(self, code: str, message: str, *, readable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.readable = readable  # the document parses leniently: its unique_id can still be read


def _template(text: str) -> list[tuple[str, str | None]]:
    """The text as (literal, placeholder name or None) pieces. Only `{name}` is a placeholder:
    format specs, conversions, indexing and attributes (`{a:>9}`, `{a!r}`, `{a[0]}`, `{a.b}`) are
    refused, so a template can neither grow its text nor reach into objects."""
    try:
        pieces = list(_PLACEHOLDER_FIELDS.parse(text))
    except ValueError as exc:
        raise _Invalid("bad_template", f"text is not a valid template: {exc}") from None
    out: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in pieces:
        if name is not None and (spec or conversion or not name.isidentifier()):
            raise _Invalid("bad_template", "placeholders must be plain names like {name}, without format specs")
        out.append((literal, name))
    return out


def _placeholders(text: str) -> set[str]:
    return {name for _literal, name in _template(text) if name is not None}


def render_text(text: str, values: dict[str, str | int | float], max_chars: int = MAX_TEXT_CHARS) -> str:
    """Fill `{placeholders}`; `{{` and `}}` are literal braces. Raises _Invalid on a missing value,
    a placeholder that is not a plain name, or a result longer than `max_chars`."""
    pieces = _template(text)
    missing = sorted({n for _lit, n in pieces if n is not None and n not in values})
    if missing:
        raise _Invalid("missing_var", f"no value for placeholder(s): {', '.join(missing)}")
    rendered = "".join(lit + (_var_text(values[n]) if n is not None else "") for lit, n in pieces)
    if len(rendered) > max_chars:
        raise _Invalid("text_too_long", f"text is {len(rendered)} characters after templating, limit {max_chars}")
    return rendered


def _var_text(value: str | int | float) -> str:
    return value if isinstance(value, str) else str(value)


def _refuse_constant(name: str) -> Any:
    raise _Invalid("bad_json", f"{name} is not a JSON number", readable=True)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Invalid("bad_number", f"an integer has more than {MAX_INT_DIGITS} digits", readable=True)
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid("bad_number", f"number {text[:40]} is out of range", readable=True)
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float)
# Reads a refused document only to find its unique_id and number, so the outcome can name them.
# One encoder for every outcome: `json.dumps` with options builds a new encoder per call.
_STRICT_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_SALVAGE = json.JSONDecoder(parse_constant=lambda _: None, parse_int=lambda _: 0, parse_float=lambda _: 0.0)


def parse_json(body: bytes) -> Any:
    """Strict, bounded JSON: UTF-8, no NaN or Infinity, integers of at most MAX_INT_DIGITS digits,
    nesting at most MAX_DEPTH deep, and no lone UTF-16 surrogates (valid JSON escapes such as
    "\\ud800" that no UTF-8 encoder can write back: the provider request and the outcome need it).
    Raises _Invalid."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("bad_json", f"body is not UTF-8: {exc}") from None
    if text.count("[") + text.count("{") > MAX_DEPTH:  # cheap test first: only then can it be deep
        _check_depth(text)
    try:
        doc = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _Invalid("bad_json", f"body is not JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # depth and digits are checked first; this is the backstop
        raise _Invalid("bad_json", f"body is not acceptable JSON: {type(exc).__name__}") from None
    # Only a \uD800-\uDFFF escape can make one (the body itself is valid UTF-8).
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(doc):
        raise _Invalid("bad_unicode", "a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)", readable=True)
    return doc


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before the parser recurses into it."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _Invalid("bad_json", f"nesting is deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def decode_request(
    body: bytes, *, message_id: str | None, max_bytes: int = MAX_BODY_BYTES, max_text_chars: int = MAX_TEXT_CHARS
) -> SendRequest | InvalidRequest:
    """Parse and validate one send request (contract v1). Never raises: whatever the bytes, the
    answer is a request or the reason it is not one."""
    uid = message_id if message_id and UNIQUE_ID_RE.match(message_id) else None
    if len(body) > max_bytes:
        return InvalidRequest("too_large", f"body is {len(body)} bytes, limit {max_bytes}", uid)
    try:
        doc = parse_json(body)
    except _Invalid as exc:
        return InvalidRequest(exc.code, exc.message, *(_salvage(body, message_id) if exc.readable else (uid, None)))
    if not isinstance(doc, dict):
        return InvalidRequest("bad_json", "body must be a JSON object", uid)
    raw_uid = doc.get("unique_id", message_id)
    uid = raw_uid if isinstance(raw_uid, str) and UNIQUE_ID_RE.match(raw_uid) else None
    raw_to = doc.get("to") if isinstance(doc.get("to"), str) else None
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else None
    try:
        return _validate(doc, uid, raw_to, meta, max_text_chars)
    except _Invalid as exc:
        return InvalidRequest(exc.code, exc.message, uid, raw_to, _small_meta(meta))


class OptOutAction(StrEnum):
    ADD = "add"
    REMOVE = "remove"


MAX_OPTOUT_SOURCE = 200
MAX_OPTOUT_BYTES = 4096


@dataclass(frozen=True, slots=True)
class OptOutMessage:
    """One change to the opt-out registry from the bus: `to` is still the producer's text."""

    to: str
    action: OptOutAction
    source: str
    at: datetime


def decode_optout(body: bytes, *, now: datetime) -> OptOutMessage | InvalidRequest:
    """Parse and validate one `sms.optout` message: `{"to", "action": "add" | "remove", "source",
    "at"}` (`source` and `at` optional: "" and `now`). Never raises."""
    if len(body) > MAX_OPTOUT_BYTES:
        return InvalidRequest("too_large", f"body is {len(body)} bytes, limit {MAX_OPTOUT_BYTES}")
    try:
        return _optout(parse_json(body), now)
    except _Invalid as exc:
        return InvalidRequest(exc.code, exc.message)


def _optout(doc: Any, now: datetime) -> OptOutMessage:
    if not isinstance(doc, dict):
        raise _Invalid("bad_json", "body must be a JSON object")
    to = doc.get("to")
    if not isinstance(to, str) or not to.strip():
        raise _Invalid("missing_field", "to must be a non-empty string")
    action = doc.get("action")
    if action not in ("add", "remove"):
        raise _Invalid("bad_field", 'action must be "add" or "remove"')
    source = doc.get("source", "")
    if not isinstance(source, str) or len(source) > MAX_OPTOUT_SOURCE:
        raise _Invalid("bad_field", f"source must be a string of at most {MAX_OPTOUT_SOURCE} characters")
    at = _parse_ts(doc["at"], "at") if doc.get("at") is not None else now
    return OptOutMessage(to.strip(), OptOutAction(action), source, at)


def _salvage(body: bytes, message_id: str | None) -> tuple[str | None, str | None]:
    """unique_id and `to` of a document refused for its contents (not its syntax), when readable."""
    try:
        doc = _SALVAGE.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # the strict parse stopped early: the rest may be broken too
        return None, None
    doc = doc if isinstance(doc, dict) else {}
    raw_uid = doc.get("unique_id", message_id)
    uid = raw_uid if isinstance(raw_uid, str) and UNIQUE_ID_RE.match(raw_uid) else None
    to = doc.get("to")
    return uid, to if isinstance(to, str) and to.isascii() and len(to) <= 64 else None


def _small_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Meta as an invalid request's outcome may echo it: only when it is within the limit."""
    if meta is None:
        return None
    return meta if len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False)) <= MAX_META_BYTES else None


def _validate(
    doc: dict[str, Any], uid: str | None, to: str | None, meta: dict[str, Any] | None, max_text_chars: int
) -> SendRequest:
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
    values = doc.get("vars")
    if values is None:  # no vars: the text is literal, braces and all
        if len(text) > max_text_chars:
            raise _Invalid("text_too_long", f"text is {len(text)} characters, limit {max_text_chars}")
        rendered, values, template = text, {}, None
    else:
        if not isinstance(values, dict) or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in values.values()
        ):
            raise _Invalid("bad_field", "vars must be an object of string to string or number")
        rendered = render_text(text, values, max_text_chars)
        template = text if _placeholders(text) else None
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
        if len(json.dumps(doc["meta"], separators=(",", ":"), ensure_ascii=False).encode()) > MAX_META_BYTES:
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
        template=template,
    )


@functools.lru_cache(maxsize=64)
def rfc3339(ts: datetime) -> str:
    """The contract's timestamp form: UTC, `Z` suffix. Cached: a batch's decisions share one `now`."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class OutcomeError:
    """The error record of an outcome, a stored result and a dead letter's headers: the one error
    type end to end (a provider's `ProviderError` is one, with its code table's action added)."""

    code: str
    type: str
    message: str
    retryable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "type": self.type, "message": self.message, "retryable": self.retryable}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> OutcomeError:
        return cls(str(doc["code"]), str(doc["type"]), str(doc["message"]), bool(doc["retryable"]))


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
    status_at: datetime | None = None,
    reason: str | None = None,
    lane: str | None = None,
    encoding: str | None = None,
    transliterated: str | None = None,
    cost: float | None = None,
    via: str | None = None,
) -> bytes:
    """The outcome document. `original` (only on `duplicate`) is the first copy's stored result;
    `status_at` and `reason` only on delivery events (`delivered`, `undelivered`); `lane` on the
    outcome of a request consumed from an account's lane; `encoding` once the text was counted,
    `transliterated` when a mapping made it GSM-7, `cost` on `accepted` at the account's price; `via`
    the configured account that sent it, once a provider had it."""
    doc: dict[str, Any] = {
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
        "at": rfc3339(at or datetime.now(UTC)),
    }
    if lane is not None:
        doc["lane"] = lane
    if encoding is not None:
        doc["encoding"] = encoding
    if transliterated is not None:
        doc["transliterated"] = transliterated
    if cost is not None:
        doc["cost"] = cost
    if via is not None:
        doc["via"] = via
    if original is not None:
        doc["original"] = original
    if status_at is not None:
        doc["status_at"] = rfc3339(status_at)
        doc["reason"] = reason
    # Strict JSON: NaN or a lone surrogate raises here rather than reach a consumer's parser.
    return _STRICT_COMPACT.encode(doc).encode()
