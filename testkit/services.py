"""The services the tests and benchmarks run against: RabbitMQ and Redis on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika

from gateway import contract as c

# The broker and Redis the tests use; point them elsewhere (another vhost, another Redis database)
# to run beside other users of the same services.
AMQP_URL = os.environ.get("SMSGW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("SMSGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_VHOST = unquote(urlsplit(AMQP_URL).path[1:]) or "/"
ROOT = Path(__file__).resolve().parent.parent  # the checkout


def free_port() -> int:
    """A port a child server can bind on 127.0.0.1 (see `free_ports`)."""
    return free_ports(1)[0]


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux's default when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now. A connect test is not enough: the
    local end of an outgoing connection refuses connections, yet a bind on it fails."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Redis and RabbitMQ bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(n: int, offset: int = 0) -> list[int]:
    """`n` ports a child server can bind on 127.0.0.1 (with `offset`, port + offset is bindable too:
    a RabbitMQ node's distribution port, a Redis Cluster node's bus port). They lie below the
    ephemeral range, so no outgoing connection takes one between this check and the child's bind
    (CI once lost a Redis Cluster node that way)."""
    low, high = 10000, _ephemeral_low() - offset
    if high - low < 20 * n:  # an unusual ephemeral range: fall back on the bind test alone
        low, high = 21000, 65535 - offset
    found: list[int] = []
    candidate = low + secrets.randbelow(high - low)
    for _ in range(high - low):
        candidate = candidate + 1 if candidate + 1 < high else low
        if bindable(candidate) and (not offset or bindable(candidate + offset)):
            found.append(candidate)
            if len(found) == n:
                return found
    raise RuntimeError(f"no {n} free ports in {low}-{high} on 127.0.0.1")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout} s")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


async def delete_account_queues(accounts: set[str] | list[str]) -> None:
    """Tests make a queue per throwaway account; remove them so the broker does not fill up."""
    if not accounts:
        return
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in accounts:
            for lane in c.LANES:
                await channel.queue_delete(c.account_queue(name, lane))


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run `rabbitmqctl` against the local node; fail loudly when it does not work."""
    try:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError("rabbitmqctl is not installed: the broker fault tests need it") from exc
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def close_broker_connections(name_contains: str, node: str | None = None) -> int:
    """Close, from the broker's side, every client connection whose name contains the text (as an
    operator's `rabbitmqctl close_connection` would); returns how many were closed."""
    prefix = ["-n", node] if node else []
    # The table form names pids as close_connection wants them (<rabbit@host.N.N.N>); the JSON form does not.
    closed = 0
    for line in rabbitmqctl(*prefix, "list_connections", "-q", "pid", "client_properties").splitlines():
        pid, _, props = line.partition("\t")
        name = re.search(r'"connection_name","([^"]*)"', props)
        if pid.startswith("<") and name is not None and name_contains in name.group(1):
            rabbitmqctl(*prefix, "close_connection", pid, "fault test")
            closed += 1
    return closed


def consumers_on(queue: str, node: str | None = None, vhost: str = AMQP_VHOST) -> int:
    prefix = ["-n", node] if node else []
    out = rabbitmqctl(*prefix, "list_consumers", "-q", "-p", vhost, "queue_name", "--formatter", "json")
    return sum(1 for r in json.loads(out) if r["queue_name"] == queue)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check()` (a function, or a coroutine function) until it is true; return the seconds
    it took. Fails loudly, naming `what`, when it is not true within `timeout`."""
    started = time.monotonic()
    while not await _holds(check):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not {what} after {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _holds(check: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = check()
    return bool(await result) if inspect.isawaitable(result) else bool(result)
