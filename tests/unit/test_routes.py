"""Routing and failover: the routes' circuits on their own (a fake clock), and the pipeline sending
through them (a real SQLite store, scripted providers): what moves, what never moves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Account, FailoverOptions, Settings
from gateway.contract import Status
from gateway.core.decisions import Finish, Job, Retry
from gateway.core.pipeline import Pipeline, Sender
from gateway.core.routes import Circuit, MoveReason, Routes
from gateway.providers.base import Action, ItemResult, Outbound
from gateway.state.sqlite import SqliteStore
from tests.fakes import FakeClock, ScriptedAdapter

REFUSED = ItemResult.failure("transport", "ConnectError", "did not reach the provider", Action.RETRYABLE)
TIMEOUT = ItemResult.failure("transport", "ReadTimeout", "may have reached the provider", Action.AMBIGUOUS)
QUOTA = ItemResult.failure("2201", "AccountError", "no funds", Action.ACCOUNT)
OPTIONS = FailoverOptions(failures=3, error_rate=0.5, window_s=30, min_calls=10, open_s=15)


def account(name: str, **kw: object) -> Account:
    doc: dict[str, object] = {"name": name, "provider": "serwersms", "base_url": "http://x.invalid", "token": "t"}
    return Account.model_validate({**doc, **kw})


PRIMARY = account("primary", failover_to=["backup"], sender="Primary")
BACKUP = account("backup", sender="Backup")


def routes(clock: FakeClock, *accounts: Account, options: FailoverOptions = OPTIONS) -> Routes:
    return Routes(accounts or (PRIMARY, BACKUP), options, pause_s=60.0, clock=clock)


# -- the routes on their own ---------------------------------------------------------------------------


def test_consecutive_transport_failures_open_the_circuit_and_a_probe_closes_it() -> None:
    clock = FakeClock()
    r = routes(clock)
    for _ in range(2):
        r.called("primary", [REFUSED, REFUSED])
    assert r.choose(PRIMARY, "PL") == ("primary", None)
    r.called("primary", [TIMEOUT])
    assert r.describe()["primary"]["state"] == "open"
    assert r.choose(PRIMARY, "PL") == ("backup", MoveReason.OPEN)
    clock.advance(15)
    assert r.choose(PRIMARY, "PL") == ("primary", None)  # the one probe
    assert r.describe()["primary"]["state"] == "half_open"
    assert r.choose(PRIMARY, "PL") == ("backup", MoveReason.OPEN)  # while the probe is out
    r.called("primary", [ItemResult.failure("x", "Rejected", "bad number", Action.PERMANENT)])
    assert r.describe()["primary"]["state"] == "closed"
    assert r.choose(PRIMARY, "PL") == ("primary", None)


def test_a_failed_probe_opens_it_again() -> None:
    clock = FakeClock()
    r = routes(clock)
    for _ in range(3):
        r.called("primary", [REFUSED])
    clock.advance(16)
    assert r.choose(PRIMARY, None)[0] == "primary"
    r.called("primary", [REFUSED])
    assert r.routes["primary"].circuit is Circuit.OPEN
    assert r.choose(PRIMARY, None)[0] == "backup"


def test_a_retryable_error_rate_over_the_threshold_opens_it_and_one_success_resets_the_run() -> None:
    clock = FakeClock()
    r = routes(clock)
    accepted = ItemResult.failure("ok", "x", "x", Action.PERMANENT)
    for _ in range(5):  # failures alternate with successes: never three in a row
        r.called("primary", [REFUSED])
        r.called("primary", [accepted, TIMEOUT])  # one message of the call failed retryably
    assert r.routes["primary"].circuit is Circuit.OPEN
    assert "calls failed retryably" in r.routes["primary"].why


def test_a_throttle_is_not_a_failure() -> None:
    clock = FakeClock()
    r = routes(clock)
    throttled = ItemResult.failure("30", "Throttled", "slow down", Action.THROTTLE)
    for _ in range(20):
        r.called("primary", [throttled])
    assert r.routes["primary"].circuit is Circuit.CLOSED


def test_routes_by_country_then_the_failover_list() -> None:
    clock = FakeClock()
    home = account("home", route_by_country={"ua": "east", "*": "home"}, failover_to=["backup"])
    east = account("east")
    r = routes(clock, home, east, BACKUP)
    assert r.candidates(home, "UA") == ["east", "backup"]
    assert r.candidates(home, "PL") == ["home", "backup"]
    assert r.choose(home, "UA") == ("east", None)


def test_an_account_error_pauses_the_route_and_with_nothing_else_usable_nothing_takes_it() -> None:
    clock = FakeClock()
    r = routes(clock)
    r.pause("primary", "2201")
    assert r.choose(PRIMARY, "PL") == ("backup", MoveReason.PAUSED)
    r.pause("backup", "2201")
    assert r.choose(PRIMARY, "PL") == ("", MoveReason.PAUSED)
    assert r.paused_for_s(PRIMARY) == pytest.approx(60)
    clock.advance(61)
    assert r.choose(PRIMARY, "PL") == ("primary", None)


def test_an_undelivered_share_drains_the_country_only() -> None:
    clock = FakeClock()
    r = routes(clock, options=OPTIONS.model_copy(update={"undelivered_min": 10, "undelivered_share": 0.5}))
    for n in range(10):
        r.reported("primary", "NG", undelivered=n < 6)
        r.reported("primary", "PL", undelivered=n < 2)
    assert r.choose(PRIMARY, "NG") == ("backup", MoveReason.DRAINED)
    assert r.choose(PRIMARY, "PL") == ("primary", None)
    [(name, state, why, _since, _until)] = r.take_changed()
    assert (name, state) == ("primary", "drained")
    assert "NG 60% undelivered" in why
    clock.advance(OPTIONS.drain_s + 1)
    assert r.choose(PRIMARY, "NG") == ("primary", None)


# -- the pipeline through the routes -------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.sqlite3")
    yield s
    await s.close()


class Rig:
    def __init__(self, store: SqliteStore, home: Account = PRIMARY, *others: Account) -> None:
        self.clock = FakeClock()
        accounts = (home, *(others or (BACKUP,)))
        self.adapters = {a.name: ScriptedAdapter(a.provider) for a in accounts}
        self.routes = Routes(accounts, OPTIONS, pause_s=60.0, clock=self.clock)
        senders = {a.name: Sender(a, self.adapters[a.name]) for a in accounts}
        self.pipe = Pipeline(
            account=home,
            adapter=self.adapters[home.name],
            store=store,
            options=Settings(_env_file=None).send,  # type: ignore[call-arg]
            owner="t",
            routes=self.routes,
            senders=senders,
        )

    async def run(self, *jobs: tuple[Job, str], to: str = "+48500600700") -> list[object]:
        for job, uid in jobs:
            body = json.dumps({"unique_id": uid, "to": to, "text": "hi"}).encode()
            assert self.pipe.admit(job, body, None) is None
        result = await self.pipe.run([j for j, _ in jobs])
        return list(result.decisions)

    def sent(self, name: str) -> list[str]:
        return [o.unique_id for o in self.adapters[name].sent]


async def test_a_request_the_primary_refused_to_connect_goes_through_the_backup_in_the_same_batch(
    store: SqliteStore,
) -> None:
    rig = Rig(store)
    rig.adapters["primary"].answer = lambda o: REFUSED
    [d] = await rig.run((Job(), "a"))
    assert isinstance(d, Finish)
    assert d.status is Status.ACCEPTED
    assert d.result.via == "backup"
    assert d.result.provider_message_id == "serwersms-a"
    assert rig.sent("primary") == ["a"]
    assert rig.sent("backup") == ["a"]
    assert d.result.attempts == 2
    [sent] = rig.adapters["backup"].sent
    assert sent.sender == "Backup"  # the backup account's own sender name


async def test_a_request_whose_answer_was_lost_never_moves(store: SqliteStore) -> None:
    rig = Rig(store)
    rig.adapters["primary"].answer = lambda o: TIMEOUT
    job = Job()
    [d] = await rig.run((job, "a"))
    assert isinstance(d, Retry)
    assert d.ambiguous
    assert job.maybe_at == ("primary",)
    assert rig.sent("backup") == []


async def test_its_retry_asks_the_primary_and_waits_while_it_cannot_be_asked(store: SqliteStore) -> None:
    rig = Rig(store)
    for _ in range(3):
        rig.routes.called("primary", [REFUSED])  # the primary's circuit is open
    rig.adapters["primary"].lookups_fail = True
    job = Job(attempts=1, sent_at=rig.clock.time() - 5, maybe_at=("primary",), own=True)
    [d] = await rig.run((job, "a"))
    assert isinstance(d, Retry)
    assert d.ambiguous
    assert d.error.code == "lookup_failed"
    assert rig.adapters["primary"].looked_up == ["a"]
    assert rig.adapters["backup"].looked_up == []  # only where it may be
    assert rig.sent("backup") == []
    assert rig.sent("primary") == []


@pytest.mark.parametrize(("held", "via"), [(False, "backup"), (True, "primary")])
async def test_a_lost_answer_is_looked_up_where_it_went_before_anything_moves(
    store: SqliteStore, held: bool, via: str
) -> None:
    """The primary's circuit is open; its answer decides: absent, the backup sends; found, nothing."""
    rig = Rig(store)
    if held:
        rig.adapters["primary"].held["a"] = rig.adapters["primary"].answer(_outbound("a"))
    for _ in range(3):
        rig.routes.called("primary", [REFUSED])
    job = Job(attempts=1, sent_at=rig.clock.time() - 5, maybe_at=("primary",), own=True)
    [d] = await rig.run((job, "a"))
    assert isinstance(d, Finish)
    assert d.status is Status.ACCEPTED
    assert d.result.via == via
    assert rig.adapters["primary"].looked_up == ["a"]
    assert rig.sent("primary") == []
    assert rig.sent("backup") == ([] if held else ["a"])


