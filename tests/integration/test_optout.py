"""The opt-out registry end to end, against the real broker, the in-process sandbox's ledger and
the state store: opt-outs from the bus (`sms.optout`) and from the CLI, refused before any send,
urgent codes let through, removal, bad opt-out messages dead-lettered."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from gateway import contract as c
from gateway.cli import main
from gateway.obs import metrics as m
from gateway.providers.base import provider_ref
from gateway.state.base import OPTOUT_ALL
from gateway.state.sqlite import SqliteStore
from testkit import Bus, eventually, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration


def sends(world: InProcess, account: str, uid: str) -> int:
    ref = provider_ref(account, uid)
    return sum(1 for r in world.state.sends if r.unique_id == ref)


def number() -> str:
    return f"+4869{secrets.randbelow(10**7):07d}"


async def opted(path: Path, account: str, e164: str) -> bool:
    store = SqliteStore(path)
    try:
        return e164 in await store.opted_out(account, [e164])
    finally:
        await store.close()


async def cleared(path: Path, account: str, e164: str) -> bool:
    return not await opted(path, account, e164)


async def gateway_cli(*argv: str) -> int:
    """The operator CLI as a shell runs it (it runs its own event loop: here, on a thread)."""
    return await asyncio.to_thread(main, list(argv))


async def test_an_opt_out_from_the_bus_refuses_normal_and_bulk_lets_urgent_through_and_ends_on_removal(
    world: InProcess,
) -> None:
    name = new_account_name()
    to = number()
    state = world.tmp / "state.sqlite3"
    await world.gateway([world.account(name)])
    refusals = m.REGISTRY.get_sample_value(
        "sms_policy_refusals_total", {"account": name, "lane": "normal", "code": "opted_out"}
    )
    async with Bus.open([name]) as bus:
        await bus.publish_optout(name, {"to": to, "action": "add", "source": "STOP reply"}, app_id="crm")
        await eventually(lambda: opted(state, name, to), 10, "registered")
        await bus.publish(name, request("n-1", to=to))
        await bus.publish(c.lane_key(name, c.Lane.BULK), request("b-1", to=to))
        await bus.publish(c.lane_key(name, c.Lane.URGENT), request("u-1", to=to, text="code 4711"))
        await bus.publish(name, request("other-1", to=number()))
        await bus.wait_for(outcomes=4)
        by_uid = {d["unique_id"]: d for d in bus.outcome_docs()}
        for uid in ("n-1", "b-1"):
            assert by_uid[uid]["status"] == "rejected", by_uid[uid]
            assert by_uid[uid]["error"]["code"] == "opted_out"
            assert sends(world, name, uid) == 0
        assert by_uid["u-1"]["status"] == "accepted"
        assert by_uid["other-1"]["status"] == "accepted"
        assert not bus.dead  # a refusal by policy is not a fault

        await bus.publish_optout(name, {"to": to.removeprefix("+48"), "action": "remove"})  # national form
        await eventually(lambda: cleared(state, name, to), 10, "removed")
        await bus.publish(name, request("n-2", to=to))
        await bus.wait_for(outcomes=5)
    assert bus.outcome_docs()[-1]["status"] == "accepted"
    assert sends(world, name, "n-2") == 1
    after = m.REGISTRY.get_sample_value(
        "sms_policy_refusals_total", {"account": name, "lane": "normal", "code": "opted_out"}
    )
    assert (after or 0) - (refusals or 0) == 1
    store = SqliteStore(state)
    try:
        assert await store.optout_count(name) == 0
    finally:
        await store.close()


async def test_an_opt_out_for_all_accounts_from_the_cli_is_kept_with_who_and_where(
    world: InProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [new_account_name(), new_account_name()]
    to = number()
    monkeypatch.setenv("GATEWAY_STATE_PATH", str(world.tmp / "state.sqlite3"))
    assert await gateway_cli("optout", "add", to, "--all", "--source", "support ticket 881") == 0
    await world.gateway([world.account(n) for n in names])
    async with Bus.open(names) as bus:
        for n in names:
            await bus.publish(n, request(f"{n}-1", to=to))
        await bus.wait_for(outcomes=2)
        assert {d["error"]["code"] for d in bus.outcome_docs()} == {"opted_out"}
        capsys.readouterr()
        assert await gateway_cli("optout", "list", "--all", "--json", "--show-number", "--limit", "100000") == 0
        listed = json.loads(capsys.readouterr().out)
        (entry,) = [e for e in listed["entries"] if e["number"] == to]
        assert (entry["via"], entry["source"]) == ("cli", "support ticket 881")
        assert await gateway_cli("optout", "remove", to, "--all") == 0
        assert await gateway_cli("optout", "remove", to, "--all") == 1  # nothing was there any more
        await bus.publish(names[0], request(f"{names[0]}-2", to=to))
        await bus.wait_for(outcomes=3)
    assert bus.outcome_docs()[-1]["status"] == "accepted"


async def test_an_import_adds_the_good_lines_names_the_bad_ones_and_exports_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_STATE_PATH", str(tmp_path / "state.sqlite3"))
    good = [number() for _ in range(3)]
    src = tmp_path / "stops.csv"
    src.write_text(
        "number,source,at\n"
        f"{good[0]},sms-reply,2026-11-30T10:00:00Z\n"
        f"{good[1]}\n"
        "not a number\n"
        f"{good[2].removeprefix('+')},crm\n"  # international digits without the +
    )
    assert await gateway_cli("optout", "import", str(src), "--all", "--json") == 1  # one line was refused
    doc = json.loads(capsys.readouterr().out)
    assert (doc["read"], doc["added"], doc["invalid"], doc["invalid_lines"]) == (3, 3, 1, [4])
    assert await gateway_cli("optout", "export", "--all") == 0
    rows = {line.split(",")[0]: line.split(",") for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(good) <= set(rows)
    assert rows[good[0]][1:4] == ["2026-11-30T10:00:00Z", "import", "sms-reply"]
    assert rows[good[1]][3] == str(src)  # the file's name when a line says no source
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        assert await store.opted_out("any", good) == set(good)
        assert await store.optout_count(OPTOUT_ALL) == 3
    finally:
        await store.close()


async def test_a_bad_opt_out_message_is_dead_lettered_and_replays_to_the_opt_out_exchange(world: InProcess) -> None:
    from gateway.ops import deadletters as dl

    name = new_account_name()
    await world.gateway([world.account(name)])
    async with Bus.open([name]) as bus:
        await bus.publish_optout(name, {"to": "12", "action": "add"})
        await bus.publish_optout(name, b"{not json")
        await bus.publish_optout(name, {"to": number(), "action": "forget"})
        await bus.wait_for(dead=3)
    codes = sorted(d.headers[c.H_ERROR_CODE] for d in bus.dead)
    assert codes == ["bad_field", "bad_json", "invalid_number"]
    assert {d.headers[c.H_EXCHANGE] for d in bus.dead} == {c.OPTOUT_EXCHANGE}
    assert {d.routing_key for d in bus.dead} == {f"invalid.{name}"}
    letter = dl.DeadLetter(
        id="x", at=None, account=name, reason="invalid", code="bad_field", message="", attempts=0,
        unique_id=None, to=None, headers={}, properties={}, body=b"", exchange=c.OPTOUT_EXCHANGE,
    )  # fmt: skip
    assert letter.replay_key == name
