"""Credentials never reach a log line, whoever logs them: the gateway's loggers and every library's."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from gateway.obs import logs as telemetry
from gateway.obs.logs import get_logger, redact_text, register_secrets, setup_logging, url_secrets


def test_a_urls_password_an_auth_command_and_registered_secrets_are_masked() -> None:
    register_secrets(["tok-0123456789"])
    assert redact_text("retrying amqp://guest:pa55word@host:5672/ ...") == "retrying amqp://guest:***@host:5672/ ..."
    assert redact_text("AUTH hunter22 called without any password") == "AUTH *** without any password"
    assert redact_text("Bearer tok-0123456789 refused") == "Bearer *** refused"
    assert redact_text("nothing secret here: +48 500 600 700") == "nothing secret here: +48 500 600 700"


def test_the_secrets_of_a_url_are_found_even_when_it_does_not_parse() -> None:
    found = url_secrets("redis+sentinel://:pw-one@h1:26379,h2:26379/svc?sentinel_password=pw-two")
    assert set(found) == {"pw-one", "pw-two"}
    assert url_secrets("amqp//guest:pw-three@host:notaport/") == ["pw-three"]


def test_library_lines_and_tracebacks_are_json_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-in-a-library"
    register_secrets([secret])
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json", "INFO")
        try:
            raise_with(secret)
        except ConnectionError:
            logging.getLogger("aio_pika.robust_connection").exception("Connection attempt to amqp://u:%s@h/", secret)
            get_logger("gateway.test").exception("our_line", detail=f"token={secret}")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()  # later tests' loggers must not write to this test's stderr
    text = err.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 2
    assert secret not in text
    assert "***" in lines[0]["event"]
    assert "***" in lines[0]["exception"]
    assert lines[1]["detail"] == "token=***"


def raise_with(secret: str) -> None:
    raise ConnectionError(f"could not log in with {secret}")


@pytest.fixture(autouse=True)
def _forget_secrets() -> None:
    telemetry._secrets.clear()
    telemetry._secret_pattern = None