async def test_a_redelivery_that_cannot_say_where_it_went_asks_every_route(store: SqliteStore) -> None:
    rig = Rig(store)
    rig.adapters["backup"].held["a"] = rig.adapters["backup"].answer(_outbound("a"))
    job = Job(redelivered=True)
    [d] = await rig.run((job, "a"))
    assert isinstance(d, Finish)
    assert d.status is Status.ACCEPTED
    assert d.result.via == "backup"
    assert sorted(rig.adapters["primary"].looked_up + rig.adapters["backup"].looked_up) == ["a", "a"]
    assert rig.sent("primary") == []
    assert rig.sent("backup") == []


async def test_an_account_error_fails_over_within_the_batch_and_pauses_the_route_not_the_consumer(
    store: SqliteStore,
) -> None:
    rig = Rig(store)
    rig.adapters["primary"].answer = lambda o: QUOTA
    decisions = await rig.run((Job(), "a"), (Job(), "b"))
    assert all(isinstance(d, Finish) and d.status is Status.ACCEPTED for d in decisions)
    assert rig.sent("backup") == ["a", "b"]
    assert rig.routes.unusable("primary", "PL") is MoveReason.PAUSED
    result = await rig.pipe.run([])
    assert not result.pause_account
    [d] = await rig.run((Job(), "c"))
    assert isinstance(d, Finish)
    assert d.result.via == "backup"
    assert rig.sent("primary") == ["a", "b"]  # the paused route got nothing more


