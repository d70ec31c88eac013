"""The gateway's HTTP port: `/healthz` (the process runs), `/readyz` (it can do its job),
`/metrics` (Prometheus). Delivery-report intake (`/dlr/<provider>/...`) will join them here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics as m

# What is wrong right now (empty: ready), and what an operator should see when ready.
Readiness = Callable[[], Awaitable[list[str]]]
Details = Callable[[], dict[str, Any]]


def build_app(readiness: Readiness, details: Details) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await readiness()
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready", **details()})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
