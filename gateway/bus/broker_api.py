"""What AMQP cannot tell about the broker, from RabbitMQ's management HTTP API: a queue's
arguments and bindings, an exchange's type and arguments, unacknowledged counts. Used by the
operator commands only (`gateway topology check`, `gateway accounts`); the gateway itself never
needs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from gateway.errors import ApiUnavailable


def default_url(amqp_url: str) -> str:
    """http(s)://user:pass@<the AMQP host>:15672/<vhost>: the plugin's default port, same login."""
    parts = urlsplit(amqp_url)
    tls = parts.scheme == "amqps"
    scheme, port = ("https", 15671) if tls else ("http", 15672)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    creds = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return f"{scheme}://{creds}{parts.hostname or 'localhost'}:{port}/{quote(vhost, safe='')}"


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    arguments: dict[str, Any]
    ready: int
    unacked: int
    consumers: int
    publish_rate: float  # messages per second, as the broker's last sample saw it
    deliver_rate: float


class BrokerApi:
    """`url` as `default_url` builds it: credentials in it, the vhost as its path."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        self._vhost = quote(unquote(parts.path[1:]) if len(parts.path) > 1 else "/", safe="")
        port = f":{parts.port}" if parts.port else ""
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        self._client = httpx.AsyncClient(
            base_url=f"{parts.scheme}://{parts.hostname}{port}/api", auth=auth, timeout=timeout_s
        )

    def __repr__(self) -> str:  # the URL holds credentials
        return f"BrokerApi(vhost={unquote(self._vhost)!r})"

    async def __aenter__(self) -> BrokerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _get(self, path: str) -> Any:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"management API unreachable ({type(exc).__name__})") from None
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise ApiUnavailable(f"management API refused the credentials (HTTP {response.status_code})")
        if response.status_code != 200:
            raise ApiUnavailable(f"management API answered HTTP {response.status_code}")
        return response.json()

    async def queue(self, name: str) -> QueueInfo | None:
        doc = await self._get(f"/queues/{self._vhost}/{quote(name, safe='')}")
        if doc is None:
            return None
        stats = doc.get("message_stats") or {}
        return QueueInfo(
            name=name,
            arguments=doc.get("arguments") or {},
            ready=int(doc.get("messages_ready") or 0),
            unacked=int(doc.get("messages_unacknowledged") or 0),
            consumers=int(doc.get("consumers") or 0),
            publish_rate=float((stats.get("publish_details") or {}).get("rate") or 0.0),
            deliver_rate=float((stats.get("deliver_get_details") or {}).get("rate") or 0.0),
        )

    async def exchange(self, name: str) -> dict[str, Any] | None:
        doc = await self._get(f"/exchanges/{self._vhost}/{quote(name, safe='')}")
        return dict(doc) if doc is not None else None

    async def bindings(self, queue: str) -> list[dict[str, Any]]:
        """The queue's bindings from named exchanges (not the default exchange's implicit one)."""
        doc = await self._get(f"/queues/{self._vhost}/{quote(queue, safe='')}/bindings")
        return [b for b in doc or [] if b.get("source")]
