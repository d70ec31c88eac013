"""The gateway's HTTP port: `/healthz` (the process runs), `/readyz` (it can do its job),
`/metrics` (Prometheus), and `POST /dlr/<provider>/<account>` (delivery-report webhooks).

The port is open to whoever can reach it, so nothing a client does may hold the process:
- `ConnectionGuard` caps the open connections (at the cap the oldest one still owing its request
  head is closed to make room; with none such, the new one is closed before a byte is read),
  closes a connection that has not sent a whole request head within `header_timeout_s` (slow or
  half-open clients) and one idle between requests for `idle_timeout_s`;
- a webhook's body must arrive within `BODY_TIMEOUT_S`, and at most `webhook_concurrency`
  webhooks are handled at once, at most `webhook_rate_per_s` a second: a webhook past the rate
  waits up to `WEBHOOK_QUEUE_S` for its turn, and one that cannot have it by then, or finds every
  slot taken, is answered 503 before its body is read (Mobizon retries);
- a client that goes away mid-request is one log line, no traceback (aiohttp's own logger).
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import PortInUse
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger

log = get_logger("gateway.ops.web")

# What is wrong right now (empty: ready), and what an operator should see when ready.
Readiness = Callable[[], Awaitable[list[str]]]
Details = Callable[[], dict[str, Any]]
# A webhook: (provider, account, body or None when too large, content type) -> (HTTP status, reason).
Webhook = Callable[[str, str, bytes | None, str], Awaitable[tuple[int, str]]]
MAX_WEBHOOK_BYTES = 16 * 1024
BODY_TIMEOUT_S = 5.0  # a webhook's body, once its head is in
REAP_EVERY_S = 0.5  # how often connections past their deadline are closed
# A webhook past the rate waits for its token up to this long (Mobizon waits 5 s for an answer);
# beyond that it is answered 503 at once.
WEBHOOK_QUEUE_S = 1.0


class _Closed(asyncio.Protocol):
    """The protocol of a connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard told when it opens and closes."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self._guard = guard
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.opened(self.inner, transport)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed(self.inner)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class ConnectionGuard:
    """Bounds what HTTP clients can hold (module docstring). A connection has a deadline while it
    owes a request head (`header_timeout_s` from its start or from its last answer; `idle_timeout_s`
    once it has been answered) and none while a handler runs; past it, it is closed."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_s: float,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self._header_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._open: dict[Any, tuple[asyncio.BaseTransport, float, str]] = {}  # protocol -> transport, deadline

    @property
    def open_count(self) -> int:
        return len(self._open)

    def factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if len(self._open) >= self.max_connections and not self._evict():
                m.HTTP_CLOSED.labels("refused").inc()
                return _Closed()
            return _Tracked(self, inner())

        return make

    def _evict(self) -> bool:
        """Make room for a new connection by closing the oldest one still owing its request head.
        Held open by slow clients, the cap would otherwise refuse everyone else, a health probe
        too (which Kubernetes answers by restarting the pod); a client that sends its head at once
        keeps its slot. False when every connection is being served."""
        waiting = [(deadline, p, t) for p, (t, deadline, why) in self._open.items() if why == "header_timeout"]
        if not waiting:
            return False
        _deadline, protocol, transport = min(waiting, key=lambda w: w[0])
        self._open.pop(protocol, None)
        m.HTTP_CLOSED.labels("evicted").inc()
        _abort(transport)
        return True

    def opened(self, protocol: Any, transport: asyncio.BaseTransport) -> None:
        self._open[protocol] = (transport, self._clock() + self._header_s, "header_timeout")
        m.HTTP_CONNECTIONS.set(len(self._open))

    def closed(self, protocol: Any) -> None:
        self._open.pop(protocol, None)
        m.HTTP_CONNECTIONS.set(len(self._open))

    def busy(self, protocol: Any) -> None:
        """A handler runs on the connection: no deadline until it has answered."""
        if (entry := self._open.get(protocol)) is not None:
            self._open[protocol] = (entry[0], float("inf"), "")

    def answered(self, protocol: Any) -> None:
        """The next request head must come within the idle timeout."""
        if (entry := self._open.get(protocol)) is not None:
            self._open[protocol] = (entry[0], self._clock() + self.idle_timeout_s, "idle")

    def reap(self) -> int:
        """Close every connection past its deadline; returns how many."""
        now = self._clock()
        late = [(p, t, why) for p, (t, deadline, why) in self._open.items() if deadline <= now]
        for protocol, transport, why in late:
            self._open.pop(protocol, None)
            m.HTTP_CLOSED.labels(why).inc()
            _abort(transport)
        if late:
            m.HTTP_CONNECTIONS.set(len(self._open))
        return len(late)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            self.reap()


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is larger than `limit` (never more is read)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(8192):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Bucket:
    """A token bucket of this process: `rate` a second, as many at once, and tokens promised ahead
    for at most `queue_s` seconds of its rate."""

    def __init__(self, rate: float, queue_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._tokens = rate
        self._floor = 1.0 - rate * queue_s  # tokens may be promised down to this (a debt)
        self._clock = clock
        self._at = clock()

    def take(self) -> float | None:
        """Seconds until the token taken now is the caller's (0: at once), or None when that would
        be later than `queue_s`: nothing is taken."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        if self._tokens < self._floor:
            return None
        self._tokens -= 1
        return -self._tokens / self._rate


