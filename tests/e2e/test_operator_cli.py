"""The operator CLI against the real broker, store and a running gateway: dead letters listed,
shown, replayed (also after a `kill -9` of the CLI half-way) and purged; topology drift found;
accounts' pauses shown; `gateway send` and its exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from gateway import contract as c
from gateway.contract import Lane
from testkit import AMQP_URL, Bus, Process, Sandbox, account_doc, new_account_name, port_open, request, start_gateway
from testkit.processes import gateway_env

pytestmark = pytest.mark.e2e


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def cli_json(*args: str, env: dict[str, str]) -> Any:
    done = cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@dataclass
class Ring:
    sandbox: Sandbox
    name: str  # the test's account
    env: dict[str, str]  # what the CLI runs with: the gateway's accounts and state file


@pytest.fixture
def ring(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], accounts_cleanup: list[str], procs: list[Process]
) -> Callable[..., Ring]:
    """Starts a gateway for one new account (`fault`: a sandbox fault armed for it first)."""

    def start(prefix: str, *, fault: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
              **account: Any) -> Ring:  # fmt: skip
        _, sandbox = sandbox_process
        name = new_account_name(prefix)
        accounts_cleanup.append(name)
        accounts = [account_doc(name, sandbox.port, **account)]
        if fault is not None:
            sandbox.fault(match=f"token:tok-{name}", **fault)
        proc, _port = start_gateway(tmp_path, accounts, **(settings or {}))
        procs.append(proc)
        return Ring(sandbox, name, gateway_env(accounts=accounts, state_path=str(tmp_path / "state.sqlite3")))

    return start


def letters_of(account: str, env: dict[str, str]) -> list[dict[str, Any]]:
    return list(cli_json("dlq", "list", "--account", account, "--limit", "100000", env=env))


async def test_rejected_dead_letters_are_replayed_after_the_cause_is_fixed(ring: Callable[..., Ring]) -> None:
    r = ring("replay", fault={"code": 3005})  # the account may not send this type (yet)
    sandbox, name, env = r.sandbox, r.name, r.env
    uids = [f"r{i}" for i in range(20)]
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(u, to=f"+4850222{i:04d}")) for i, u in enumerate(uids)])
        await bus.wait_for(outcomes=20, dead=20)
        assert Counter(d["status"] for d in bus.outcome_docs()) == {"rejected": 20}

        rows = letters_of(name, env)
        assert sorted(r["unique_id"] for r in rows) == sorted(uids)
        assert {(r["reason"], r["code"]) for r in rows} == {("rejected", "3005")}
        assert all(r["to"].startswith("+485") and "*" in r["to"] for r in rows)  # masked in the listing
        shown = cli_json("dlq", "show", rows[0]["id"], env=env)
        assert shown["headers"][c.H_REASON] == "rejected"
        assert shown["body"]["unique_id"] == rows[0]["unique_id"]
        assert shown["to"].startswith("+4850222")  # in full: the operator asked for this one
        assert cli("dlq", "show", "0000deadbeef", env=env).returncode == 1

        # Sent again without the replay header, a rejected id is still answered `duplicate`.
        await bus.publish(name, request("r0", to="+48502220000"))
        await bus.wait_for(outcomes=21)
        assert bus.outcome_docs()[-1]["status"] == "duplicate"

        sandbox.clear_faults()  # the cause is fixed
        dry = cli_json("dlq", "replay", "--account", name, "--code", "3005", "--dry-run", env=env)
        assert dry == {"matched": 20, "replayed": 0, "dry_run": True}
        assert len(letters_of(name, env)) == 20  # a dry run and the listings removed nothing
        done = cli_json("dlq", "replay", "--account", name, "--code", "3005", "--yes", env=env)
        assert (done["matched"], done["replayed"]) == (20, 20)
        await bus.wait_for(outcomes=41)
        replayed = bus.outcome_docs()[21:]
        assert Counter(d["status"] for d in replayed) == {"accepted": 20}
        assert letters_of(name, env) == []

        # A replay copy published twice (its ack was lost): the second is a duplicate, not a send.
        await bus.publish(name, request("r1", to="+48502220001"), headers={c.H_REPLAY: "again"})
        await bus.wait_for(outcomes=42)
        assert bus.outcome_docs()[-1]["status"] == "duplicate"
        assert bus.outcome_docs()[-1]["original"]["status"] == "accepted"
        again = cli_json("dlq", "replay", "--account", name, "--yes", env=env)
        assert again["replayed"] == 0
        await bus.settle(0.5)
    assert all(sandbox.sends_of(name, u) == 1 for u in uids)


@pytest.mark.timeout(900)  # above the sum of its own waits (180 s each), on a loaded machine
async def test_replay_killed_half_way_then_run_again_sends_every_letter_once(ring: Callable[..., Ring]) -> None:
    """2,000 rejected dead letters; `kill -9` of the replaying CLI after about a fifth; a second
    replay: every request ends accepted exactly once at the provider, no letter is left or lost."""
    r = ring("kill", fault={"code": 3005}, rate_per_s=100_000, burst=100_000)
    sandbox, name, env = r.sandbox, r.name, r.env
    n = 2000
    uids = [f"k{i}" for i in range(n)]
    async with Bus.open([name]) as bus:
        await bus.publish_many([(name, request(u, to=f"+485033{i:05d}")) for i, u in enumerate(uids)])
        await bus.wait_for(outcomes=n, dead=n, timeout=180)
        sandbox.clear_faults()

        replay = subprocess.Popen(
            [sys.executable, "-m", "gateway", "dlq", "replay", "--account", name, "--yes", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert replay.stderr is not None
        progress = ""
        for line in replay.stderr:  # "replayed 200/5000", one line per confirmed chunk
            progress = line.strip()
            if progress.startswith("replayed ") and int(progress.split()[1].split("/")[0]) >= n // 5:
                break
        os.kill(replay.pid, signal.SIGKILL)
        replay.wait(10)
        replay.stderr.close()
        assert replay.stdout is not None
        replay.stdout.close()
        assert replay.returncode == -signal.SIGKILL, progress
        # The broker gives the killed connection's unacked letters back as it notices the close.
        left, before = len(letters_of(name, env)), -1
        while left != before:
            await asyncio.sleep(1.0)
            left, before = len(letters_of(name, env)), left
        assert 0 < left < n, f"the kill came at {progress!r} with {left} letters left: not half-way"

        second = cli_json("dlq", "replay", "--account", name, "--yes", env=env)
        assert second["replayed"] == left
        deadline = time.monotonic() + 180
        while True:
            accepted = Counter(d["unique_id"] for d in bus.outcome_docs() if d["status"] == "accepted")
            if len(accepted) == n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await bus.settle(1.0)
    accepted = Counter(d["unique_id"] for d in bus.outcome_docs() if d["status"] == "accepted")
    assert set(accepted) == set(uids), f"{n - len(accepted)} never accepted"
    assert max(accepted.values()) == 1
    ledger = sandbox.ledger()["by_unique_id"]
    from gateway.providers.base import provider_ref

    sends = [ledger.get(provider_ref(name, u), 0) for u in uids]
    assert (min(sends), max(sends)) == (1, 1)
    assert letters_of(name, env) == []
    # Letters the kill left unconfirmed were published twice: those copies ended `duplicate`.
    statuses = Counter(d["status"] for d in bus.outcome_docs())
    assert statuses["rejected"] == n
    assert statuses["accepted"] == n
    assert set(statuses) <= {"rejected", "accepted", "duplicate"}


async def test_purge_removes_only_the_selection(ring: Callable[..., Ring]) -> None:
    r = ring("purge")
    name, env = r.name, r.env
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("bad-number", to="12"))  # invalid
        await bus.publish(name, b"{not json")  # invalid, no unique_id
        await bus.publish(name, b"[" * 50_000)  # hostile: the listing must read past it
        await bus.publish(name, request("m", text="x", vars={"a": True}))  # invalid: bad vars
        await bus.wait_for(dead=4)
    rows = letters_of(name, env)
    assert Counter(r["code"] for r in rows) == {"invalid_number": 1, "bad_json": 2, "bad_field": 1}
    bodies = [cli_json("dlq", "show", r["id"], env=env)["body"] for r in rows if r["code"] == "bad_json"]
    assert sorted(b[:3] for b in bodies) == ["[[[", "{no"]  # shown as text: neither parses
    for command in ("purge", "replay"):  # no terminal to ask: --yes is required, and nothing changes
        refused = cli("dlq", command, "--account", name, env=env)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().endswith("needs --yes: there is no terminal to ask"), refused.stderr
    assert len(letters_of(name, env)) == 4
    purged = cli_json("dlq", "purge", "--account", name, "--code", "bad_json", "--yes", env=env)
    assert purged["purged"] == 2
    assert sorted(r["code"] for r in letters_of(name, env)) == ["bad_field", "invalid_number"]
    assert cli_json("dlq", "purge", "--account", name, "--yes", env=env)["purged"] == 2
    assert letters_of(name, env) == []


async def test_topology_check_finds_wrong_arguments_and_missing_bindings(
    accounts_cleanup: list[str], services: None
) -> None:
    assert port_open(15672), (
        "RabbitMQ's management API is not on 127.0.0.1:15672 (rabbitmq-plugins enable rabbitmq_management)"
    )
    wrong, unbound, fine = (new_account_name(p) for p in ("wrong", "unbound", "fine"))
    accounts_cleanup += [wrong, unbound, fine]
    env = gateway_env()
    assert cli("topology", "declare", "--account", fine, env=env).returncode == 0
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(c.account_queue(wrong), durable=True)  # classic, no arguments: a producer's guess
        await channel.declare_queue(
            c.account_queue(unbound), durable=True, arguments=dict(_account_args(unbound))
        )  # right arguments, never bound
    ok = cli("topology", "check", "--account", fine, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = cli("topology", "check", "--account", fine, "--account", wrong, "--account", unbound, "--json", env=env)
    assert report.returncode == 1, report.stdout + report.stderr
    found = {(d["kind"], d["name"]) for d in json.loads(report.stdout)["drift"]}
    # Their urgent and bulk lanes were never declared.
    lanes = {("missing_queue", c.account_queue(a, lane)) for a in (wrong, unbound) for lane in (URGENT, BULK)}
    assert found == {
        ("wrong_arguments", c.account_queue(wrong)),
        ("missing_binding", c.account_queue(wrong)),
        ("missing_binding", c.account_queue(unbound)),
        *lanes,
    }

    # Without the management API, AMQP alone still finds the wrong arguments (the broker's 406).
    blind = gateway_env(management_url="http://guest:guest@127.0.0.1:1/")
    report = cli("topology", "check", "--account", wrong, "--json", env=blind)
    assert report.returncode == 1, report.stdout + report.stderr
    doc = json.loads(report.stdout)
    assert doc["bindings_checked"] is False
    assert [(d["kind"], d["name"]) for d in doc["drift"]] == [
        ("missing_queue", c.account_queue(wrong, URGENT)),
        ("wrong_arguments", c.account_queue(wrong)),
        ("missing_queue", c.account_queue(wrong, BULK)),
    ]
    assert "x-queue-type" in doc["drift"][1]["detail"] or "inequivalent" in doc["drift"][1]["detail"]
    # `declare` over a queue with other arguments fails with the broker's reason, exit 1.
    refused = cli("topology", "declare", "--account", wrong, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "inequivalent" in refused.stderr, refused.stderr


URGENT, BULK = Lane.URGENT, Lane.BULK


def _account_args(account: str) -> dict[str, Any]:
    from gateway.bus import topology

    return topology.account_queue(account).arguments


async def test_accounts_shows_depth_consumers_and_a_pause_with_its_reason(ring: Callable[..., Ring]) -> None:
    # Bad credentials once: the account pauses for 5 minutes.
    r = ring("acct", fault={"code": 1001, "count": 1}, settings={"account_pause_s": 300}, rate_per_s=25, burst=5)
    name, env = r.name, r.env
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("p0"))
        await bus.wait_for(outcomes=1)
        await bus.publish_many([(name, request(f"q{i}")) for i in range(7)])
        await asyncio.sleep(1.0)
    (row,) = cli_json("accounts", env=env)
    assert row["account"] == name
    assert (row["rate_per_s"], row["burst"]) == (25, 5)
    assert row["ready"] == 7  # queued behind the pause
    assert row["consumers"] == 0  # the paused gateway cancelled its consumers, on every lane
    assert {lane: v["ready"] for lane, v in row["lanes"].items()} == {"urgent": 0, "normal": 7, "bulk": 0}
    assert row["lanes"]["urgent"]["queue"] == f"sms.send.{name}.urgent"
    (pause,) = row["paused"]
    assert (pause["reason"], pause["code"]) == ("account_error", "1001")
    table = cli("accounts", env=env)
    assert table.returncode == 0, table.stdout
    assert "account_error 1001 until" in table.stdout, table.stdout
    assert "0/7/0" in table.stdout, table.stdout


async def test_send_keeps_its_correlation_and_says_how_it_ended(ring: Callable[..., Ring]) -> None:
    r = ring("send")
    name, env = r.name, r.env
    sent = cli(
        "send", "-a", name, "--to", "+48500600700", "--text", "Code {code}", "--var", "code=4711", "--json", env=env
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert json.loads(sent.stdout)["status"] == "accepted"
    literal = cli("send", "-a", name, "--to", "+48500600700", "--text", "price: {5} EUR", env=env)
    assert literal.returncode == 0, literal.stdout + literal.stderr
    assert literal.stdout.startswith("accepted"), literal.stdout + literal.stderr
    bad = cli("send", "-a", name, "--to", "12", "--text", "x", env=env)
    assert bad.returncode == 1, bad.stdout
    assert bad.stdout.startswith("invalid"), bad.stdout
    nobody = cli(
        "send", "-a", new_account_name("nobody"), "--to", "+48500600700", "--text", "x", "--wait", "1", env=env
    )
    assert nobody.returncode == 1
    assert "invalid" in nobody.stdout
    assert cli("send", "--to", "1", "--text", "x", "--var", "novalue", env=env).returncode == 2
    down = cli("send", "--to", "1", "--text", "x", env=gateway_env(amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    assert down.returncode == 4, down.stderr
    assert down.stderr.startswith("gateway: cannot reach RabbitMQ"), down.stderr

    # A producer's own correlation_id comes back on the outcome (the usual RPC pattern).
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange(c.SEND_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(request("corr-1"), correlation_id="my-rpc-42", reply_to=replies.name), routing_key=name
        )
        message = await _next(replies)
        assert message.correlation_id == "my-rpc-42"
        assert json.loads(message.body)["unique_id"] == "corr-1"

        # Contract evolution: fields this gateway does not know (a newer producer's) are ignored.
        extra = request("extra-1", priority="high", channel_hint={"k": [1, 2]}, v=1)
        await exchange.publish(aio_pika.Message(extra, reply_to=replies.name), routing_key=name)
        message = await _next(replies)
        assert json.loads(message.body)["status"] == "accepted"
        assert message.correlation_id == "extra-1"  # none given: the unique_id


async def _next(queue: aio_pika.abc.AbstractQueue, timeout: float = 30) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    raise AssertionError("no outcome")


def trace_of(uid: str, env: dict[str, str], *args: str) -> dict[str, Any] | None:
    done = cli("trace", uid, "--json", *args, env=env)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    found = json.loads(done.stdout)
    return found[0] if found else None


async def trace_until(uid: str, env: dict[str, str], where: str, key: str) -> dict[str, Any]:
    """The trace once it shows `where` and carries `key`; fails after 20 s."""
    deadline = time.monotonic() + 20
    doc = None
    while time.monotonic() < deadline:
        doc = trace_of(uid, env)
        if doc is not None and doc["where"] == where and key in doc:
            return doc
        await asyncio.sleep(0.3)
    raise AssertionError(f"trace of {uid}: {doc}")


RETRY_S = 777  # a delay no other test uses: its retry queue is this test's alone


@pytest.mark.timeout(600)  # a dozen CLI runs and three gateways' worth of waits, on a loaded machine
async def test_trace_says_where_a_request_is_and_how_it_ended(
    tmp_path: Path, sandbox_process: tuple[Process, Sandbox], accounts_cleanup: list[str], procs: list[Process]
) -> None:
    _, sandbox = sandbox_process
    ok, rej, slow = new_account_name("tr"), new_account_name("trrej"), new_account_name("trretry")
    accounts_cleanup += [ok, rej, slow]
    sandbox.fault(match=f"token:tok-{rej}", code=3005)  # refused for good: rejected, dead-lettered
    sandbox.fault(match=f"token:tok-{slow}", http_status=500, count=1000)  # retried after 777 s
    accounts = [account_doc(name, sandbox.port) for name in (ok, rej, slow)]
    settings = {"dlr_poll_after_s": 1, "dlr_poll_max_gap_s": 1, "retry_schedule_s": [RETRY_S]}
    proc, _port = start_gateway(tmp_path, accounts, **settings)
    procs.append(proc)
    env = gateway_env(accounts=accounts, state_path=str(tmp_path / "state.sqlite3"))
    async with Bus.open([ok, rej, slow]) as bus:
        await bus.publish(ok, request("tr-delivered", to="+48500600711"))
        await bus.publish(ok, request("tr-invalid", to="12"))
        await bus.publish(rej, request("tr-rejected"))
        await bus.publish(slow, request("tr-retrying"))
        await bus.wait_for(outcomes=3, dead=2)

        delivered: dict[str, Any] | None = None
        for _ in range(60):  # the first poll comes a second after acceptance
            delivered = trace_of("tr-delivered", env)
            if delivered is not None and (delivered.get("delivery") or {}).get("status"):
                break
            await asyncio.sleep(0.5)
        assert delivered is not None
        assert delivered["where"] == "finished"
        assert delivered["result"]["status"] == "accepted"
        assert delivered["result"]["provider_message_id"]
        assert delivered["delivery"]["status"] == "delivered"
        assert delivered["delivery"]["status_at"]
        assert delivered["to"] == "+485*****711"  # masked unless asked

        rejected = await trace_until("tr-rejected", env, "finished", "dead_letters")
        assert rejected["result"]["status"] == "rejected"
        assert rejected["result"]["error"]["code"] == "3005"
        assert [d["reason"] for d in rejected["dead_letters"]] == ["rejected"]

        invalid = await trace_until("tr-invalid", env, "dead_lettered", "dead_letters")
        assert [d["code"] for d in invalid["dead_letters"]] == ["invalid_number"]

        retrying = trace_of("tr-retrying", env)
        assert retrying is not None
        assert retrying["where"] == "waiting_for_retry"
        assert retrying["last_retry"]["attempts"] == 1
        assert retrying["last_retry"]["code"] == "http_500"
        assert retrying["reconcile_first"] is True  # a 500 may have been processed: asked before resent

    by_number = json.loads(cli("trace", "--to", "+48500600711", "--account", ok, "--json", env=env).stdout)
    assert [d["unique_id"] for d in by_number] == ["tr-delivered"]
    shown = cli("trace", "tr-delivered", "--show-number", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "delivered at" in shown.stdout
    assert "+48500600711" in shown.stdout
    unknown = cli("trace", "never-sent", env=env)
    assert unknown.returncode == 1
    assert unknown.stdout.startswith("nothing is known of unique_id never-sent")
    # The parked copy would come back to a deleted queue: its retry queue, this test's own delay, goes.
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, connection.channel() as channel:
        await channel.queue_delete(c.retry_queue(RETRY_S * 1000))
