"""Egress through a forward proxy: with GATEWAY_PROVIDER_PROXY_FROM_ENV the provider calls go
through HTTP_PROXY / HTTPS_PROXY (and NO_PROXY is honoured); without it the environment's proxy
is ignored and the provider is called directly."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from aiohttp import web

from testkit import Bus, Process, Sandbox, account_doc, delete_account_queues, free_port, gateway_env, new_account_name
from testkit import request as sms

pytestmark = pytest.mark.e2e


async def forward_proxy(port: int, seen: list[str]) -> web.AppRunner:
    """A minimal HTTP forward proxy: the request line holds the absolute target URL."""
    client = httpx.AsyncClient(trust_env=False, timeout=10)

    async def relay(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.url}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")}
        answer = await client.request(request.method, str(request.url), content=await request.read(), headers=headers)
        return web.Response(body=answer.content, status=answer.status_code, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app.on_cleanup.append(lambda _app: client.aclose())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.parametrize(("from_env", "proxied"), [(True, True), (False, False)], ids=["setting-on", "setting-off"])
async def test_provider_calls_go_through_the_proxy_only_when_allowed(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], from_env: bool, proxied: bool
) -> None:
    _, sandbox = sandbox_process
    seen: list[str] = []
    proxy_port = free_port()
    proxy = await forward_proxy(proxy_port, seen)
    name = new_account_name()
    port = free_port()
    env = gateway_env(
        accounts=[account_doc(name, sandbox.port)],
        http_port=port,
        state_path=str(tmp_path / "state.sqlite3"),
        provider_proxy_from_env=from_env,
    )
    env.update({"HTTP_PROXY": f"http://127.0.0.1:{proxy_port}", "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}"})
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    proc = Process(["run"], env, tmp_path / "gateway.log")
    try:
        proc.wait_http(port)
        async with Bus.open([name]) as bus:
            await bus.publish(name, sms("proxy-1"))
            await bus.wait_for(outcomes=1, timeout=30)
        assert [d["status"] for d in bus.outcome_docs()] == ["accepted"]
    finally:
        assert proc.terminate() == 0
        proc.close()
        await proxy.cleanup()
        await delete_account_queues([name])
    assert sandbox.sends_of(name, "proxy-1") == 1
    through = [line for line in seen if "messages/send" in line]
    assert len(through) == (1 if proxied else 0), seen