async def test_without_failover_an_account_error_pauses_the_account_as_before(store: SqliteStore) -> None:
    alone = account("alone")
    rig = Rig(store, alone, BACKUP)
    rig.adapters["alone"].answer = lambda o: QUOTA
    job = Job()
    body = json.dumps({"unique_id": "a", "to": "+48500600700", "text": "hi"}).encode()
    assert rig.pipe.admit(job, body, None) is None
    result = await rig.pipe.run([job])
    assert result.pause_account
    [d] = result.decisions
    assert isinstance(d, Finish)
    assert d.status is Status.REJECTED
    assert rig.sent("backup") == []


async def test_when_every_route_is_paused_the_request_comes_back_later_without_an_attempt(
    store: SqliteStore,
) -> None:
    rig = Rig(store)
    rig.routes.pause("primary", "2201")
    rig.routes.pause("backup", "2201")
    [d] = await rig.run((Job(attempts=2), "a"))
    assert isinstance(d, Retry)
    assert not d.ambiguous
    assert d.attempts == 2
    assert d.error.code == "route_paused"
    assert d.delay_ms == 60_000  # a declared delay (a retry queue exists for it), the pause's length
    assert rig.sent("primary") == []
    assert rig.sent("backup") == []


async def test_a_country_route_sends_from_the_first_message(store: SqliteStore) -> None:
    home = account("home", route_by_country={"UA": "east"})
    east = account("east", sender="East")
    rig = Rig(store, home, east)
    [ua] = await rig.run((Job(), "u"), to="+380501234567")
    [pl] = await rig.run((Job(), "p"))
    assert isinstance(ua, Finish)
    assert ua.result.via == "east"
    assert isinstance(pl, Finish)
    assert pl.result.via == "home"
    assert rig.sent("east") == ["u"]
    assert rig.sent("home") == ["p"]


def _outbound(uid: str) -> Outbound:
    return Outbound(unique_id=uid, provider_ref="g" + uid, phone="+48500600700", text="hi", sender=None)
