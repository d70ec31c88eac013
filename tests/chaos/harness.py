"""The chaos world: real gateway processes, RabbitMQ nodes and a Redis server of the suite's own,
the sandbox provider, a producer, an observer and the ledger checked after every scenario.

The suite never touches the machine's own broker or Redis: it starts its own RabbitMQ node(s)
(separate node names, ports and data directories) and its own `redis-server`, and stops them
after. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import redis

from gateway import contract as c
from gateway.bus import topology
from gateway.bus.queue import QueueConsumer
from gateway.providers.base import provider_ref
from testkit import Process, Sandbox, account_doc, free_port, gateway_env, port_open, rabbitmqctl
from testkit import start_sandbox as start_sandbox_process

RETRY_SCHEDULE_S = [0.5, 1.0, 2.0]
TERMINAL = {"accepted", "rejected", "failed", "duplicate", "invalid", "expired"}
FINAL = {"delivered", "undelivered"}


def _wait(check: Any, timeout: float, what: str, interval: float = 0.2) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not after {timeout}s")
        time.sleep(interval)
    return time.monotonic() - started


class RabbitNode:
    """A RabbitMQ node of the suite's own (`chaosN@localhost`), with its own ports and data."""

    def __init__(self, name: str, port: int, root: Path, conf: str | None = None) -> None:
        """`conf`: the node's rabbitmq.conf (default: a plain listener on 127.0.0.1:`port`)."""
        self.conf = conf
        self.node = f"{name}@localhost"
        self.port = port
        self.dist_port = port + 20000
        self.root = root / name
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server is not installed: the chaos suite starts its own nodes")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
                "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.root / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            }
        )
        return env

    def start(self) -> None:
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(
            self.conf or f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.root / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:  # the server script drops to the rabbitmq user: let it write there
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("rabbitmq")
                for path in [self.root.parent, self.root, *self.root.rglob("*")]:
                    os.chown(path, user.pw_uid, user.pw_gid)
        command, home = self._server_command()
        env = self._env() | ({"HOME": home} if home else {})
        subprocess.run(command, env=env, check=True, capture_output=True, cwd=self.root)
        _wait(lambda: self._ctl_ok("await_startup", "--timeout", "5"), 120, f"{self.node} did not boot", 1.0)

    def _server_command(self) -> tuple[list[str], str | None]:
        """As root, Debian's `rabbitmq-server` wrapper drops to the rabbitmq user through `su`, whose
        PAM session resets the open-file limit to init's (1,024 here): a node with a thousand
        accounts' queues and connections runs out. `setpriv` changes user without PAM, so the node
        keeps this process's limit, raised to its hard limit; HOME is the user's, as `su` sets it (the
        Erlang cookie `rabbitmqctl` shares is there)."""
        plain: tuple[list[str], str | None] = (["rabbitmq-server", "-detached"], None)
        server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None or not server.exists():
            return plain
        try:
            user = pwd.getpwnam("rabbitmq")
        except KeyError:
            return plain
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        command = [setpriv, "--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups", "--", str(server), "-detached"]
        return command, user.pw_dir

    def _ctl_ok(self, *args: str) -> bool:
        try:
            self.ctl(*args)
        except RuntimeError:
            return False
        return True

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return rabbitmqctl("-n", self.node, *args, timeout=timeout)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)


