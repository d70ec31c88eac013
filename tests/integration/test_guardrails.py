"""Guardrails before the provider, end to end against the real broker and the in-process sandbox:
segments and encoding, transliteration, the parts limit, the country allow-list, costs."""

from __future__ import annotations

import pytest

from gateway import contract as c
from gateway.obs import metrics as m
from gateway.providers.base import provider_ref
from testkit import Bus, new_account_name, request
from tests.conftest import InProcess

pytestmark = pytest.mark.integration

POLISH = "Zażółć gęślą jaźń"


def sent(world: InProcess, account: str, uid: str) -> list[object]:
    ref = provider_ref(account, uid)
    return [r for r in world.state.sends if r.unique_id == ref]


def sample(name: str, **labels: str) -> float:
    return m.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_full_transliteration_sends_polish_as_gsm7_in_one_part(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, transliterate="full")])
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("pl-1", text=POLISH))
        await bus.wait_for(outcomes=1)
    (doc,) = bus.outcome_docs()
    assert doc["status"] == "accepted"
    assert (doc["encoding"], doc["parts"], doc["transliterated"]) == ("gsm7", 1, "full")
    (record,) = sent(world, name, "pl-1")
    assert record.text == "Zazolc gesla jazn"  # type: ignore[attr-defined]
    assert record.utf is False  # type: ignore[attr-defined]


async def test_without_transliteration_the_text_goes_out_as_written_with_utf(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name)])  # transliterate: off by default
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("pl-2", text=POLISH * 5))  # 89 characters: two UCS-2 parts
        await bus.wait_for(outcomes=1)
    (doc,) = bus.outcome_docs()
    assert (doc["status"], doc["encoding"], doc["parts"]) == ("accepted", "ucs2", 2)
    assert "transliterated" not in doc
    (record,) = sent(world, name, "pl-2")
    assert record.text == POLISH * 5  # type: ignore[attr-defined]
    assert record.utf is True  # type: ignore[attr-defined]


async def test_a_text_over_max_parts_is_invalid_and_never_sent(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, max_parts=1)])
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("long-1", text="a" * 161))
        await bus.publish(name, request("short-1", text="a" * 160))
        await bus.wait_for(outcomes=2, dead=1)
    by_uid = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert by_uid["long-1"]["status"] == "invalid"
    assert by_uid["long-1"]["error"]["code"] == "too_many_parts"
    assert "2 parts" in by_uid["long-1"]["error"]["message"]
    assert by_uid["short-1"]["status"] == "accepted"
    assert not sent(world, name, "long-1")
    assert bus.dead[0].headers[c.H_REASON] == "invalid"


async def test_a_country_outside_the_allow_list_is_rejected_without_a_send_or_a_dead_letter(
    world: InProcess,
) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, allowed_countries=["pl", "CZ"])])
    before = sample("sms_policy_refusals_total", account=name, lane="normal", code="country_blocked")
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("de-1", to="+4915112345678"))
        await bus.publish(name, request("pl-1", to="+48500600700"))
        await bus.publish(name, request("cz-1", to="+420601123456"))
        await bus.wait_for(outcomes=3)
        await bus.settle(0.3)
    by_uid = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert by_uid["de-1"]["status"] == "rejected"
    assert by_uid["de-1"]["error"]["code"] == "country_blocked"
    assert "DE" in by_uid["de-1"]["error"]["message"]
    assert by_uid["pl-1"]["status"] == by_uid["cz-1"]["status"] == "accepted"
    assert not sent(world, name, "de-1")
    assert not bus.dead  # a refusal by policy is not a fault
    after = sample("sms_policy_refusals_total", account=name, lane="normal", code="country_blocked")
    assert after - before == 1


async def test_accepted_outcomes_carry_their_cost_and_a_duplicate_does_not_count_it_again(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, price_per_part=0.07)])
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("cost-1", text="a" * 200))  # two GSM-7 parts
        await bus.wait_for(outcomes=1)
        await bus.publish(name, request("cost-1", text="a" * 200))
        await bus.wait_for(outcomes=2)
    first, second = bus.outcome_docs()
    assert (first["status"], first["parts"], first["encoding"], first["cost"]) == ("accepted", 2, "gsm7", 0.14)
    assert second["status"] == "duplicate"
    assert "cost" not in second
    assert second["original"]["cost"] == 0.14
    assert sample("sms_cost_total", account=name, app="other") == pytest.approx(0.14)
    assert sample("sms_parts_total", account=name, encoding="gsm7") == 2


