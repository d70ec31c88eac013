"""Send classes at admission: the urgent lane's validity and the bulk lane's quiet hours, on a clock
the tests set (the priority between lanes is the store's: tests/integration/test_store.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import contract as c
from gateway.config import Account, QuietHours, Settings
from gateway.contract import Lane
from gateway.core import lanes
from gateway.core.decisions import Defer, Finish, Job
from gateway.core.pipeline import Pipeline
from gateway.providers import build_adapter
from gateway.providers.base import ProviderAdapter
from gateway.state.sqlite import SqliteStore
from tests.fakes import FakeClock


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def account(**kw: object) -> Account:
    doc: dict[str, object] = {"name": "acme", "provider": "serwersms", "base_url": "http://sandbox.invalid"}
    doc.update({"token": "t"})
    return Account.model_validate({**doc, **kw})


def body(uid: str = "u1", to: str = "+48500600700", **kw: object) -> bytes:
    return json.dumps({"unique_id": uid, "to": to, "text": "hello", **kw}).encode()


# -- quiet hours ---------------------------------------------------------------------------------


def test_a_window_reads_and_writes_as_hh_mm_and_refuses_what_is_not_one() -> None:
    assert str(QuietHours.parse(" 21:00-08:00 ")) == "21:00-08:00"
    for bad in ("21-08", "24:00-08:00", "21:00-21:00", "9:00-10:00", "21:00 - 08:00"):
        with pytest.raises(ValueError, match=r"window|empty"):
            QuietHours.parse(bad)
    with pytest.raises(ValueError, match="window"):
        account(quiet_hours="tonight")
    assert account(quiet_hours="22:30-07:15").quiet_window == QuietHours(22 * 60 + 30, 7 * 60 + 15)
    assert account().quiet_window is None


@pytest.mark.parametrize(
    ("window", "local", "left_s"),
    [
        ("21:00-08:00", "2026-12-06T22:00:00+01:00", 10 * 3600),  # inside, wraps midnight
        ("21:00-08:00", "2026-12-07T07:59:30+01:00", 30),
        ("21:00-08:00", "2026-12-07T08:00:00+01:00", 0),  # the end is outside
        ("21:00-08:00", "2026-12-06T20:59:59+01:00", 0),
        ("12:00-14:00", "2026-12-06T13:00:00+01:00", 3600),  # a window within one day
        ("12:00-14:00", "2026-12-06T14:30:00+01:00", 0),
    ],
)
def test_seconds_left_in_the_window(window: str, local: str, left_s: float) -> None:
    assert QuietHours.parse(window).seconds_left(datetime.fromisoformat(local)) == left_s


def test_a_daylight_saving_change_inside_the_window_counts_in_real_seconds() -> None:
    # Warsaw, 29 March 2026: clocks go from 02:00 to 03:00. From 01:30 to 04:00 is 1.5 hours, not 2.5.
    now = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    phone = "+48500600700"
    assert lanes.quiet_wait_s(QuietHours.parse("01:00-04:00"), phone, "PL", now) == 1.5 * 3600


def test_the_recipient_s_own_zone_decides_and_a_number_across_zones_waits_for_all() -> None:
    window = QuietHours.parse("21:00-08:00")
    now = datetime(2026, 12, 6, 13, 30, tzinfo=UTC)  # 14:30 in Warsaw, 08:30 in New York, 03:30 in Honolulu
    assert lanes.quiet_wait_s(window, "+48500600700", "PL", now) == 0
    assert lanes.quiet_wait_s(window, "+12125551234", "PL", now) == 0  # New York is awake
    # A Russian mobile may ring from Moscow to Anadyr: it waits for Irkutsk (21:30 now) to reach 08:00.
    assert lanes.quiet_wait_s(window, "+79161234567", "PL", now) == 10.5 * 3600
    # A US toll-free number rings from Guam to Pago Pago, 21 hours apart: it waits for Guam's 08:00
    # (22:00 UTC, when every zone of it is awake).
    assert lanes.quiet_wait_s(window, "+18005551234", "PL", now) == 8.5 * 3600
    # With a longer window no hour suits every zone: it then waits only while all of them are inside it.
    assert lanes.quiet_wait_s(QuietHours.parse("19:00-10:00"), "+18005551234", "PL", now) == 0  # St John's: 10:00
    evening = datetime(2026, 12, 6, 21, 0, tzinfo=UTC)  # 22:00 in Warsaw
    assert lanes.quiet_wait_s(window, "+48500600700", "PL", evening) == 10 * 3600


def test_a_deferred_copy_hops_through_the_declared_delays() -> None:
    delays = [1000, 2000, 5000, 10000, 60000, 600000, 3600000]
    assert lanes.defer_step_ms(10 * 3600, delays) == 3600000
    assert lanes.defer_step_ms(1800, delays) == 600000
    assert lanes.defer_step_ms(7, delays) == 5000
    assert lanes.defer_step_ms(0.2, delays) == 1000  # shorter than all: the shortest


# -- admission per lane ----------------------------------------------------------------------------


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, ProviderAdapter]]:
    store = SqliteStore(tmp_path / "state.sqlite3")
    adapter = build_adapter(account())
    yield store, adapter
    await adapter.close()
    await store.close()


def pipeline(parts: tuple[SqliteStore, ProviderAdapter], lane: Lane, clock: FakeClock, **kw: object) -> Pipeline:
    store, adapter = parts
    options = Settings(_env_file=None).send  # type: ignore[call-arg]
    return Pipeline(
        account=account(**kw), adapter=adapter, store=store, options=options, owner="t", lane=lane, clock=clock
    )


async def test_an_urgent_request_is_valid_for_its_validity_from_its_publication(
    parts: tuple[SqliteStore, ProviderAdapter],
) -> None:
    clock = FakeClock(at("2026-12-06T12:00:00+00:00"))
    urgent = pipeline(parts, Lane.URGENT, clock, urgent_validity_s=60)
    fresh = Job(published_at=clock.time() - 30)
    assert urgent.admit(fresh, body(), None) is None  # joins a batch
    assert fresh.valid_until == clock.time() + 30
    assert fresh.request is not None
    assert fresh.request.expires_at == datetime.fromtimestamp(clock.time() + 30, UTC)
    stale = Job(published_at=clock.time() - 61)
    decision = urgent.admit(stale, body("u2"), None)
    assert isinstance(decision, Finish)
    assert decision.status is c.Status.EXPIRED
    assert decision.result.error is not None
    assert "validity" in decision.result.error.message
    # Without a timestamp the validity counts from the first consumption, and its copies carry it.
    first = Job()
    assert urgent.admit(first, body("u3"), None) is None
    assert first.valid_until == clock.time() + 60
    clock.advance(61)
    copy = Job(attempts=1, valid_until=first.valid_until)
    assert isinstance(urgent.admit(copy, body("u3"), None), Finish)
    # Its own expires_at stands; and the other lanes have no validity.
    own = Job(published_at=clock.time() - 3600)
    assert urgent.admit(own, body("u4", expires_at="2027-01-01T00:00:00Z"), None) is None
    assert own.valid_until is None
    normal = pipeline(parts, Lane.NORMAL, clock, urgent_validity_s=60)
    assert normal.admit(Job(published_at=clock.time() - 3600), body("u5"), None) is None


async def test_a_bulk_request_inside_quiet_hours_waits_as_a_delayed_copy_and_goes_when_they_end(
    parts: tuple[SqliteStore, ProviderAdapter],
) -> None:
    clock = FakeClock(at("2026-12-06T21:00:00+00:00"))  # 22:00 in Warsaw
    bulk = pipeline(parts, Lane.BULK, clock, quiet_hours="21:00-08:00")
    decision = bulk.admit(Job(), body(), None)
    assert decision == Defer(3600000, "quiet_hours")  # ten hours to wait: the longest hop
    # The normal lane and a recipient awake elsewhere are not held.
    assert pipeline(parts, Lane.NORMAL, clock, quiet_hours="21:00-08:00").admit(Job(), body(), None) is None
    assert bulk.admit(Job(), body("u2", to="+12125551234"), None) is None  # 16:00 in New York
    clock.advance(10 * 3600 - 20)  # 07:59:40 in Warsaw: the last hop is short
    assert bulk.admit(Job(), body("u3"), None) == Defer(10000, "quiet_hours")
    clock.advance(20)
    assert bulk.admit(Job(), body("u4"), None) is None
    # Off by default.
    clock.advance(14 * 3600)
    assert pipeline(parts, Lane.BULK, clock).admit(Job(), body("u5"), None) is None