class RedisServer:
    """A `redis-server` of the suite's own, without persistence (a restart comes back empty)."""

    def __init__(self, port: int, root: Path) -> None:
        self.port = port
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: the chaos suite starts its own")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _wait(lambda: port_open(self.port), 20, "redis-server did not start", 0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def pause(self, seconds: float) -> None:
        client = redis.Redis.from_url(self.url)
        client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")  # type: ignore[no-untyped-call]
        client.close()

    def stop(self) -> None:
        """SIGSTOP: the server holds every connection open and answers nothing until `cont`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@dataclass
class Seen:
    """What the observer received for one unique_id."""

    outcomes: list[tuple[float, str]] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


class Observer:
    """Reads every outcome (through a durable queue bound to `#`) and every dead letter (the
    `sms.dead` queue) of the chaos broker, surviving the same broker faults as the gateway."""

    def __init__(self, url: str, accounts: list[str]) -> None:
        self.url = url
        self.accounts = accounts
        self.seen: dict[str, Seen] = defaultdict(Seen)
        self.last_at = 0.0
        self._connection: Any = None
        self._consumers: list[QueueConsumer] = []

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url + "?reconnect_interval=1&name=chaos-observer")
        setup = await self._connection.channel()
        await topology.declare(setup, self.accounts, RETRY_SCHEDULE_S)
        outcomes = await setup.declare_queue("chaos.outcomes", durable=True, arguments={"x-queue-type": "quorum"})
        await outcomes.bind(c.OUTCOMES_EXCHANGE, routing_key="#")
        await setup.close()
        # The observer meets the same broker faults as the gateway, so it keeps its consumers alive
        # the same way (the gateway's QueueConsumer), one channel each.
        for queue, callback in (("chaos.outcomes", self._on_outcome), (c.DEAD_QUEUE, self._on_dead)):
            consumer = QueueConsumer(await self._connection.channel(), queue, callback, 2000)
            await consumer.start(wanted=lambda: True)
            self._consumers.append(consumer)

    async def _on_outcome(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        doc = json.loads(message.body)
        if doc.get("unique_id") is not None:
            self.seen[f"{doc['account']}/{doc['unique_id']}"].outcomes.append((time.monotonic(), doc["status"]))
        self.last_at = time.monotonic()
        await message.ack()

    async def _on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        account = str((message.headers or {}).get(c.H_ACCOUNT, ""))
        try:
            uid = json.loads(message.body).get("unique_id")
        except (ValueError, AttributeError, RecursionError):
            uid = None
        uid = uid if isinstance(uid, str) else message.message_id
        self.seen[f"{account}/{uid}"].dead.append(str((message.headers or {}).get(c.H_REASON)))
        self.last_at = time.monotonic()
        await message.ack()

    def settled(self, keys: set[str]) -> int:
        return sum(1 for k in keys if (s := self.seen.get(k)) is not None and (s.outcomes or s.dead))

    async def close(self) -> None:
        for consumer in self._consumers:
            await consumer.close()
        if self._connection is not None:
            await self._connection.close()


async def publish(url: str, items: list[tuple[str, bytes, str | None]]) -> None:
    """Publish (account, body, message_id) with confirms, retrying what the broker did not confirm."""
    connection = await aio_pika.connect_robust(url + "?reconnect_interval=1&name=chaos-producer")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE, ensure=False)
        pending = list(items)
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            failed: list[tuple[str, bytes, str | None]] = []
            for start in range(0, len(pending), 500):
                chunk = pending[start : start + 500]
                results = await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=mid),
                            routing_key=account,
                        )
                        for account, body, mid in chunk
                    ),
                    return_exceptions=True,
                )
                failed += [item for item, r in zip(chunk, results, strict=True) if isinstance(r, BaseException)]
            pending = failed
            if pending:
                await asyncio.sleep(1)
        if pending:
            raise RuntimeError(f"{len(pending)} requests could not be published")


def request_body(uid: str, i: int, **extra: Any) -> bytes:
    return json.dumps(
        {"v": 1, "unique_id": uid, "to": f"+4851{i % 10_000_000:07d}", "text": f"code {i}", **extra}
    ).encode()


@dataclass
class Ledger:
    scenario: str
    published: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    invalid: int = 0
    other: int = 0  # duplicate, expired
    dead_lettered: int = 0
    lost: int = 0
    sent_twice: int = 0
    # With delivery reports on (`World.check_reports`): accepted SMS without a final event, with
    # more than one, and requests answered `duplicate` although each was published once (the
    # gateway's own copies).
    failed_allowed: bool = True  # False: a `failed` outcome is a fault of the scenario's guarantee
    reports_checked: bool = False
    reports_missing: int = 0
    reports_twice: int = 0
    reports_early: int = 0  # a final event that arrived before the request's `accepted`
    own_duplicates: int = 0
    # With a budget (`budget_kill9`): parts accepted past it, plus any difference between what the
    # store counted and what the provider's ledger holds (0: the budget held exactly).
    over_budget: int = 0
    consumers_restored: bool = True
    recovered_s: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        reports = not (self.reports_missing or self.reports_twice or self.reports_early or self.own_duplicates)
        failed = self.failed_allowed or self.failed == 0
        held = self.lost == 0 and self.sent_twice == 0 and self.over_budget == 0
        return held and self.consumers_restored and reports and failed

    def row(self) -> str:
        rec = "yes" if self.consumers_restored else "NO"
        if self.recovered_s is not None:
            rec += f", {self.recovered_s:.1f} s"
        events = (
            f"{self.reports_missing} / {self.reports_twice} / {self.reports_early} / {self.own_duplicates}"
            if self.reports_checked
            else "-"
        )
        return (
            f"| {self.scenario} | {self.published} | {self.accepted} | {self.rejected} | {self.failed} | "
            f"{self.invalid} | {self.dead_lettered} | {self.lost} | {self.sent_twice} | {events} | {rec} | "
            f"{self.seconds:.0f} s |"
        )


HEADER = (
    "| scenario | published | accepted | rejected | failed | invalid | dead-lettered | lost | sent twice | "
    "events missing / twice / early / own duplicate | recovered by itself | run |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


class World:
    """One scenario's world: a broker node, Redis, the sandbox, gateway replicas, the observer."""

    def __init__(self, root: Path, rabbit: RabbitNode, redis_server: RedisServer, accounts: list[str]) -> None:
        self.root = root
        self.rabbit = rabbit
        self.redis = redis_server
        self.accounts = accounts
        self.sandbox_proc: Process | None = None
        self.sandbox: Sandbox | None = None
        self.gateways: dict[int, tuple[Process, int]] = {}
        self.observer: Observer | None = None
        self.keys: set[str] = set()
        # Mobizon has no client message id: its sends are counted per recipient (one per request).
        self.by_recipient: set[str] = set()
        self.phone_of: dict[str, str] = {}
        self.rng = random.Random(20261129)
        self.check_reports = False  # every accepted SMS must end in exactly one delivery event
        self.account_overrides: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] = {
            "retry_schedule_s": RETRY_SCHEDULE_S,
            "max_attempts": 8,
            # A lost answer is looked up once the lease has run out, so the sandbox must have
            # handled a dead replica's request by then (docs/guarantees.md, "Where the guarantees
            # end"), also on a machine whose cores are held by other work.
            "claim_lease_s": 15,
            "drain_timeout_s": 10,
            "log_level": "INFO",
        }
        self.started = time.monotonic()

    def account_docs(self) -> list[dict[str, Any]]:
        assert self.sandbox is not None
        docs = []
        for name in self.accounts:
            doc = account_doc(name, self.sandbox.port, rate_per_s=5000, burst=5000, http_timeout_s=1, linger_ms=20)
            doc.update(self.account_overrides.get(name, {}))
            docs.append(doc)
        return docs

    def start_sandbox(self) -> None:
        self.sandbox_proc, self.sandbox = start_sandbox_process(self.root)

    def start_gateway(self, i: int) -> None:
        port = free_port()
        settings: dict[str, Any] = {
            "amqp_url": self.rabbit.url,
            "redis_url": self.redis.url,
            "state_path": str(self.root / f"unused-{i}.sqlite3"),
        }
        settings.update(self.settings)  # a scenario may route the gateways through a proxy
        env = gateway_env(accounts=self.account_docs(), http_port=port, **settings)
        proc = Process(["run"], env, self.root / f"gateway-{self.accounts[0]}-{i}.log")
        proc.wait_http(port, timeout=60)
        self.gateways[i] = (proc, port)

    def kill(self, i: int) -> None:
        proc, _ = self.gateways.pop(i)
        proc.kill()
        proc.close()

    def terminate(self, i: int) -> int:
        proc, _ = self.gateways.pop(i)
        code = proc.terminate(60)
        proc.close()
        return code

    def ready(self, i: int) -> bool:
        _, port = self.gateways[i]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def all_ready(self) -> bool:
        return all(self.ready(i) for i in self.gateways)

    async def start_observer(self) -> None:
        self.observer = Observer(self.rabbit.url, self.accounts)
        await self.observer.start()

    async def publish(self, items: list[tuple[str, str, bytes]], *, message_ids: bool = False) -> None:
        """(routing key, unique_id, body): the routing key is an account's lane (`<account>`,
        `<account>.urgent`, `<account>.bulk`); the ledger expects one terminal answer per item."""
        owners = [(c.split_key(a)[0], u) for a, u, _ in items]
        self.keys |= {f"{a}/{u}" for a, u in owners}
        for (a, u), (_key, _u, body) in zip(owners, items, strict=True):
            if a in self.by_recipient:
                self.phone_of[f"{a}/{u}"] = json.loads(body)["to"].lstrip("+")
        await publish(self.rabbit.url, [(a, b, u if message_ids else None) for a, u, b in items])

    async def wait_recovered(self, since: float, timeout: float) -> float:
        """Seconds from `since` until every replica is ready and outcomes flow again."""
        assert self.observer is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.observer.settled(self.keys) == len(self.keys)
            if await asyncio.to_thread(self.all_ready) and (self.observer.last_at > since or done):
                return time.monotonic() - since
            await asyncio.sleep(0.2)
        states = {}
        for i, (_proc, port) in self.gateways.items():
            try:
                states[i] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).text[:300]
            except httpx.HTTPError as exc:
                states[i] = type(exc).__name__
        settled = self.observer.settled(self.keys)
        raise RuntimeError(
            f"not recovered {timeout}s after the fault: readyz {states}; {settled}/{len(self.keys)} settled, "
            f"last outcome {time.monotonic() - self.observer.last_at:.1f}s ago"
        )

    async def wait_settled(self, timeout: float) -> None:
        assert self.observer is not None
        deadline = time.monotonic() + timeout
        while self.observer.settled(self.keys) < len(self.keys) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        await asyncio.sleep(2.0)  # late extras (a second outcome, a second send) show up in the ledger too

    def accepted_keys(self) -> set[str]:
        assert self.observer is not None
        return {k for k in self.keys if any(s == "accepted" for _t, s in self.observer.seen.get(k, Seen()).outcomes)}

    async def wait_reports(self, timeout: float) -> None:
        """Until every accepted SMS has its delivery event (or `timeout`), then a quiet while for
        any second event to show up."""
        assert self.observer is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            accepted = self.accepted_keys()
            if all(any(s in FINAL for _t, s in self.observer.seen[k].outcomes) for k in accepted):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)

    def ledger(self, scenario: str) -> Ledger:
        assert self.observer is not None
        assert self.sandbox is not None
        provider_ledger = self.sandbox.ledger()
        sends = provider_ledger["by_unique_id"]
        recipients = provider_ledger.get("by_recipient", {})
        led = Ledger(scenario, published=len(self.keys), reports_checked=self.check_reports)
        for key in self.keys:
            account, uid = key.split("/", 1)
            seen = self.observer.seen.get(key, Seen())
            statuses = [s for _t, s in seen.outcomes if s in TERMINAL]
            if account in self.by_recipient:
                n = int(recipients.get(self.phone_of[key], 0))
            else:
                n = int(sends.get(provider_ref(account, uid), 0))
            if n > 1:
                led.sent_twice += 1
            if seen.dead:
                led.dead_lettered += 1
            if not statuses and not seen.dead:
                led.lost += 1
                continue
            final = statuses[0] if statuses else "dead"
            if final == "accepted":
                led.accepted += 1
                if n == 0:
                    led.notes.append(f"{key} accepted but the provider has no send")
            elif final == "rejected":
                led.rejected += 1
            elif final == "failed":
                led.failed += 1
            elif final == "invalid":
                led.invalid += 1
            else:
                led.other += 1
            if len(set(statuses)) > 1:
                led.notes.append(f"{key} got different outcomes {Counter(statuses)}")
            if self.check_reports:
                if "duplicate" in statuses:
                    led.own_duplicates += 1
                finals = sum(1 for _t, s in seen.outcomes if s in FINAL)
                if final == "accepted" and finals == 0:
                    led.reports_missing += 1
                elif finals > 1:
                    led.reports_twice += 1
                order = [s for _t, s in seen.outcomes if s == "accepted" or s in FINAL]
                if order and order[0] in FINAL:
                    led.reports_early += 1
        if self.check_reports:
            led.notes.append(
                f"delivery events: {led.reports_missing} accepted without one, {led.reports_twice} with more "
                f"than one, {led.reports_early} before their accepted; {led.own_duplicates} own copies answered "
                "duplicate"
            )
        led.seconds = time.monotonic() - self.started
        if provider_ledger.get("answers"):
            led.notes.append(f"provider error answers: {provider_ledger['answers']}")
        events = self.log_events()
        if events:
            led.notes.append(f"gateway log events: {events}")
        not_json = events.pop("not JSON", 0)
        led.extra["log_lines_not_json"] = not_json
        return led

    def log_events(self) -> dict[str, int]:
        """How often the gateways said they recovered from something (the proof the fault hit)."""
        wanted = (
            "consumer_restored",
            "store_epoch_changed",
            "reconciled",
            "record_failed",
            "record_retry",
            "batch_failed",
            "dlr_mark_failed",
            "dlr_marked_late",
            "dlr_publish_unsure",
            "dlr_publish_found",
            "dlr_publish_given_back",
            "waits_exhausted",
            "tracking_rebuilt",
            "stale_deliveries_dropped",
            "loop_stalled",
            "gc_pause",
        )
        counts: Counter[str] = Counter()
        for path in self.root.glob(f"gateway-{self.accounts[0]}-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                try:  # the gateways run with JSON logs: every line, library lines too, is one object
                    event = json.loads(line).get("event")
                except (ValueError, AttributeError):
                    counts["not JSON"] += 1
                    continue
                if event in wanted:
                    counts[event] += 1
        return dict(counts)

    async def close(self) -> None:
        for i in list(self.gateways):
            self.kill(i)
        if self.observer is not None:
            await self.observer.close()
        if self.sandbox_proc is not None:
            self.sandbox_proc.close()


@contextlib.contextmanager
def infrastructure(nodes: int = 1) -> Iterator[tuple[Path, list[RabbitNode], RedisServer]]:
    """The suite's own RabbitMQ node(s) (clustered when more than one) and Redis, stopped after."""
    root = Path(tempfile.mkdtemp(prefix="sms-chaos-"))
    os.chmod(root, 0o755)  # noqa: S103 - the broker runs as the rabbitmq user and must reach its data
    base = 5701 + random.Random().randrange(0, 40) * 5
    started: list[RabbitNode] = []
    redis_server = RedisServer(free_port(), root)
    try:
        redis_server.start()
        for n in range(nodes):
            node = RabbitNode(f"chaos{base}n{n + 1}", base + n, root)
            node.start()
            started.append(node)
            if n > 0:
                node.ctl("stop_app")
                node.ctl("join_cluster", started[0].node)
                node.ctl("start_app")
        yield root, started, redis_server
    finally:
        for node in started:
            node.stop()
        redis_server.kill()
        if os.environ.get("CHAOS_KEEP") is None:
            shutil.rmtree(root, ignore_errors=True)
