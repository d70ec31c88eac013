"""The sandbox HTTP server: provider APIs plus a control API under `/_sandbox/`.

Control API (JSON):
- `GET /_sandbox/ledger`: request count, sends, sends per unique_id, one row per send.
- `GET /_sandbox/faults`, `POST /_sandbox/faults` (a `FaultRule`), `DELETE /_sandbox/faults`.
- `POST /_sandbox/config` `{"duplicate_control": bool, "mobizon_home": {key: host}, "mobizon_rate_per_s": n}`.
- `POST /_sandbox/reset`: forget sends and faults.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import PortInUse
from gateway.obs.logs import get_logger
from gateway.sandbox.dlr import DlrConfig
from gateway.sandbox.mobizon import MobizonApi
from gateway.sandbox.serwersms import SerwerSmsApi
from gateway.sandbox.state import FaultRule, SandboxState

log = get_logger("gateway.sandbox")
STATE_KEY = web.AppKey("state", SandboxState)
M = TypeVar("M", bound=BaseModel)


class SandboxConfig(BaseModel):
    duplicate_control: bool | None = None
    mobizon_home: dict[str, str] | None = None  # API key -> the Host it must be called on (else code 13)
    mobizon_rate_per_s: float | None = None  # per key and method; 0 turns it off
    mobizon_recipient_codes: dict[str, int] | None = None  # number -> AddRecipients code, once
    dlr: DlrConfig | None = None  # delivery lifecycle and Mobizon webhooks (sandbox/dlr.py)


async def _json_model(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        raise web.HTTPBadRequest(text=exc.json(), content_type="application/json") from None


def build_app(state: SandboxState | None = None) -> web.Application:
    state = state or SandboxState()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app.add_routes(SerwerSmsApi(state).routes())
    mobizon = MobizonApi(state)
    app.add_routes(mobizon.routes())

    async def ledger(_request: web.Request) -> web.Response:
        return web.json_response(state.ledger())

    async def polls(_request: web.Request) -> web.Response:
        return web.json_response(state.polled)

    async def faults(_request: web.Request) -> web.Response:
        return web.json_response(state.faults.describe())

    async def add_fault(request: web.Request) -> web.Response:
        rule = await _json_model(request, FaultRule)
        return web.json_response({"id": state.faults.add(rule)}, status=201)

    async def clear_faults(_request: web.Request) -> web.Response:
        state.faults.clear()
        return web.json_response({"cleared": True})

    def current() -> web.Response:
        return web.json_response(
            {
                "duplicate_control": state.duplicate_control,
                "mobizon_home": state.mobizon_home,
                "mobizon_rate_per_s": state.mobizon_rate_per_s,
                "mobizon_recipient_codes": state.mobizon_recipient_codes,
                "dlr": state.lifecycle.config.model_dump(),
            }
        )

    async def show_config(_request: web.Request) -> web.Response:
        return current()

    async def configure(request: web.Request) -> web.Response:
        """Merges into the configuration: only the keys given change (a webhook by its API key)."""
        cfg = await _json_model(request, SandboxConfig)
        if cfg.duplicate_control is not None:
            state.duplicate_control = cfg.duplicate_control
        if cfg.mobizon_home is not None:
            state.mobizon_home = dict(cfg.mobizon_home)
        if cfg.mobizon_recipient_codes is not None:
            state.mobizon_recipient_codes = dict(cfg.mobizon_recipient_codes)
        if cfg.mobizon_rate_per_s is not None:
            state.mobizon_rate_per_s = cfg.mobizon_rate_per_s or None
        if cfg.dlr is not None:
            was = state.lifecycle.config
            given = {name: getattr(cfg.dlr, name) for name in cfg.dlr.model_fields_set}
            if "webhooks" in given:
                given["webhooks"] = {**was.webhooks, **given["webhooks"]}
            state.lifecycle.config = was.model_copy(update=given)
        return current()

    async def reset(_request: web.Request) -> web.Response:
        state.reset()
        mobizon.reset()
        return web.json_response({"reset": True})

    app.add_routes(
        [
            web.get("/_sandbox/ledger", ledger),
            web.get("/_sandbox/faults", faults),
            web.get("/_sandbox/polls", polls),
            web.post("/_sandbox/faults", add_fault),
            web.delete("/_sandbox/faults", clear_faults),
            web.get("/_sandbox/config", show_config),
            web.post("/_sandbox/config", configure),
            web.post("/_sandbox/reset", reset),
        ]
    )

    async def close_lifecycle(_app: web.Application) -> None:
        await state.lifecycle.close()

    app.on_cleanup.append(close_lifecycle)
    return app


async def start_sandbox(host: str, port: int, state: SandboxState | None = None) -> web.AppRunner:
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise
    log.info("sandbox_listening", url=f"http://{host}:{port}")
    return runner


async def serve(host: str, port: int) -> None:
    """`gateway sandbox`: serve until SIGTERM or SIGINT."""
    runner = await start_sandbox(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
