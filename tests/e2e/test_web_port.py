"""The HTTP port against clients that hold connections: the gateway runs as a process with a low
file limit, and nothing a client does on its port may stop it sending."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from testkit import Bus, Process, Sandbox, account_doc, free_port, gateway_env, new_account_name, request

pytestmark = pytest.mark.e2e

FILES = 256  # the gateway's file limit, soft and hard: it cannot raise it
# Numbers of three countries the process has not read a number of before (their metadata is loaded
# lazily by phonenumbers unless the gateway loads it at start).
NUMBERS = ["+819012345678", "+5511987654321", "+27821234567"]


def limited_gateway(tmp: Path, accounts: list[dict[str, object]], port: int) -> Process:
    tmp.mkdir(parents=True, exist_ok=True)
    env = gateway_env(accounts=accounts, http_port=port, state_path=str(tmp / "state.sqlite3"), http_header_timeout_s=2)
    code = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FILES}, {FILES})); "
        "sys.argv = ['gateway', 'run']; runpy.run_module('gateway', run_name='__main__')"
    )
    proc = Process([], env, tmp / "gateway.log", command=[sys.executable, "-c", code])
    proc.wait_http(port)
    return proc


def half_open(port: int, count: int) -> list[socket.socket]:
    """Connections that send half a request head and then nothing."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /dlr/mobizon/x HTTP/1.1\r\nHost: gateway\r\nContent-Le")
        except OSError:
            s.close()
            continue
        held.append(s)
    return held


def closed_by_server(sockets: list[socket.socket]) -> int:
    gone = 0
    for s in sockets:
        s.setblocking(False)
        try:
            gone += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            gone += 1
    return gone


async def test_connections_past_the_file_limit_neither_wedge_the_process_nor_stop_sending(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], procs: list[Process]
) -> None:
    _, sandbox = sandbox_process
    name = new_account_name()
    port = free_port()
    gw = limited_gateway(tmp_path, [account_doc(name, sandbox.port, linger_ms=20)], port)
    procs.append(gw)
    held: list[socket.socket] = []
    try:
        async with Bus.open([name]) as bus:
            # More connections than the process has files, opened while requests arrive.
            held += await asyncio.to_thread(half_open, port, 150)
            for i, number in enumerate(NUMBERS):
                await bus.publish(name, request(f"far-{i}", to=number))
            held += await asyncio.to_thread(half_open, port, 250)
            # Every slot is held by a slow client now: a probe still gets through (the oldest slow
            # connection makes room), or Kubernetes would restart the pod under the flood.
            async with httpx.AsyncClient(timeout=5) as client:
                probe = (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
            await bus.wait_for(outcomes=len(NUMBERS), timeout=30)
            # The half-open ones are closed by the gateway (no whole head within 2 s), not kept.
            await asyncio.sleep(3.5)
            gone = closed_by_server(held)
            async with httpx.AsyncClient(timeout=5) as client:
                health = (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
                metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        statuses = Counter(d["status"] for d in bus.outcome_docs())
    finally:
        for s in held:
            s.close()
    assert statuses == {"accepted": len(NUMBERS)}, gw.log()[-2000:]
    assert health == 200
    assert probe == 200
    assert gone == len(held), f"{len(held) - gone} of {len(held)} slow connections still open"
    assert 'sms_http_connections_closed_total{reason="header_timeout"}' in metrics
    started = time.monotonic()
    assert gw.terminate(timeout=30) == 0
    assert time.monotonic() - started < 30
    assert '"gateway_stopped"' in gw.log()
    assert "Traceback" not in gw.log()
