"""Composition root: builds every part from `Settings`, runs until a signal, drains, exits.

RabbitMQ --sms.send.<account>--> consumer.AccountWorker (one channel each, 1,000 a connection)
                                    -> pipeline.Pipeline -> routes.Routes (which configured account
                                       sends: route_by_country, failover_to, circuits)
                                       -> that account's ProviderAdapter (httpx, one TLS context)
                                    |    claim, rate limit, throttle: Store (Redis or SQLite)
                                    -> settle.Settler -> Publisher (confirming channel; small
                                       batches on a second one): outcomes, dead letters, retry
                                       copies; then the ack
RabbitMQ --sms.send.unroutable--> consumer.UnroutableWorker -> settle.Settler
RabbitMQ --sms.optout--> optouts.OptOutWorker -> the store's opt-out registry (read by the pipeline)
web: /healthz, /readyz (Gateway.problems), /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import resource
import secrets
import signal
import socket
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp.web import AppRunner
from yarl import URL

from gateway import contract as c
from gateway import numbers
from gateway.bus import topology
from gateway.bus.acks import AckTracker
from gateway.bus.connect import connect_robust
from gateway.bus.consumer import AccountWorker, UnroutableWorker, close_wedged
from gateway.bus.optouts import OptOutWorker
from gateway.bus.publisher import Publisher
from gateway.bus.queue import close_within
from gateway.config import Account, Settings, sandbox_account
from gateway.core.admission import ADJUST_EVERY_S, Admission
from gateway.core.concurrency import AdaptiveLimit
from gateway.core.flow import AccountFlow
from gateway.core.pipeline import Pipeline, Sender
from gateway.core.routes import Routes
from gateway.dlr import tracking
from gateway.dlr.desk import Desk, Poller, PollScheduler
from gateway.errors import BrokerRefused, BrokerUnavailable, ConfigError, PortInUse, StoreRefused, StoreUnavailable
from gateway.obs import metrics as m
from gateway.obs.logs import get_logger
from gateway.obs.loop import time_gc, watch_lag
from gateway.ops import web
from gateway.ops.diagnostics import dump_tasks
from gateway.providers import build_adapter
from gateway.providers.base import ProviderAdapter
from gateway.state import Store

log = get_logger("gateway.app")
RECONNECT_INTERVAL_S = 2
# Consumer channels one AMQP connection carries at most; past them another connection is opened
# (RabbitMQ's default channel_max is 2,047; an account's lanes consume on one channel).
CHANNELS_PER_CONNECTION = 1000
# Start-up declares this many accounts' queues at once (a channel each) and starts this many
# accounts' consumers at once (each account's lanes in order, urgent first), the two overlapping:
# an account consumes as soon as its own queues are declared. It need not grow with the accounts.
START_CONCURRENCY = 8
# An account whose queues the broker refused is declared again this often, until it takes them.
REFUSED_RETRY_S = 30.0
# What the broker answers a declaration whose queue exists with other arguments (406), or one the
# user may not make (403): about the account's queues, not the broker.
QUEUE_REFUSED = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused)
STARTUP_RETRY_MAX_S = 30  # start-up retries back off 1, 2, 4 ... up to this


def open_store(settings: Settings) -> Store:
    if settings.redis_url is not None:
        from gateway.state.redis import RedisStore

        return RedisStore(settings.redis_url.get_secret_value(), timeout_s=settings.redis_timeout_s)
    from gateway.state.sqlite import SqliteStore

    return SqliteStore(Path(settings.state_path))


def resolve_accounts(settings: Settings, *, sandbox: bool) -> list[Account]:
    accounts = settings.load_accounts()
    if sandbox and not accounts:
        accounts = [sandbox_account(settings.sandbox_port)]
    if not accounts:
        raise ConfigError(
            "no accounts configured: set GATEWAY_ACCOUNTS_FILE or GATEWAY_ACCOUNTS, or run with --sandbox"
        )
    return accounts


class Gateway:
    def __init__(
        self,
        settings: Settings,
        accounts: list[Account],
        *,
        sandbox: bool = False,
        adapters: Callable[[Account], ProviderAdapter] | None = None,
        stores: Callable[[Settings], Store] = open_store,
        channels_per_connection: int = CHANNELS_PER_CONNECTION,
        pause_gc: bool = False,
    ) -> None:
        """`adapters` and `stores` build each account's provider adapter and the state store (the
        seams tests use to put faults behind the real protocols); `channels_per_connection`: the
        consumer channels one AMQP connection carries before another is opened. `pause_gc`: the
        process's own gateway (run()): the garbage collector waits while start-up builds the
        accounts' parts, all long-lived, instead of passing over them again each time they grow."""
        self.settings = settings
        self._build_adapter = adapters or (
            lambda account: build_adapter(account, proxy_from_env=settings.provider_proxy_from_env)
        )
        self._open_store = stores
        self.accounts = accounts
        self._sandbox = sandbox
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._connection: AbstractRobustConnection | None = None
        # Connections that carry consumer channels: the first is `_connection`; more are opened as
        # each fills up (CHANNELS_PER_CONNECTION).
        self._consumer_connections: list[tuple[AbstractRobustConnection, int]] = []
        self._channels_per_connection = channels_per_connection
        self._opening = asyncio.Lock()  # one consumer channel opened at a time (see _consumer_channel)
        self._store: Store | None = None
        self._adapters: list[ProviderAdapter] = []
        self._workers: list[AccountWorker] = []
        self._unroutable: UnroutableWorker | None = None
        self._optouts: OptOutWorker | None = None
        self._runners: list[AppRunner | web.HttpPort] = []
        self._http_url: str | None = None  # where the web port listens, once it does
        self._channels: list[AbstractChannel] = []
        self._tasks: list[asyncio.Task[None]] = []  # the loop watch; delivery reports: the desk, a poller per account
        self._desk: Desk | None = None
        self.routes = Routes(accounts, settings.failover, pause_s=settings.account_pause_s)
        self._waiting_for: str | None = "start"  # what start-up waits for; None once started
        self._starting = 0  # accounts whose queues are not declared or consumed yet, while "accounts"
        # Accounts whose queues the broker refused at start-up: their lanes, and why.
        self._refused: dict[str, tuple[list[AccountWorker], str]] = {}
        self._account_channels: dict[str, AbstractChannel] = {}  # each account's consumer channel
        self._started: set[AccountWorker] = set()  # the workers in `_workers`, for a quick lookup
        self._pause_gc = pause_gc

    async def start(self) -> None:
        """Start every part. The HTTP endpoints come first: while the broker or Redis cannot be
        reached, start-up retries with backoff (one log line per try) and /readyz says why.
        A refused login or vhost is a configuration error (ConfigError), not retried."""
        s = self.settings
        if self._sandbox:
            from gateway.sandbox.app import start_sandbox

            try:
                self._runners.append(await start_sandbox("127.0.0.1", s.sandbox_port))
            except PortInUse as exc:
                raise ConfigError(f"GATEWAY_SANDBOX_PORT: {exc} (choose another port)") from None
        if s.http.port:
            guard = web.ConnectionGuard(
                max_connections=min(s.http.max_connections, max(8, file_limit() // 4)),
                header_timeout_s=s.http.header_timeout_s,
                idle_timeout_s=s.http.idle_timeout_s,
            )
            app = web.build_app(
                self.problems,
                lambda: {"paused": self.paused_accounts(), "routes": self.routes.describe()},
                self._webhook,
                guard=guard,
                webhook_concurrency=s.webhook.concurrency,
                webhook_rate_per_s=s.webhook.rate_per_s,
            )
            try:
                port = await web.serve(app, s.http.host, s.http.port, guard)
            except PortInUse as exc:
                raise ConfigError(
                    f"GATEWAY_HTTP__PORT: {exc} (choose another port, or 0 to turn the HTTP endpoints off)"
                ) from None
            self._runners.append(port)
            self._http_url = port.url
            log.info("http_listening", url=port.url, probes=["/healthz", "/readyz", "/metrics"])
        self._store = await self._open_state()
        self._connection = await self._connect()
        if self._pause_gc:
            gc.disable()  # what start-up builds from here on lives as long as the process (run() freezes it)
        try:
            await self._start_parts()
        finally:
            if self._pause_gc:
                gc.enable()

    async def _start_parts(self) -> None:
        s = self.settings
        assert self._connection is not None
        assert self._store is not None
        self._waiting_for = "topology"
        began = time.monotonic()
        # Setup channels, one declaration in flight on each: the shared topology first, then each
        # account's queues just before its consumers start (accounts START_CONCURRENCY at once).
        setups: asyncio.Queue[AbstractChannel] = asyncio.Queue()
        for _ in range(max(1, min(START_CONCURRENCY, len(self.accounts)))):
            setups.put_nowait(await self._connection.channel())
        setup = setups.get_nowait()
        await topology.declare(setup, [], s.retry_schedule_s)
        setups.put_nowait(setup)

        publisher = Publisher(
            await self._publisher_channel(), timeout_s=s.publish_timeout_s, reopen=self._publisher_channel
        )
        # Small batches settle on a channel of their own: a lone request's outcome is confirmed
        # without queueing behind a campaign batch's hundred publishes (consumer.EXPRESS_MAX_BATCH).
        express = Publisher(
            await self._publisher_channel(), timeout_s=s.publish_timeout_s, reopen=self._publisher_channel
        )
        admission = Admission(enabled=s.fair_admission)
        self._tasks.append(asyncio.create_task(self._note_routes(), name="route notes"))
        time_gc()
        self._tasks.append(
            asyncio.create_task(watch_lag(self._adjust_admission(admission), ADJUST_EVERY_S), name="loop lag")
        )

        for account in self.accounts:
            m.prime_account(
                account.name,
                [str(r) for r in c.DeadReason],
                [str(c.Status.DELIVERED), str(c.Status.UNDELIVERED)],
                [str(lane) for lane in c.LANES],
            )
            self._adapters.append(self._build_adapter(account))
        senders = {
            account.name: Sender(account, adapter)
            for account, adapter in zip(self.accounts, self._adapters, strict=True)
        }
        by_account: list[list[AccountWorker]] = []
        for account, adapter in zip(self.accounts, self._adapters, strict=True):
            max_batch = min(account.batch_size, adapter.max_batch)
            lanes: list[AccountWorker] = []
            # The account's lanes consume on one channel: one channel an account, not one a queue
            # (on the broker and in the process alike), and one tracker for its acks.
            acks = AckTracker(
                timeout_s=s.worker.publish_timeout_s,
                on_wedged=functools.partial(close_wedged, where=account.name),
            )
            for lane in c.LANES:
                worker = AccountWorker(
                    account=account,
                    adapter=adapter,
                    pipeline=Pipeline(
                        account=account,
                        adapter=adapter,
                        store=self._store,
                        options=s.send,
                        owner=self._owner,
                        lane=lane,
                        routes=self.routes,
                        senders=senders,
                    ),
                    flow=AccountFlow(
                        max_batch=max_batch,
                        limit=AdaptiveLimit(account.concurrency, account.max_concurrency),
                        account_pause_s=s.account_pause_s,
                    ),
                    store=self._store,
                    publisher=publisher,
                    express=express,
                    options=s.worker,
                    owner=self._owner,
                    admission=admission,
                    acks=acks.share(lane),
                )
                lanes.append(worker)
            for worker in lanes:
                worker.siblings = [w for w in lanes if w is not worker]
            by_account.append(lanes)
        self._waiting_for = "accounts"
        self._starting = len(by_account)
        consuming = asyncio.Semaphore(START_CONCURRENCY)  # accounts whose consumers start at once

        async def start_account(lanes: list[AccountWorker]) -> None:
            """Declare the account's queues and consume from them: an account that takes long does
            not hold the others, which consume as soon as their own queues are there. Queues the
            broker refuses keep their account out, not the others (`_refuse`)."""
            setup = await setups.get()
            try:
                await topology.declare_account(setup, lanes[0].account.name)
            except QUEUE_REFUSED as exc:
                setup = await self._connection_channel_instead(setup)
                self._refuse(lanes, exc)
                self._starting -= 1
                return
            finally:
                setups.put_nowait(setup)
            async with consuming:
                await self._consume(lanes)
            self._starting -= 1

        await asyncio.gather(*(start_account(lanes) for lanes in by_account))
        while not setups.empty():
            await setups.get_nowait().close()
        if self._refused:
            self._tasks.append(asyncio.create_task(self._declare_refused(), name="refused accounts"))
        log.info(
            "accounts_started",
            accounts=len(by_account),
            refused=len(self._refused),
            queues=len(self._workers),
            connections=len(self._consumer_connections),
            took_s=round(time.monotonic() - began, 2),
        )

        self._unroutable = UnroutableWorker(publisher, s.worker)
        channel = await self._connection.channel()
        self._channels.append(channel)
        await self._unroutable.start(channel)
        self._optouts = OptOutWorker(publisher, self._store, {a.name: a for a in self.accounts}, s.worker)
        channel = await self._connection.channel()
        self._channels.append(channel)
        await self._optouts.start(channel)
        if s.dlr.enabled:
            connection, store = self._connection, self._store
            desk = Desk(
                store=store,
                sink=publisher,
                accounts=self.accounts,
                owner=self._owner,
                rebuild=lambda account: tracking.rebuild(connection, store, account, s.dlr),
                published=lambda account, ids, since: tracking.events_published(connection, account, ids, since),
                health=self.routes.reported,
            )
            self._tasks.append(asyncio.create_task(desk.run(), name="dlr desk"))
            pollers = []
            lanes_of = {lanes[0].account.name: lanes for lanes in by_account}
            for account, adapter in zip(self.accounts, self._adapters, strict=True):
                ways = {n: (senders[n].account, senders[n].adapter) for n in account.routes_to[1:]}
                poller = Poller(desk=desk, account=account, adapter=adapter, store=self._store, dlr=s.dlr, ways=ways)
                for worker in lanes_of[account.name]:
                    worker.on_tracked = poller.wake
                pollers.append(poller)
            polls = PollScheduler(pollers, self._store)
            self._tasks.append(asyncio.create_task(polls.run(), name="dlr polls"))
            self._desk = desk
        self._waiting_for = None
        log.info(
            "gateway_started",
            accounts=[a.name for a in self.accounts],
            owner=self._owner,
            store=type(self._store).__name__,
            http=self._http_url,
        )

    async def _consume(self, lanes: list[AccountWorker]) -> None:
        """Consume from the account's lanes, all on the account's one channel (they share its ack
        tracker). Lanes an earlier try started are left as they are."""
        name = lanes[0].account.name
        channel = self._account_channels.get(name)
        if channel is None:
            channel = self._account_channels[name] = await self._consumer_channel()
        for worker in lanes:  # urgent first: its consumer is ready before the others take work
            if worker not in self._started:
                await worker.start(channel)
                self._started.add(worker)
                self._workers.append(worker)

    async def _connection_channel_instead(self, refused: AbstractChannel) -> AbstractChannel:
        """A new channel for one the broker closed with a refusal."""
        assert self._connection is not None
        await close_within(refused, 5, "channel_not_closed")
        return await self._connection.channel()

    def _refuse(self, lanes: list[AccountWorker], exc: Exception) -> None:
        """The broker refused the account's queues (arguments that differ from the contract's, or
        no permission): the account is not consumed and /readyz says why, while every other
        account runs; its declaration is tried again every `REFUSED_RETRY_S`."""
        name = lanes[0].account.name
        self._refused[name] = (lanes, str(exc)[:300])
        log.error("account_queues_refused", account=name, error=str(exc)[:300], see="gateway topology check")

    async def _declare_refused(self) -> None:
        """Declare the refused accounts' queues again until the broker takes them (an operator
        fixed or deleted the queue), then consume from them."""
        while self._refused:
            await asyncio.sleep(REFUSED_RETRY_S)
            try:
                await self._declare_refused_once()
            except Exception as exc:  # noqa: BLE001 - the broker is away: the next round tries again
                log.warning("refused_accounts_not_declared", error=type(exc).__name__)

    async def _declare_refused_once(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            for name, (lanes, _why) in list(self._refused.items()):
                try:
                    await topology.declare_account(channel, name)
                except QUEUE_REFUSED as exc:
                    channel = await self._connection_channel_instead(channel)
                    self._refused[name] = (lanes, str(exc)[:300])
                    continue
                await self._consume(lanes)
                del self._refused[name]
                log.info("account_queues_declared", account=name)
        finally:
            await close_within(channel, 5, "channel_not_closed")

    @staticmethod
    def _adjust_admission(admission: Admission) -> Callable[[float], None]:
        """What the loop watch reports each quarter second: the limit adjusted, and the metrics."""
        counted = 0

        def adjust(lag_s: float) -> None:
            nonlocal counted
            admission.adjust(lag_s)
            m.ADMISSION_LIMIT.set(admission.limit or 0)
            m.ADMISSION_HELD.inc(admission.held - counted)
            counted = admission.held

        return adjust

    async def _note_routes(self) -> None:
        """Tell operators (`gateway accounts`, through the store) of each route state change, once a
        second at most; a note the store did not take is written again with the next change."""
        from gateway.state.base import Pause

        while True:
            await asyncio.sleep(1.0)
            for name, state, why, since, until in self.routes.take_changed():
                try:
                    assert self._store is not None
                    await self._store.note_pause(name, Pause(f"{self._owner}/route", state, why[:200], until, since))
                except Exception as exc:  # noqa: BLE001 - a note for operators; the route works without it
                    log.warning("route_note_failed", account=name, error=type(exc).__name__)

    async def _publisher_channel(self) -> AbstractChannel:
        """A channel for outcomes, dead letters and retry copies: confirmed, returns raise."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channels = [c for c in self._channels if not c.is_closed]  # one it replaced, once closed
        self._channels.append(channel)
        return channel

    async def _open_state(self) -> Store:
        """The state store, once it answers; retried with backoff while it cannot be reached."""
        where = "GATEWAY_REDIS_URL" if self.settings.redis_url is not None else "GATEWAY_STATE_PATH"
        try:
            store = self._open_store(self.settings)
        except StoreRefused as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for attempt in count(1):
            self._waiting_for = "state store"
            try:
                await asyncio.wait_for(store.ping(), 10)
            except StoreRefused as exc:
                raise ConfigError(f"{where}: {exc}") from None
            except (StoreUnavailable, TimeoutError) as exc:
                await self._retry_later("state_store_unreachable", attempt, exc)
            else:
                return store
        raise AssertionError("unreachable")  # pragma: no cover

    async def _consumer_channel(self) -> AbstractChannel:
        """A channel for one account's consumers (its lanes), on a connection with room for it."""
        assert self._connection is not None
        # One at a time: the connections' counts, and the opens themselves; concurrent opens on one
        # connection can make the broker close it (CHANNEL_ERROR - expected 'channel.open').
        async with self._opening:
            if not self._consumer_connections:
                self._consumer_connections.append((self._connection, 0))
            connection, used = self._consumer_connections[-1]
            if used >= self._channels_per_connection:
                n = len(self._consumer_connections)
                connection, used = await self._connect(f" consumers-{n + 1}"), 0
                self._consumer_connections.append((connection, 0))
            self._consumer_connections[-1] = (connection, used + 1)
            channel = await connection.channel()
            self._channels.append(channel)
            return channel

    async def _connect(self, suffix: str = "") -> AbstractRobustConnection:
        """The robust broker connection, once the broker answers; retried with backoff while it
        cannot be reached. The connection's name (shown by the broker's tools) travels in the URL:
        aio-pika ignores `client_properties` when it is given a URL."""
        url = URL(self.settings.amqp_url.get_secret_value()).update_query(name=f"sms-gateway {self._owner}{suffix}")
        if "reconnect_interval" not in url.query:  # aio-pika's default is 5 s
            url = url.update_query(reconnect_interval=RECONNECT_INTERVAL_S)
        if "heartbeat" not in url.query:  # aiormq's default, 60 s, gives a silent broker up after 183 s
            url = url.update_query(heartbeat=self.settings.amqp_heartbeat_s)
        for attempt in count(1):
            self._waiting_for = "broker"
            try:
                return await connect_robust(url, timeout_s=10)
            except BrokerRefused as exc:
                raise ConfigError(f"GATEWAY_AMQP_URL: {exc}") from None
            except BrokerUnavailable as exc:
                await self._retry_later("broker_unreachable", attempt, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _retry_later(self, event: str, attempt: int, exc: BaseException) -> None:
        delay = min(STARTUP_RETRY_MAX_S, 2 ** min(attempt - 1, 8))
        log.warning(event, attempt=attempt, retry_in_s=delay, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        await asyncio.sleep(delay)

    async def _webhook(self, provider: str, account: str, body: bytes | None, content_type: str) -> tuple[int, str]:
        if self._desk is None:
            return 503, "starting" if self.settings.dlr.enabled else "delivery reports are off"
        return await self._desk.webhook(provider, account, body, content_type)

    @property
    def workers(self) -> list[AccountWorker]:
        return list(self._workers)

    def worker(self, account: str, lane: c.Lane = c.Lane.NORMAL) -> AccountWorker:
        """The worker of one account's lane."""
        return next(w for w in self._workers if w.account.name == account and w.lane is lane)

    async def problems(self) -> list[str]:
        """Why the gateway cannot do its job right now (empty: ready)."""
        problems = []
        if self._waiting_for == "accounts":
            problems.append(f"starting: {self._starting} of {len(self.accounts)} accounts not consuming yet")
        elif self._waiting_for is not None:
            problems.append(f"starting: waiting for the {self._waiting_for}")
        refused = list(self._refused.items())
        problems += [f"account {name}: the broker refused its queues: {why}" for name, (_, why) in refused[:3]]
        if len(refused) > 3:
            problems.append(f"and {len(refused) - 3} more accounts whose queues the broker refused")
        if self._connection is None or any(
            c.is_closed for c, _ in [(self._connection, 0), *self._consumer_connections]
        ):
            problems.append("broker disconnected")
        problems += [f"no consumer on {q}" for q in self.queues_without_consumer()]
        if self._store is None:
            problems.append("state store: not open")
            return problems
        try:
            await asyncio.wait_for(self._store.ping(), 2.0)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            problems.append(f"state store: {type(exc).__name__}")
        return problems

    def queues_without_consumer(self) -> list[str]:
        """Queues that should be consumed and are not: every account that is not paused, the
        unknown-account queue and the opt-out queue. After a broker reconnect they stay here until
        consumers are back."""
        missing = [w.queue_name for w in self._workers if not w.paused and not w.consuming]
        if self._unroutable is not None and not self._unroutable.consuming:
            missing.append(c.UNROUTABLE_QUEUE)
        if self._optouts is not None and not self._optouts.consuming:
            missing.append(c.OPTOUT_QUEUE)
        return missing

    def paused_accounts(self) -> list[str]:
        """Accounts with a paused lane (an account's own pause pauses all its lanes)."""
        return list(dict.fromkeys(w.account.name for w in self._workers if w.paused))

    async def stop(self) -> bool:
        """Drain: stop consuming, finish batches in flight, close. True if nothing was cut short."""
        timeout = self.settings.drain_timeout_s
        log.info("gateway_draining", timeout_s=timeout)
        if self._unroutable is not None:
            await self._unroutable.stop()
        if self._optouts is not None:
            await self._optouts.stop()
        results = await asyncio.gather(*(w.stop(timeout) for w in self._workers))
        clean = all(results)
        if self._desk is not None:
            await self._desk.finish_marks(5.0)
        await cancel_all(self._tasks)
        for channel in self._channels:
            if not channel.is_closed:
                await close_within(channel, 5, "channel_not_closed")
        for extra, _ in self._consumer_connections[1:]:
            await close_within(extra, 5, "connection_not_closed")
        if self._connection is not None:
            await close_within(self._connection, 5, "connection_not_closed")
        for adapter in self._adapters:
            await adapter.close()
        if self._store is not None:
            await self._store.close()
        for runner in self._runners:
            await runner.cleanup()
        log.info("gateway_stopped", clean=clean)
        return clean


async def run(settings: Settings, accounts: list[Account], *, sandbox: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain within `drain_timeout_s`. A signal during start-up
    (the broker or Redis not reachable yet) ends the process as cleanly. SIGUSR2 logs what every
    task waits on (`diagnostics.dump_tasks`) and changes nothing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    raise_file_limit()
    numbers.preload()
    web.quiet_accept_errors(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks)  # what each task waits on, for a stuck gateway
    gateway = Gateway(settings, accounts, sandbox=sandbox, pause_gc=True)
    starting = asyncio.create_task(gateway.start(), name="start")
    stopping = asyncio.create_task(stop.wait(), name="stop signal")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # a start-up failure (ConfigError ...) ends the run here
        # Everything built at start-up (modules, clients, metrics) lives as long as the process.
        # Freezing it keeps the garbage collector's full passes off it: a full pass over it took
        # 60-80 ms (a stall every few seconds, straight into the latency tail); after, ~2 ms.
        # No collection first: start-up ran with the collector off and leaves next to no cycles,
        # while a pass over everything it built would hold the loop just as the gateway says it
        # is ready. What a start-up that retried leaves (a few exceptions' frames) is frozen too.
        gc.freeze()
        await stopping
    finally:
        stopping.cancel()
        await gateway.stop()


def file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_file_limit() -> None:
    """The process's open-file limit up to its hard limit: every connection (broker, store,
    provider, HTTP client) is a file, and a low soft limit (1,024 on many hosts) is soon met."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("file_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    log.info("file_limit", files=file_limit())


async def cancel_all(tasks: list[asyncio.Task[None]], timeout_s: float = 10.0) -> None:
    """Cancel the tasks and wait for them, cancelling again each second those still running: a
    cancel that a library swallowed must not hold the shutdown. Past `timeout_s` the rest are left
    (logged)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.warning("tasks_not_stopped", tasks=sorted(t.get_name() for t in pending))
            return
        _done, pending = await asyncio.wait(pending, timeout=min(1.0, left))
