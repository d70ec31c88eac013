"""The gateway's HTTP port: `/healthz` (the process runs), `/readyz` (it can do its job),
`/metrics` (Prometheus), and `POST /dlr/<provider>/<account>` (delivery-report webhooks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics as m

# What is wrong right now (empty: ready), and what an operator should see when ready.
Readiness = Callable[[], Awaitable[list[str]]]
Details = Callable[[], dict[str, Any]]
# A webhook: (provider, account, body or None when too large, content type) -> (HTTP status, reason).
Webhook = Callable[[str, str, bytes | None, str], Awaitable[tuple[int, str]]]
MAX_WEBHOOK_BYTES = 16 * 1024


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


def build_app(readiness: Readiness, details: Details, webhook: Webhook | None = None) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await readiness()
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready", **details()})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dlr(request: web.Request) -> web.Response:
        assert webhook is not None
        body = await read_limited(request, MAX_WEBHOOK_BYTES)
        status, reason = await webhook(
            request.match_info["provider"], request.match_info["account"], body, request.content_type
        )
        return web.json_response({"status": reason}, status=status)

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    if webhook is not None:
        app.add_routes([web.post("/dlr/{provider}/{account}", dlr)])
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
