"""Logging setup: structlog, JSON lines in production, readable console on a terminal.

Rules kept by every caller: numbers go through `numbers.mask`, message text and credentials are
never passed to a logger. Libraries keep no such rule (aio-pika logs the broker URL it retries,
redis-py puts `AUTH <password>` in some errors), so every line, the gateway's and every library's,
passes `redact` before it is written: the credentials the process was configured with
(`register_secrets`), a URL's password and an AUTH command's arguments become `***`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog
from opentelemetry import trace


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Put the current span's trace and span id on the line, so logs and traces join up."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


MIN_SECRET_CHARS = 6  # shorter values (`guest`) would mask ordinary words; URL and AUTH rules cover them
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*):[^@\s]*@")
_AUTH_ARGS = re.compile(r"\b(AUTH)\s+(\S+)(\s+\S+)?")
_LOOSE_PASSWORD = re.compile(r":([^:@/\s]+)@")
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None


def url_secrets(url: str | None) -> list[str]:
    """The password of a URL and the values of its query options named like one; of a URL too
    malformed to parse, whatever stands between `:` and `@`."""
    if not url:
        return []
    found = _LOOSE_PASSWORD.findall(url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return found
    if password:
        found.append(unquote(password))
    return found + [v for k, v in parse_qsl(parts.query) if "password" in k.lower() or "secret" in k.lower()]


def register_secrets(values: Iterable[str | None]) -> None:
    """Credentials no log line may show, whatever logs them."""
    global _secret_pattern
    _secrets.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)
    if _secrets:
        ordered = sorted(_secrets, key=len, reverse=True)  # a secret inside a longer one: the longer first
        _secret_pattern = re.compile("|".join(re.escape(v) for v in ordered))


def redact_text(text: str) -> str:
    if _secret_pattern is not None:
        text = _secret_pattern.sub("***", text)
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\1:***@", text)
    if "AUTH" in text:
        text = _AUTH_ARGS.sub(r"\1 ***", text)
    return text


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask credentials in every string of the line (the traceback included: run after
    `format_exc_info`). One look at all of the line's strings at once decides whether any needs it."""
    strings = [value for value in event.values() if isinstance(value, str)]
    whole = "\n".join(strings)
    if "@" not in whole and "AUTH" not in whole and (_secret_pattern is None or not _secret_pattern.search(whole)):
        return event
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact_text(value)
    return event


def setup_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """structlog for the gateway's own lines; the standard library's loggers (aio-pika, aiormq,
    asyncio, aiohttp, httpx) are rendered by the same processors, so with JSON asked for every
    line on stderr is one JSON object, tracebacks included (as an `exception` field)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,  # a level-filtered call then costs about a microsecond
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter below WARNING (aiormq's frame-level debug lines) stays out of INFO logs.
    root.setLevel(max(numeric_level, logging.WARNING))
    logging.captureWarnings(True)


def setup_logging_from_environment() -> None:
    """Logging as the environment asks, for an error before the settings could be read."""
    fmt = os.environ.get("GATEWAY_LOG_FORMAT", "auto")
    setup_logging(fmt if fmt in ("json", "console", "auto") else "auto", "INFO")


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
