"""Fixtures. Integration tests need RabbitMQ and Redis on 127.0.0.1 and fail (never skip) without them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from gateway.app import CHANNELS_PER_CONNECTION, Gateway, open_store
from gateway.config import Account, Settings, nest, parse_accounts
from gateway.providers.base import ProviderAdapter
from gateway.sandbox.app import start_sandbox
from gateway.sandbox.state import SandboxState
from gateway.state import Store
from testkit import AMQP_URL, REDIS_URL, Process, Sandbox, delete_account_queues, free_port, port_open
from testkit import start_sandbox as start_sandbox_process
from testkit.redis_ha import RedisCluster, RedisSentinels
from tests.fakes import FakeClock


@pytest.fixture(scope="session")
def services() -> None:
    wanted = (("RabbitMQ", AMQP_URL, 5672), ("Redis", REDIS_URL, 6379))
    missing = [
        f"{name} ({urlsplit(url).hostname}:{urlsplit(url).port or port})"
        for name, url, port in wanted
        if not port_open(urlsplit(url).port or port, urlsplit(url).hostname or "127.0.0.1")
    ]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not reachable: start them (.ci/run does)", pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster of the tests' own."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinels]:
    """A Redis master, its replica and three Sentinels of the tests' own."""
    deployment = RedisSentinels(tmp_path_factory.mktemp("redis-sentinel")).start()
    yield deployment
    deployment.stop()


@pytest.fixture
def redis_url(services: None) -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield REDIS_URL
    client.close()


class InProcess:
    """A sandbox and gateways in the test's own event loop (fast, inspectable)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = SandboxState(seed=7)
        self.sandbox_port = free_port()
        self._sandbox: Any = None
        self.gateways: list[Gateway] = []
        self.account_names: set[str] = set()

    async def start_sandbox(self) -> None:
        self._sandbox = await start_sandbox("127.0.0.1", self.sandbox_port, self.state)

    async def stop_sandbox(self) -> None:
        if self._sandbox is not None:
            await self._sandbox.cleanup()
            self._sandbox = None

    def account(self, name: str, **overrides: Any) -> Account:
        from testkit import account_doc

        self.account_names.add(name)
        return parse_accounts([account_doc(name, self.sandbox_port, **overrides)])[0]

    async def gateway(
        self,
        accounts: list[Account],
        *,
        adapters: Callable[[Account], ProviderAdapter] | None = None,
        stores: Callable[[Settings], Store] = open_store,
        channels_per_connection: int | None = None,
        **settings: Any,
    ) -> Gateway:
        settings.setdefault("amqp_url", AMQP_URL)
        settings.setdefault("state_path", self.tmp / "state.sqlite3")
        settings.setdefault("http_port", 0)
        settings.setdefault("retry_schedule_s", [0.2, 0.4])
        settings.setdefault("drain_timeout_s", 5)
        gw = Gateway(
            Settings(**nest(settings)),
            accounts,
            adapters=adapters,
            stores=stores,
            channels_per_connection=channels_per_connection or CHANNELS_PER_CONNECTION,
        )
        await gw.start()
        self.gateways.append(gw)
        return gw

    async def close(self) -> None:
        for gw in self.gateways:
            await gw.stop()
        await self.stop_sandbox()
        await delete_account_queues(self.account_names)


@pytest.fixture
async def world(services: None, tmp_path: Path) -> AsyncIterator[InProcess]:
    w = InProcess(tmp_path)
    await w.start_sandbox()
    try:
        yield w
    finally:
        await w.close()


@pytest.fixture
def sandbox_process(services: None, tmp_path: Path) -> Iterator[tuple[Process, Sandbox]]:
    proc, sandbox = start_sandbox_process(tmp_path)
    try:
        yield proc, sandbox
    finally:
        proc.close()


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """An in-memory exporter on the process's tracer provider (installed once per test session)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def clock() -> FakeClock:
    """A clock whose time moves only when the test says (tests/fakes.py)."""
    return FakeClock()
