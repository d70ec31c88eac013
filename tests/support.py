"""Helpers shared by the integration and end-to-end tests: the bus as a producer sees it, the
sandbox's control API, and gateway processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from gateway import contract as c
from gateway.providers import provider_ref

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def new_account_name(prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(5)}"


def account_doc(name: str, sandbox_port: int, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "provider": "serwersms",
        "base_url": f"http://127.0.0.1:{sandbox_port}",
        "token": f"tok-{name}",
        "sender": "Test",
        "rate_per_s": 1000,
        "burst": 1000,
        "linger_ms": 50,
        "http_timeout_s": 2,
    }
    doc.update(overrides)
    return doc


def request(uid: str, to: str = "+48500600700", text: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"v": 1, "unique_id": uid, "to": to, "text": text, **extra}).encode()


@dataclass
class Received:
    routing_key: str
    body: bytes
    headers: dict[str, Any]

    @property
    def doc(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class Bus:
    """A producer's and an observer's view of the bus for a set of accounts."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._outcomes: AbstractQueue | None = None
        self._dead: AbstractQueue | None = None
        self.outcomes: list[Received] = []
        self.dead: list[Received] = []
        self._changed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, accounts: list[str]) -> AsyncIterator[Bus]:
        try:
            connection = await aio_pika.connect_robust(AMQP_URL)
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise RuntimeError(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}") from exc
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            bus = cls(connection, channel)
            await bus._observe(accounts)
            yield bus

    async def _observe(self, accounts: list[str]) -> None:
        ch = self.channel
        outcomes = await ch.declare_exchange(c.OUTCOMES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await ch.declare_exchange(c.DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self._outcomes = await ch.declare_queue("", exclusive=True)
        self._dead = await ch.declare_queue("", exclusive=True)
        for account in accounts:
            await self._outcomes.bind(outcomes, routing_key=f"*.{account}")
            await self._dead.bind(dead, routing_key=f"*.{account}")
        await self._outcomes.consume(self._collector(self.outcomes), no_ack=True)
        await self._dead.consume(self._collector(self.dead), no_ack=True)

    def _collector(self, into: list[Received]) -> Any:
        async def on_message(message: AbstractIncomingMessage) -> None:
            into.append(Received(message.routing_key or "", message.body, dict(message.headers or {})))
            self._changed.set()

        return on_message

    async def publish(self, account: str, body: bytes, **props: Any) -> None:
        exchange = await self.channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        props.setdefault("content_type", "application/json")
        await exchange.publish(aio_pika.Message(body, **props), routing_key=account)

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        exchange = await self.channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        for start in range(0, len(items), 200):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=account,
                    )
                    for account, body in items[start : start + 200]
                )
            )

    async def wait_for(self, outcomes: int = 0, dead: int = 0, timeout: float = 30.0) -> None:
        """Wait until at least this many outcomes and dead letters arrived; fail with what came."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < outcomes or len(self.dead) < dead:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"waited {timeout}s for {outcomes} outcomes and {dead} dead letters, got "
                    f"{len(self.outcomes)} and {len(self.dead)}: {[o.routing_key for o in self.outcomes[-5:]]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Wait until nothing new arrived for `quiet_s` (to catch extra, unwanted messages)."""
        last = (len(self.outcomes), len(self.dead))
        while True:
            await asyncio.sleep(quiet_s)
            now = (len(self.outcomes), len(self.dead))
            if now == last:
                return
            last = now

    def outcome_docs(self) -> list[dict[str, Any]]:
        return [o.doc for o in self.outcomes]


class Sandbox:
    """The sandbox's control API over HTTP."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def ledger(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"{self.url}/_sandbox/ledger", timeout=10).json()
        return doc

    def fault(self, **rule: Any) -> int:
        response = httpx.post(f"{self.url}/_sandbox/faults", json=rule, timeout=10)
        response.raise_for_status()
        return int(response.json()["id"])

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/faults", timeout=10).raise_for_status()

    def sends_of(self, account: str, uid: str) -> int:
        return int(self.ledger()["by_unique_id"].get(provider_ref(account, uid), 0))


async def delete_account_queues(accounts: set[str] | list[str]) -> None:
    """Tests make a queue per throwaway account; remove them so the broker does not fill up."""
    if not accounts:
        return
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in accounts:
            await channel.queue_delete(c.account_queue(name))


def gateway_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    for key, value in settings.items():
        env[f"GATEWAY_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


class Process:
    """A `gateway` subprocess with its output in a log file (read it when a test fails)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        *,
        command: list[str] | None = None,
    ) -> None:
        """`python -m gateway <args>`, or any `command`."""
        self.log_path = log_path
        self._log = log_path.open("ab")
        argv = command if command is not None else [sys.executable, "-m", "gateway", *args]
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, port: int, path: str = "/readyz", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready on :{port}{path} after {timeout}s:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


def start_sandbox(tmp: Path) -> tuple[Process, Sandbox]:
    port = free_port()
    proc = Process(["sandbox", "--port", str(port)], gateway_env(), tmp / f"sandbox-{port}.log")
    proc.wait_http(port, "/_sandbox/ledger")
    return proc, Sandbox(port)


def start_gateway(tmp: Path, accounts: list[dict[str, Any]], **settings: Any) -> tuple[Process, int]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    settings.setdefault("state_path", str(tmp / "state.sqlite3"))
    env = gateway_env(accounts=accounts, http_port=port, **settings)
    proc = Process(["run"], env, tmp / f"gateway-{port}.log")
    proc.wait_http(port)
    return proc, port


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


def consumers_on(queue: str, node: str | None = None, vhost: str = "/") -> int:
    prefix = ["-n", node] if node else []
    out = rabbitmqctl(*prefix, "list_consumers", "-q", "-p", vhost, "queue_name", "--formatter", "json")
    return sum(1 for r in json.loads(out) if r["queue_name"] == queue)
