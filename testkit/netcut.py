"""A TCP proxy on 127.0.0.1 that can cut the network the way a lost node does.

`drop()` keeps every connection open and silently throws away whatever either side sends, and
new connections are accepted and treated the same: no FIN, no RST, no answer, as when the host
behind a connection vanishes (a node lost, a partition). Only the client's own timeouts can notice.
`heal()` forwards again, for new connections only: the ones that lived through the cut stay dead,
as a TCP connection to a host that went away does.

`refuse()` is the other way a server goes away, its process killed: every connection is reset and
new ones are refused (nothing listens on the port); `listen()` takes connections on the same port
again, as the restarted process would. What stands behind the proxy keeps its state meanwhile.

Runs in the caller's event loop (`async with NetCut(target_port) as cut`), or as a process for
the chaos suite: `python -m testkit.netcut --target PORT [--port PORT]`, SIGUSR1 drops, SIGUSR2
heals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
from types import TracebackType
from typing import Any


class NetCut:
    def __init__(self, target_port: int, port: int = 0, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.dropping = False
        self.dropped_bytes = 0
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()  # both ends of every forwarding connection
        self._doomed: set[asyncio.StreamWriter] = set()  # every connection alive during a cut
        self._tasks: set[asyncio.Task[Any]] = set()  # connection handlers and their pipes
        self._writers: set[asyncio.StreamWriter] = set()  # every socket opened, closed with the proxy
        self._closing = asyncio.Event()  # what a doomed connection waits for: the proxy's end

    async def start(self) -> NetCut:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> NetCut:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def drop(self) -> None:
        self.dropping = True
        self._doomed |= self._live  # idle or not, a connection to a vanished host is gone

    def heal(self) -> None:
        self.dropping = False

    async def refuse(self) -> None:
        """Reset every connection and stop listening: connects are refused until `listen()`."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        self._live.clear()

    async def listen(self) -> None:
        """Take connections again, on the same port."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def close(self) -> None:
        """Stop: every socket closed with a reset (a client still holding on lets go), every
        connection's handler ended by itself (a cancelled stream handler makes asyncio log it)."""
        if self._server is not None:
            self._server.close()
        self._closing.set()
        for writer in self._writers:
            _reset(writer)
        _done, late = await asyncio.wait(self._tasks, timeout=5) if self._tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._tasks.add(handler)
            handler.add_done_callback(self._tasks.discard)
        if self.dropping:
            self._doomed.add(writer)
            await self._swallow(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        pair = {writer, up_writer}
        self._live |= pair
        legs = [
            asyncio.create_task(self._pipe(reader, up_writer, pair)),
            asyncio.create_task(self._pipe(up_reader, writer, pair)),
        ]
        for leg in legs:
            self._tasks.add(leg)
            leg.add_done_callback(self._tasks.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*legs, return_exceptions=True)
        self._live -= pair
        for w in pair:
            w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: set[asyncio.StreamWriter]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if pair & self._doomed:
                    self.dropped_bytes += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:  # reset, or closed by the proxy's own end
            return
        if not pair & self._doomed:  # a clean close passes through; a doomed connection never ends
            writer.close()
        else:
            await self._closing.wait()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                self.dropped_bytes += len(data)
        await self._closing.wait()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), not a FIN: the peer sees the connection torn down."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _main(target: int, port: int) -> None:
    cut = await NetCut(target, port).start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, cut.drop)
    loop.add_signal_handler(signal.SIGUSR2, cut.heal)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"netcut 127.0.0.1:{cut.port} -> 127.0.0.1:{target}", flush=True)
    await stop.wait()
    await cut.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_main(args.target, args.port))