_BUSY_BODY = b'{"status": "busy"}'  # answered before the body is read: a flood past the bounds costs little
_ANSWERS: dict[str, bytes] = {}  # a webhook answer's body by reason (a small, fixed set)


def _answer_body(reason: str) -> bytes:
    body = _ANSWERS.get(reason)
    if body is None:
        body = _ANSWERS[reason] = json.dumps({"status": reason}).encode()
    return body


def build_app(
    readiness: Readiness,
    details: Details,
    webhook: Webhook | None = None,
    *,
    guard: ConnectionGuard | None = None,
    webhook_concurrency: int = 64,
    webhook_rate_per_s: float = 200.0,
) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await readiness()
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready", **details()})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=await asyncio.to_thread(m.render), headers={"Content-Type": CONTENT_TYPE_LATEST})

    webhooks_running = 0
    bucket = Bucket(webhook_rate_per_s, WEBHOOK_QUEUE_S)

    async def dlr(request: web.Request) -> web.Response:
        nonlocal webhooks_running
        assert webhook is not None
        delay = bucket.take()
        if delay:
            # Past the rate: the request waits for its turn (a client that sends its next webhook
            # once this one is answered is slowed to the rate rather than answered at once, again
            # and again); its body stays unread meanwhile.
            await asyncio.sleep(delay)
        if delay is None or webhooks_running >= webhook_concurrency:
            m.DLR_REJECTED.labels("(any)", "busy").inc()
            return web.Response(body=_BUSY_BODY, status=503, content_type="application/json")
        webhooks_running += 1
        try:
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    body = await read_limited(request, MAX_WEBHOOK_BYTES)
            except TimeoutError:
                m.DLR_REJECTED.labels("(any)", "slow_body").inc()
                return web.json_response({"status": "slow_body"}, status=408, headers={"Connection": "close"})
            except OSError as exc:  # the client went away mid-body: nobody to answer
                m.DLR_REJECTED.labels("(any)", "client_gone").inc()
                log.info("dlr_client_gone", error=type(exc).__name__)
                return web.Response(status=400)
            status, reason = await webhook(
                request.match_info["provider"], request.match_info["account"], body, request.content_type
            )
        finally:
            webhooks_running -= 1
        return web.Response(body=_answer_body(reason), status=status, content_type="application/json")

    middlewares = []
    if guard is not None:

        @web.middleware
        async def guarded(request: web.Request, handler: Any) -> web.StreamResponse:
            guard.busy(request.protocol)
            try:
                response: web.StreamResponse = await handler(request)
            finally:
                guard.answered(request.protocol)
            return response

        middlewares.append(guarded)

    app = web.Application(middlewares=middlewares)
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    if webhook is not None:
        app.add_routes([web.post("/dlr/{provider}/{account}", dlr)])
    return app


ACCEPT_LOG_EVERY_S = 10.0


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every accept that fails for want of files or memory (and tries again a second
    later) with a traceback; while that lasts, one line per `ACCEPT_LOG_EVERY_S` with a count."""
    previous = loop.get_exception_handler()
    state = {"last": -ACCEPT_LOG_EVERY_S, "count": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            m.HTTP_ACCEPT_ERRORS.inc()
            state["count"] += 1
            now = time.monotonic()
            if now - state["last"] >= ACCEPT_LOG_EVERY_S:
                exc = context.get("exception")
                log.error("http_accept_failed", error=f"{type(exc).__name__}: {exc}", count=state["count"])
                state["last"], state["count"] = now, 0
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class HttpPort:
    """A listening port served by an aiohttp application through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server, reaper: asyncio.Task[None]) -> None:
        self._runner = runner
        self._server = server
        self._reaper = reaper

    @property
    def url(self) -> str:
        """Where it listens, with the port the system chose when 0 was asked for."""
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def cleanup(self) -> None:
        self._reaper.cancel()
        self._server.close()
        await self._runner.cleanup()


async def serve(app: web.Application, host: str, port: int, guard: ConnectionGuard) -> HttpPort:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=guard_idle(guard))
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(guard.factory(runner.server), host, port, reuse_address=True)
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise
    return HttpPort(runner, server, asyncio.create_task(guard.run(), name="http guard"))


def guard_idle(guard: ConnectionGuard) -> float:
    """aiohttp's own keep-alive close, a little after the guard's (which counts it)."""
    return guard.idle_timeout_s + 1.0
