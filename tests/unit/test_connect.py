"""The bus layer sorts a failed broker connect into the gateway's own errors: a refusal that
retrying cannot mend, the broker being away, or (a bug) the exception as it was."""

from __future__ import annotations

import ssl

import aiormq.exceptions
import pamqp.exceptions
from pamqp.commands import Connection

from gateway.bus.connect import translate
from gateway.errors import BrokerRefused, BrokerUnavailable

URL = "amqp://app:hunter2@broker:5672/sms"


def test_a_refused_login_names_the_user_and_never_the_password() -> None:
    out = translate(aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"), URL)
    assert isinstance(out, BrokerRefused)
    assert "'app'" in str(out)
    assert "hunter2" not in str(out)


def test_a_vhost_the_broker_refuses_names_it_and_the_reason() -> None:
    close = Connection.Close(530, "NOT_ALLOWED - vhost sms not found")
    out = translate(pamqp.exceptions.AMQPInternalError("one of ['Connection.OpenOk']", close), URL)
    assert isinstance(out, BrokerRefused)
    assert str(out) == "the broker refused the connection to vhost 'sms': NOT_ALLOWED - vhost sms not found"


def test_a_failed_tls_check_is_a_refusal() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "self-signed certificate in certificate chain"
    wrapped = aiormq.exceptions.AMQPConnectionError("connect failed")
    wrapped.__cause__ = failure
    out = translate(wrapped, URL)
    assert isinstance(out, BrokerRefused)
    assert str(out) == "TLS: self-signed certificate in certificate chain"


def test_a_broker_that_is_away_is_unavailable_and_a_bug_stays_itself() -> None:
    assert isinstance(translate(ConnectionRefusedError(111, "Connection refused"), URL), BrokerUnavailable)
    assert isinstance(translate(TimeoutError(), URL), BrokerUnavailable)
    bug = KeyError("oops")
    assert translate(bug, URL) is bug
