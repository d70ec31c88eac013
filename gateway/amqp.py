"""The broker connection, with its writes coalesced: one socket write per event-loop turn.

aiormq writes every publish (method, header and body frames), every ack and every consume to
the socket on its own: a `send()` system call and a TCP segment each. A gateway settling a batch
of 100 publishes 100 outcomes and acks in one go, so it paid 100+ system calls where one would
do, and the broker read as many small segments. Here the connection's writer keeps what is
written during one turn of the event loop and hands it to the socket at the end of that turn,
in one piece (as TCP_CORK or Nagle would, without their delays): the order of the bytes is
unchanged, nothing waits for a timer, and `drain()` (flow control, confirms the caller waits on)
writes first.

aiormq takes a transport factory (its public `transport_factory` argument); aio-pika filters the
connection's keyword arguments, so `connect_robust` gets a connection class that passes it on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiormq.connection import TCPTransportFactory, TLSTransportFactory
from yarl import URL

FLUSH_BYTES = 256 * 1024  # past this much buffered, write at once rather than at the end of the turn


class CoalescingWriter:
    """An `asyncio.StreamWriter` whose writes in one loop turn reach the socket as one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._chunks: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.writes = 0  # socket writes handed to the transport (the tests read it)

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if not self._writer.is_closing():  # a lost connection: aiormq's reader reports it
            self.writes += 1
            self._writer.write(data)

    async def drain(self) -> None:
        self.flush()
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, wait_closed, transport, get_extra_info, ...
        return getattr(self._writer, name)


class _Coalescing:
    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await super().create(url, **kwargs)  # type: ignore[misc]
        return reader, CoalescingWriter(writer)  # type: ignore[return-value]


class CoalescingTCP(_Coalescing, TCPTransportFactory):
    pass


class CoalescingTLS(_Coalescing, TLSTransportFactory):
    pass


class CoalescingConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection on the coalescing transport (reconnects included)."""

    def __init__(self, url: URL, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        tls = self.url.scheme == "amqps"
        self.kwargs["transport_factory"] = CoalescingTLS() if tls else CoalescingTCP()


async def connect_robust(url: str | URL, **kwargs: Any) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, connection_class=CoalescingConnection, **kwargs)