async def test_the_cost_metric_names_only_the_configured_applications(world: InProcess) -> None:
    name = new_account_name()
    shop = {"budget_parts_per_month": 10_000}
    await world.gateway([world.account(name, price_per_part=0.05, app_budgets={"shop": shop})])
    async with Bus.open([name]) as bus:
        await bus.publish(name, request("s-1"), app_id="shop")
        await bus.publish(name, request("w-1", to="+48500600701"), app_id="web-7f3a")  # not configured
        await bus.publish(name, request("n-1", to="+48500600702"))  # no app_id at all
        await bus.wait_for(outcomes=3)
    assert sample("sms_cost_total", account=name, app="shop") == pytest.approx(0.05)
    assert sample("sms_cost_total", account=name, app="other") == pytest.approx(0.10)
    assert sample("sms_cost_total", account=name, app="web-7f3a") == 0


async def test_parts_saved_by_transliteration_are_counted(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, transliterate="lookalikes")])
    async with Bus.open([name]) as bus:
        # 150 plain characters and a typographic apostrophe: three UCS-2 parts as written, one GSM-7 part.
        await bus.publish(name, request("q-1", text="a" * 150 + "\u2019"))
        await bus.wait_for(outcomes=1)
    (doc,) = bus.outcome_docs()
    assert (doc["encoding"], doc["parts"], doc["transliterated"]) == ("gsm7", 1, "lookalikes")
    assert sample("sms_parts_saved_total", account=name) == 2


async def test_a_burst_to_one_foreign_range_trips_the_velocity_guard_and_names_the_range(world: InProcess) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, country_caps_per_hour={"NG": 3, "*": 100})])
    async with Bus.open([name]) as bus:
        # Pumping rides on login codes: the urgent lane is guarded too.
        for i in range(5):
            await bus.publish(c.lane_key(name, c.Lane.URGENT), request(f"ng-{i}", to=f"+234803123{i:04d}"))
        await bus.publish(name, request("pl-1", to="+48500600700"))
        await bus.wait_for(outcomes=6)
        await bus.settle(0.3)
    by_uid = {d["unique_id"]: d for d in bus.outcome_docs()}
    ng = [by_uid[f"ng-{i}"] for i in range(5)]
    assert sorted(d["status"] for d in ng) == ["accepted"] * 3 + ["rejected"] * 2
    blocked = [d for d in ng if d["status"] == "rejected"]
    assert {d["error"]["code"] for d in blocked} == {"velocity_blocked"}
    assert "3 messages to NG" in blocked[0]["error"]["message"]
    assert by_uid["pl-1"]["status"] == "accepted"
    assert sum(1 for r in world.state.sends if r.phone.startswith("+234")) == 3
    assert not bus.dead
    assert sample("sms_velocity_blocked_total", account=name, country="NG", range="+23480") == 2


async def test_a_recipient_over_its_daily_cap_is_capped_on_normal_and_bulk_but_gets_its_codes(
    world: InProcess,
) -> None:
    name = new_account_name()
    await world.gateway([world.account(name, frequency_cap_per_day=2)])
    async with Bus.open([name]) as bus:
        for i in range(2):
            await bus.publish(name, request(f"n-{i}", to="+48500600777"))
        await bus.wait_for(outcomes=2)
        await bus.publish(c.lane_key(name, c.Lane.BULK), request("b-1", to="+48500600777"))
        await bus.publish(c.lane_key(name, c.Lane.URGENT), request("u-1", to="+48500600777"))
        await bus.publish(name, request("other-1", to="+48500600778"))
        await bus.wait_for(outcomes=5)
    by_uid = {d["unique_id"]: d for d in bus.outcome_docs()}
    assert [by_uid[f"n-{i}"]["status"] for i in range(2)] == ["accepted", "accepted"]
    assert by_uid["b-1"]["status"] == "rejected"
    assert by_uid["b-1"]["error"]["code"] == "frequency_capped"
    assert by_uid["u-1"]["status"] == "accepted"
    assert by_uid["other-1"]["status"] == "accepted"
