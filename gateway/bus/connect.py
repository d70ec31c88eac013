"""Opening a broker connection, with the libraries' failures translated into the gateway's own:
`BrokerRefused` when the broker answered no (login, vhost, TLS: retrying cannot mend it) and
`BrokerUnavailable` when it could not be reached (retried by the service, exit 4 in the CLI).
The service and the operator commands open their connections here, so both read a failure alike."""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq.exceptions
import pamqp.exceptions
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from yarl import URL

from gateway.errors import BrokerRefused, BrokerUnavailable, tls_failure


async def connect(url: str | URL, *, timeout_s: float) -> AbstractConnection:
    """A plain connection: an operator command that loses the broker fails instead of waiting."""
    try:
        return await aio_pika.connect(url, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
        raise translate(exc, url) from None


async def connect_robust(url: str | URL, *, timeout_s: float) -> AbstractRobustConnection:
    """A connection that reconnects by itself once it has been made (the service's)."""
    try:
        return await aio_pika.connect_robust(url, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
        raise translate(exc, url) from None


def translate(exc: BaseException, url: str | URL) -> BaseException:
    """The gateway's error for a failed connect; a failure that is neither a refusal nor the broker
    being away (a bug) is given back as it is."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        user = URL(str(url)).user or "guest"
        return BrokerRefused(f"the broker refused the login of user {user!r} (wrong user or password)")
    if isinstance(exc, pamqp.exceptions.AMQPInternalError):
        # The broker closed the handshake instead of opening the connection: a vhost that does not
        # exist, or that the user may not use. Its reason travels in the Connection.Close frame.
        reason = next((str(_reply_text(a)) for a in exc.args if _reply_text(a) is not None), None)
        vhost = URL(str(url)).path.removeprefix("/") or "/"
        return BrokerRefused(f"the broker refused the connection to vhost {vhost!r}: {reason or 'no reason given'}")
    if (tls := tls_failure(exc)) is not None:
        return BrokerRefused(f"TLS: {tls}")
    if isinstance(exc, OSError | TimeoutError | aiormq.exceptions.AMQPConnectionError):
        text = str(exc).split("\n")[0][:200]
        return BrokerUnavailable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return exc


def _reply_text(arg: Any) -> Any:
    return getattr(arg, "reply_text", None)
