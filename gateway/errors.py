"""The gateway's own errors, one hierarchy. Each layer translates its libraries' failures into these
at its boundary (the store backends, the broker glue, the provider adapters), so a caller sorts
failures by type, never by message text, and anything else that escapes is a bug, not a
configuration error.

    GatewayError
    ├── ConfigError            a setting, an account or a URL is unusable: exit 2 with one line
    ├── StoreError
    │   ├── StoreUnavailable   the state store cannot be reached now: retried
    │   └── StoreRefused       it answers, and refuses (login, permission, file, URL option, TLS):
    │                          retrying cannot mend it
    ├── PortInUse              a port the gateway should listen on is taken
    ├── BrokerError
    │   ├── BrokerUnavailable  the broker cannot be reached now: retried
    │   ├── BrokerRefused      it answers, and refuses (login, vhost, TLS): retrying cannot mend it
    │   ├── PublishTimeout     no confirm in time: the publish may or may not have happened
    │   ├── StaleDelivery      the delivery's channel is gone: the broker delivers it again
    │   └── ApiUnavailable     the management API cannot be asked (operator tools only)
    ├── ProviderError          (see providers.base.ProviderError: a provider's answer, not raised)
    ├── LookupFailed           the provider cannot say whether a message exists: nothing is resent
    ├── BadWebhook             a webhook body the provider's format cannot read
    └── InvalidNumber          a recipient that is no phone number (also a ValueError)

Nothing here imports the rest of the gateway.
"""

from __future__ import annotations

import ssl


class GatewayError(Exception):
    """Every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting, an account or a URL that cannot work: the message names the setting."""


class StoreError(GatewayError):
    """The state store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (connection refused or lost, a timeout): try again."""


class StoreRefused(StoreError):
    """The store answers and refuses (a wrong password, no permission, an unusable file, a URL
    option the client does not know, a TLS handshake that fails): retrying cannot mend it."""


class PortInUse(GatewayError):
    """Another process listens on the address the gateway should listen on."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"{host}:{port} is already in use by another process")
        self.host, self.port = host, port


class BrokerError(GatewayError):
    """The broker failed a connection, a publish, an ack or a management call."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached now (refused, reset, timed out): try again."""


class BrokerRefused(BrokerError):
    """The broker answers and refuses the connection (a wrong login, a vhost that does not exist or
    is not permitted, a TLS handshake that fails): retrying cannot mend it."""


class PublishTimeout(BrokerError):
    """No confirm within the publish bound: the publish may or may not have happened."""


class StaleDelivery(BrokerError):
    """The delivery's channel was lost: it cannot be acked, and the broker delivers it again."""


class ApiUnavailable(BrokerError):
    """RabbitMQ's management API cannot be asked (not enabled, unreachable, refused)."""


class LookupFailed(GatewayError):
    """The provider could not say whether a message exists; nothing may be resent on this basis."""


class BadWebhook(GatewayError):
    """The body is not a webhook event the gateway can read."""


class InvalidNumber(GatewayError, ValueError):
    """A recipient that is not a phone number the parser can read or place."""


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed (a wrong CA bundle, a certificate that does not match), found in
    the exception or in what it wraps or carries; None when it is no TLS failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return str(getattr(current, "verify_message", None) or current.reason or current)[:200]
        for arg in current.args:
            if isinstance(arg, BaseException):
                nested = tls_failure(arg)
                if nested is not None:
                    return nested
        current = current.__cause__ or current.__context__
    return None
