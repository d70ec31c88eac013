"""Opening a broker connection, with the libraries' failures translated into the gateway's own:
`BrokerRefused` when the broker answered no (login, vhost, TLS: retrying cannot mend it) and
`BrokerUnavailable` when it could not be reached (retried by the service, exit 4 in the CLI).
The service and the operator commands open their connections here, so both read a failure alike.

The service's connections write through a `CoalescingWriter`: aiormq writes one socket call per
frame set (a publish, an ack), and a batch's hundred outcomes each cost a `send` system call. The
writer gathers what is written in one turn of the event loop and hands it to the socket at the
start of the next turn, in one call. It relies on two public extension points, aiormq's
`transport_factory` and aio-pika's `connection_class`, and on aiormq's `FRAME_BUFFER_SIZE`;
`tests/integration/test_wire.py` pins the write count, so an upgrade that drops any of them shows
there."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
import pamqp.exceptions
from aio_pika.abc import AbstractConnection, AbstractRobustConnection, ConnectionParameter
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from gateway.errors import BrokerRefused, BrokerUnavailable, tls_failure

# aiormq queues at most this many frame sets between the channels and the connection's writer. At
# its default, 10, a channel publishing a batch waits for the writer after ten publishes, and the
# rest of the batch reaches the socket one publish per turn of the loop, which leaves nothing to
# coalesce. The queue is not the socket's backpressure (the writer does not drain between frames);
# what it holds is bounded by the consumers' prefetch.
FRAME_BUFFER = 1024
aiormq.Connection.FRAME_BUFFER_SIZE = max(aiormq.Connection.FRAME_BUFFER_SIZE, FRAME_BUFFER)


async def connect(url: str | URL, *, timeout_s: float) -> AbstractConnection:
    """A plain connection: an operator command that loses the broker fails instead of waiting."""
    try:
        return await aio_pika.connect(url, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
        raise translate(exc, url) from None


async def connect_robust(url: str | URL, *, timeout_s: float, coalesce: bool = True) -> AbstractRobustConnection:
    """A connection that reconnects by itself once it has been made (the service's), writing
    through a `CoalescingWriter` unless `coalesce` is false."""
    url = URL(str(url))
    try:
        if not coalesce:
            return await aio_pika.connect_robust(url, timeout=timeout_s)
        # aio-pika reads the URL's query only when it is given no parameters: they go in as such.
        params: dict[str, Any] = {**url.query, "transport_factory": CoalescingTransports(url.scheme == "amqps")}
        return await aio_pika.connect_robust(url, timeout=timeout_s, connection_class=_CoalescingConnection, **params)
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


class CoalescingWriter:
    """A `StreamWriter` that hands everything written in one turn of the event loop to the
    transport in one call, at the start of the next turn. Order is kept: every write, drain,
    end-of-file and close goes through the pending bytes first. Backpressure is the transport's
    own: `drain` writes what is pending, then waits as the stream's drain does."""

    def __init__(self, inner: asyncio.StreamWriter) -> None:
        self._inner = inner
        self._transport = inner.transport
        self._pending: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def _flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._transport.is_closing():
            return  # the connection is gone: its reader reports that, as it would without this writer
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def drain(self) -> None:
        self._flush()
        await self._inner.drain()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._inner.write_eof()

    def close(self) -> None:
        self._flush()
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


class CoalescingTransports(TransportFactory):
    """aiormq's own TCP or TLS transport, written through a `CoalescingWriter`."""

    def __init__(self, tls: bool) -> None:
        self._inner: TransportFactory = TLSTransportFactory() if tls else TCPTransportFactory()

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        return reader, CoalescingWriter(writer)  # type: ignore[return-value]  # a StreamWriter by its methods


class _CoalescingConnection(aio_pika.RobustConnection):
    """aio-pika passes on to aiormq only the parameters it declares: this one declares the
    transport factory too."""

    PARAMETERS = (
        *aio_pika.RobustConnection.PARAMETERS,
        ConnectionParameter(name="transport_factory", parser=lambda v: v, is_kwarg=True),
    )
