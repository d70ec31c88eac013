"""The provider HTTP pool is sized for the most calls the adaptive limit may have in flight,
seen from outside: a local server that holds every request counts the connections it gets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.config import Account
from gateway.providers import build_adapter
from gateway.providers.http import make_client
from gateway.providers.mobizon import api as mobizon_api
from gateway.providers.serwersms import adapter as serwersms_adapter

SERWERSMS, MOBIZON = serwersms_adapter, mobizon_api  # the modules that build the clients


async def test_the_pool_holds_twice_the_concurrency_and_no_more() -> None:
    open_now = most = 0
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        open_now -= 1

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}", 10, 3)
    try:
        calls = [asyncio.create_task(client.get("/")) for _ in range(10)]
        for _ in range(100):  # until the pool is full (and stays at its size)
            await asyncio.sleep(0.01)
            if most >= 6:
                break
        await asyncio.sleep(0.1)  # room for a seventh connection, were the pool larger
        assert most == 6
        release.set()
        answers = await asyncio.gather(*calls)
        assert [a.status_code for a in answers] == [200] * 10  # the other four waited for the pool
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("doc", "module"),
    [
        (
            {"name": "pl", "provider": "serwersms", "base_url": "https://api2.serwersms.pl", "token": "t"},
            serwersms_adapter,
        ),
        ({"name": "kz", "provider": "mobizon", "base_url": "https://api.mobizon.kz", "api_key": "k"}, mobizon_api),
    ],
)
async def test_the_pool_follows_max_concurrency_not_the_starting_concurrency(
    doc: dict[str, str], module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sized from the starting concurrency (1 here: 2 connections), the pool was a hidden limit
    below the adaptive one (12): after a reconnect, redeliveries and lookups queued for it until
    they failed with PoolTimeout."""
    sized: list[int] = []

    def spy(base_url: str, timeout_s: float, concurrency: int, **kwargs: Any) -> httpx.AsyncClient:
        sized.append(concurrency)
        return make_client(base_url, timeout_s, concurrency, **kwargs)

    monkeypatch.setattr(module, "make_client", spy)
    adapter = build_adapter(Account.model_validate({**doc, "concurrency": 1, "max_concurrency": 12}))
    await adapter.close()
    assert sized == [12]


def test_a_first_request_imports_nothing_the_http_module_did_not() -> None:
    """httpcore imports sniffio, anyio's core and anyio's asyncio backend lazily, on a client's first
    request; one made while the web port held every file descriptor failed opening a module's file
    (EMFILE). Loading the HTTP module must have imported them already."""
    import subprocess
    import sys

    code = """
import asyncio, sys
from aiohttp import web
from gateway.providers.http import make_client

async def main():
    app = web.Application()
    app.router.add_post("/x", lambda request: web.json_response({}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = make_client(f"http://127.0.0.1:{port}", 5, 2)
    before = set(sys.modules)
    await client.post("/x", json={})
    print(sorted(set(sys.modules) - before))
    await client.aclose()
    await runner.cleanup()

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout
