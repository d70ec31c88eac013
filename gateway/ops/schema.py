"""The bus contract as documents other languages can use: JSON Schema (2020-12) for the send
request, the outcome event and the dead letter's headers, and an AsyncAPI 3.0 document of the
whole bus. Generated from the gateway's own definitions (`contract`: names, enums, limits;
`topology`: exchanges, queues, bindings and their arguments), committed under `contract/`, and
compared with what is committed by a test, so they cannot drift apart.

    python -m gateway.ops.schema contract/      (make contract)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from gateway import contract as c
from gateway.bus import topology
from gateway.segments import Encoding, Transliterate

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://sms-gateway.example/contract/v1/"
_TIMESTAMP = {
    "type": "string",
    "format": "date-time",
    # `format` is only an annotation for most validators: the pattern makes them check it.
    "pattern": r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
    "description": "RFC 3339 with a UTC offset, e.g. 2026-05-01T12:00:00Z",
}
_NULLABLE_STRING = {"type": ["string", "null"]}


def send_request() -> dict[str, Any]:
    return {
        "title": "SendRequest",
        "description": (
            "One SMS to one recipient, published to exchange sms.send with routing key = the account's lane: "
            "<account>.urgent (one-time codes: served first, valid 10 minutes by default), <account> "
            "(normal) or <account>.bulk (campaigns: served last, quiet hours). "
            "UTF-8 JSON, content_type application/json. Fields not named here are ignored within v1 "
            "(docs/contract.md, 'Contract evolution')."
        ),
        "type": "object",
        "required": ["to", "text"],
        "properties": {
            "v": {"type": "integer", "const": c.CONTRACT_VERSION, "default": 1, "description": "contract version"},
            "unique_id": {
                "type": "string",
                "pattern": c.UNIQUE_ID_RE.pattern.replace("\\x21-\\x7e", "!-~"),
                "minLength": 1,
                "maxLength": 128,
                "description": "Idempotency key, per account. Required unless the AMQP message_id property carries it.",
            },
            "to": {
                "type": "string",
                "minLength": 1,
                "maxLength": 32,
                "description": "Recipient: E.164 with or without +, or national in the account's default country.",
            },
            "text": {
                "type": "string",
                "minLength": 1,
                "description": (
                    "Message text. Literal unless vars is given; with vars, {name} is a placeholder and {{ }} "
                    f"are literal braces. At most {c.MAX_TEXT_CHARS} characters after templating."
                ),
            },
            "vars": {
                "type": ["object", "null"],
                "additionalProperties": {"type": ["string", "number"]},
                "description": "Placeholder values; a placeholder without a value makes the request invalid.",
            },
            "sender": {
                "type": ["string", "null"],
                "minLength": 1,
                "description": "Sender name; default: the account's.",
            },
            "send_at": {
                **_TIMESTAMP,
                "type": ["string", "null"],
                "description": "Scheduled send (the provider's own scheduling).",
            },
            "expires_at": {
                **_TIMESTAMP,
                "type": ["string", "null"],
                "description": "Not handed to the provider after this: the outcome is expired.",
            },
            "flash": {"type": "boolean", "default": False, "description": "Flash SMS."},
            "test": {
                "type": "boolean",
                "default": False,
                "description": "Dry run: validated and answered, never sent.",
            },
            "meta": {
                "type": ["object", "null"],
                "description": f"Opaque, at most {c.MAX_META_BYTES} bytes as JSON; echoed in every outcome.",
            },
        },
        "additionalProperties": True,
    }


def _error() -> dict[str, Any]:
    return {
        "type": ["object", "null"],
        "required": ["code", "type", "message", "retryable"],
        "properties": {
            "code": {
                "type": "string",
                "description": "The provider's own code (e.g. 3005, 30), or the gateway's. A refusal by the account's "
                "rules is status rejected with one of: " + ", ".join(str(p) for p in c.PolicyCode) + ".",
            },
            "type": {"type": "string"},
            "message": {"type": "string"},
            "retryable": {"type": "boolean"},
        },
    }


def outcome() -> dict[str, Any]:
    statuses = [str(s) for s in c.Status]
    return {
        "title": "Outcome",
        "description": (
            "Published to exchange sms.outcomes with routing key <status>.<account> (and to reply_to for the "
            "terminal outcome). correlation_id: the request's own, else unique_id. One terminal outcome per "
            "request (accepted, rejected, failed, duplicate, invalid, expired); after accepted, one delivery "
            "event (delivered, undelivered). Consumers ignore fields they do not know."
        ),
        "type": "object",
        "required": ["v", "unique_id", "account", "status", "at"],
        "properties": {
            "v": {"type": "integer", "const": c.CONTRACT_VERSION},
            "unique_id": _NULLABLE_STRING,
            "account": {"type": "string"},
            "to": {**_NULLABLE_STRING, "description": "E.164 once normalised, else as the producer wrote it"},
            "status": {"type": "string", "enum": statuses},
            "provider": {**_NULLABLE_STRING, "enum": ["serwersms", "mobizon", None]},
            "provider_message_id": _NULLABLE_STRING,
            "parts": {"type": ["integer", "null"], "minimum": 1},
            "attempts": {"type": "integer", "minimum": 0},
            "error": _error(),
            "provider_status": {**_NULLABLE_STRING, "description": "the provider's raw status word"},
            "meta": {"type": ["object", "null"]},
            "at": _TIMESTAMP,
            "original": {
                "type": "object",
                "description": "Only on duplicate: the first copy's result.",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string", "enum": statuses},
                    "provider": _NULLABLE_STRING,
                    "provider_message_id": _NULLABLE_STRING,
                    "parts": {"type": ["integer", "null"]},
                    "encoding": {"type": "string", "enum": [str(e) for e in Encoding]},
                    "cost": {"type": "number", "minimum": 0},
                    "via": _NULLABLE_STRING,
                    "error": _error(),
                    "attempts": {"type": "integer"},
                    "at": {"type": ["string", "null"]},
                },
            },
            "status_at": {**_TIMESTAMP, "description": "Only on delivered / undelivered: when it happened."},
            "reason": {**_NULLABLE_STRING, "description": "Only on delivered / undelivered: the provider's reason."},
            "lane": {
                "type": "string",
                "enum": [str(lane) for lane in c.LANES],
                "description": "On the terminal outcome of a request of a configured account: the lane it was "
                "consumed from (the routing key's suffix: urgent, none = normal, bulk).",
            },
            "encoding": {
                "type": "string",
                "enum": [str(e) for e in Encoding],
                "description": "How the text is sent, as the gateway counts it: gsm7 (160 characters a part, 153 "
                "when concatenated; the extension characters count two) or ucs2 (70, 67). With parts, on every "
                "outcome of a request whose number and text were read.",
            },
            "transliterated": {
                "type": "string",
                "enum": [str(t) for t in Transliterate if t is not Transliterate.OFF],
                "description": "Present when the account's transliteration made the text GSM-7: lookalikes "
                "(quotes, dashes, spaces) or full (Latin diacritics too).",
            },
            "cost": {
                "type": "number",
                "minimum": 0,
                "description": "On accepted, for an account with price_per_part: parts x price_per_part.",
            },
            "via": {
                **_NULLABLE_STRING,
                "description": "The configured account that sent it (its provider is `provider`): the account "
                "published to, or the one its route_by_country or failover_to chose. Absent or null when no "
                "provider had it (invalid, refused, expired before a send).",
            },
        },
        "additionalProperties": True,
    }


def dead_letter_headers() -> dict[str, Any]:
    return {
        "title": "DeadLetterHeaders",
        "description": (
            "AMQP headers of a message in sms.dead (routing key <reason>.<account>); its body is the original "
            "request byte for byte. A letter moved by the broker's delivery limit carries x-death instead of "
            "the gateway's headers, with routing key poison.<account>."
        ),
        "type": "object",
        "required": [c.H_REASON, c.H_ERROR_CODE, c.H_ACCOUNT],
        "properties": {
            c.H_REASON: {"type": "string", "enum": [str(r) for r in c.DeadReason]},
            c.H_ERROR_CODE: {"type": "string"},
            c.H_ERROR_MESSAGE: {"type": "string", "maxLength": 1000},
            c.H_ATTEMPTS: {"type": "integer", "minimum": 0},
            c.H_ACCOUNT: {"type": "string"},
            c.H_DEAD_AT: _TIMESTAMP,
            c.H_LANE: {
                "type": "string",
                "enum": [str(lane) for lane in c.LANES],
                "description": "the lane it was consumed from: a replay publishes it back with that lane's routing key",
            },
        },
        "additionalProperties": True,
    }


def request_headers() -> dict[str, Any]:
    return {
        "title": "SendRequestHeaders",
        "type": "object",
        "properties": {
            "traceparent": {"type": "string", "description": "W3C trace context, continued by the gateway"},
            c.H_REPLAY: {
                "type": "string",
                "minLength": 1,
                "description": (
                    "Set when re-driving a dead letter: an earlier rejected, failed or expired result is sent "
                    "again (after a provider lookup) instead of answered duplicate; accepted or in flight "
                    "is still duplicate."
                ),
            },
        },
        "additionalProperties": True,
    }


def optout() -> dict[str, Any]:
    return {
        "title": "OptOut",
        "description": (
            "One change to the opt-out registry, published to exchange sms.optout with routing key <account> "
            "(that account's messages) or all (every account's). A number in the registry gets no normal or bulk "
            "message (urgent one-time codes still go unless the account says otherwise): its requests end "
            "rejected with error.code opted_out, without a provider call. Changes apply in the order they were "
            "published; an unreadable one is dead-lettered (sms.dead, invalid.<routing key>)."
        ),
        "type": "object",
        "required": ["to", "action"],
        "properties": {
            "to": {
                "type": "string",
                "minLength": 1,
                "maxLength": 32,
                "description": "The number: E.164, or national in the account's default country (with all: "
                "international only).",
            },
            "action": {"type": "string", "enum": [str(a) for a in c.OptOutAction]},
            "source": {
                "type": "string",
                "maxLength": c.MAX_OPTOUT_SOURCE,
                "description": "Where it came from (a STOP reply, the CRM, ...): kept with the entry.",
            },
            "at": {**_TIMESTAMP, "description": "When the person opted out or in (default: when the gateway read it)."},
        },
        "additionalProperties": True,
    }


SCHEMAS = {
    "send-request": send_request,
    "optout": optout,
    "outcome": outcome,
    "dead-letter-headers": dead_letter_headers,
    "send-request-headers": request_headers,
}


def json_schema(name: str) -> dict[str, Any]:
    return {"$schema": SCHEMA_DIALECT, "$id": f"{BASE_ID}{name}.schema.json", **SCHEMAS[name]()}


# -- AsyncAPI ----------------------------------------------------------------------------------


def _draft7(schema: Any) -> Any:
    """A schema as AsyncAPI's schema object (a JSON Schema draft-07 superset) takes it. The schemas
    above use only keywords that mean the same in draft-07 and 2020-12, so only the files' own
    `$schema` and `$id` are dropped."""
    if isinstance(schema, dict):
        return {k: _draft7(v) for k, v in schema.items() if k not in ("$schema", "$id")}
    if isinstance(schema, list):
        return [_draft7(v) for v in schema]
    return schema


def asyncapi() -> dict[str, Any]:
    plan = topology.layout(["{account}"], [1, 5, 30, 120, 600, 1800])
    amqp = "0.3.0"
    channels: dict[str, Any] = {}
    for x in plan.exchanges:
        channels[_cid(x.name)] = {
            "address": x.name,
            "description": x.description,
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": x.name, "type": x.type, "durable": True, "autoDelete": False, "vhost": "/"},
                    "bindingVersion": amqp,
                }
            },
            **_exchange_messages(x.name),
        }
    for q in plan.queues:
        channels[_cid("queue " + q.name)] = {
            "address": q.name,
            "description": q.description
            + " Arguments: "
            + json.dumps(q.arguments, sort_keys=True)
            + ". Bindings: "
            + "; ".join(
                f"{b.exchange} key {b.routing_key!r}" + (f" {json.dumps(b.arguments)}" if b.arguments else "")
                for b in q.bindings
            )
            + ".",
            "parameters": {"account": {"description": "account name"}} if "{account}" in q.name else {},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {"name": q.name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"},
                    "bindingVersion": amqp,
                }
            },
            **_queue_messages(q.name),
        }
    for ch in channels.values():
        if not ch.get("parameters"):
            ch.pop("parameters", None)
    return {
        "asyncapi": "3.1.0",
        "info": {
            "title": "sms-gateway bus",
            "version": f"{c.CONTRACT_VERSION}.0.0",
            "description": (
                "Outbound SMS over RabbitMQ. Producers publish SendRequest to sms.send (routing key = the "
                "account's lane: <account>.urgent, <account> or <account>.bulk) "
                "and read Outcome events from sms.outcomes (<status>.<account>) or their reply_to queue; dead "
                "letters land in sms.dead (<reason>.<account>); opt-outs go to sms.optout (<account> or all). "
                "Within v1 changes are additive only."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1"},
        },
        "channels": channels,
        "operations": {
            "publishSendRequest": {
                "action": "send",
                "channel": {"$ref": "#/channels/sms_send"},
                "summary": "Publish one send request; routing key = <account>.urgent, <account> or <account>.bulk.",
                "messages": [{"$ref": "#/channels/sms_send/messages/SendRequest"}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": False, "bindingVersion": amqp}},
            },
            "receiveOutcome": {
                "action": "receive",
                "channel": {"$ref": "#/channels/sms_outcomes"},
                "summary": "Bind a queue with <status>.<account> patterns (e.g. *.acme) and read outcomes.",
                "messages": [{"$ref": "#/channels/sms_outcomes/messages/Outcome"}],
            },
            "publishOptOut": {
                "action": "send",
                "channel": {"$ref": "#/channels/sms_optout"},
                "summary": "Publish one opt-out change; routing key = <account> or all.",
                "messages": [{"$ref": "#/channels/sms_optout/messages/OptOut"}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": False, "bindingVersion": amqp}},
            },
            "receiveDeadLetter": {
                "action": "receive",
                "channel": {"$ref": "#/channels/sms_dead"},
                "summary": "Dead letters: the original request with x-gateway-* headers saying why.",
                "messages": [{"$ref": "#/channels/sms_dead/messages/DeadLetter"}],
            },
        },
        "components": {
            "schemas": {
                "SendRequest": _draft7(send_request()),
                "SendRequestHeaders": _draft7(request_headers()),
                "Outcome": _draft7(outcome()),
                "DeadLetterHeaders": _draft7(dead_letter_headers()),
                "OptOut": _draft7(optout()),
            },
            "messages": {
                "SendRequest": {
                    "name": "SendRequest",
                    "contentType": "application/json",
                    "headers": {"$ref": "#/components/schemas/SendRequestHeaders"},
                    "payload": {"$ref": "#/components/schemas/SendRequest"},
                    "correlationId": {"location": "$message.header#/correlation_id"},
                    "examples": [{"payload": EXAMPLES["send-request"][0]}],
                },
                "Outcome": {
                    "name": "Outcome",
                    "contentType": "application/json",
                    "payload": {"$ref": "#/components/schemas/Outcome"},
                    "examples": [{"payload": EXAMPLES["outcome"][0]}],
                },
                "OptOut": {
                    "name": "OptOut",
                    "contentType": "application/json",
                    "payload": {"$ref": "#/components/schemas/OptOut"},
                    "examples": [{"payload": EXAMPLES["optout"][0]}],
                },
                "DeadLetter": {
                    "name": "DeadLetter",
                    "contentType": "application/json",
                    "headers": {"$ref": "#/components/schemas/DeadLetterHeaders"},
                    "payload": {"$ref": "#/components/schemas/SendRequest"},
                },
            },
        },
    }


def _cid(name: str) -> str:
    return name.replace("queue ", "queue_").replace(".", "_").replace("{", "").replace("}", "")


def _exchange_messages(name: str) -> dict[str, Any]:
    ref = {
        c.SEND_EXCHANGE: "SendRequest",
        c.UNROUTABLE_EXCHANGE: "SendRequest",
        c.RETRY_EXCHANGE: "SendRequest",
        c.OUTCOMES_EXCHANGE: "Outcome",
        c.DEAD_EXCHANGE: "DeadLetter",
        c.OPTOUT_EXCHANGE: "OptOut",
    }[name]
    return {"messages": {ref: {"$ref": f"#/components/messages/{ref}"}}}


def _queue_messages(name: str) -> dict[str, Any]:
    ref = {c.DEAD_QUEUE: "DeadLetter", c.TRACKING_STREAM: "Outcome", c.OPTOUT_QUEUE: "OptOut"}.get(name, "SendRequest")
    return {"messages": {ref: {"$ref": f"#/components/messages/{ref}"}}}


# Example messages: in the AsyncAPI document, docs/contract.md and the tests; each validates.
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "send-request": [
        {"unique_id": "order-1812-otp", "to": "+48500600700", "text": "Your code is {code}", "vars": {"code": "4711"}},
        {"unique_id": "order-1812-otp", "to": "+48500600700", "text": "Your code is 4711"},
        {
            "v": 1,
            "unique_id": "promo-77",
            "to": "500600700",
            "text": "price: {5} EUR",
            "sender": "Shop",
            "expires_at": "2026-12-01T18:00:00Z",
            "meta": {"campaign": 77},
        },
    ],
    "outcome": [
        {
            "v": 1,
            "unique_id": "order-1812-otp",
            "account": "demo",
            "to": "+48500600700",
            "status": "accepted",
            "provider": "serwersms",
            "provider_message_id": "a1b2c3d4e5",
            "parts": 1,
            "attempts": 1,
            "error": None,
            "provider_status": None,
            "meta": None,
            "at": "2026-11-29T06:37:49.459Z",
            "lane": "urgent",
        },
    ],
    "optout": [
        {"to": "+48500600700", "action": "add", "source": "STOP reply", "at": "2026-12-06T09:15:00Z"},
        {"to": "500600700", "action": "remove", "source": "customer portal"},
    ],
}


def documents() -> dict[str, str]:
    """File name -> text, as committed under contract/."""
    out = {f"{name}.schema.json": _dump(json_schema(name)) for name in SCHEMAS}
    out["asyncapi.json"] = _dump(asyncapi())
    out["examples.json"] = _dump(copy.deepcopy(EXAMPLES))
    return out


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in documents().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "contract")
    for p in write(target):
        print(f"wrote {p}")
