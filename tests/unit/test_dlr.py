"""Delivery reports without services: both providers' status tables row by row, the Mobizon
webhook body and its signature, and the polling schedule."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.config import Account, DlrOptions
from gateway.contract import Status
from gateway.dlr.desk import Desk, poll_gap
from gateway.errors import BadWebhook
from gateway.providers import PROVIDERS
from gateway.providers.base import Provider, StatusReport
from gateway.providers.mobizon import webhook
from gateway.providers.mobizon.codes import STATUSES as MOBIZON
from gateway.providers.serwersms.adapter import parse_statuses
from gateway.providers.serwersms.codes import STATUSES as SERWERSMS
from gateway.sandbox.dlr import sign as sandbox_sign
from gateway.state.base import BatchRecord, FinalState, Tracked
from gateway.state.sqlite import SqliteStore
from tests.fakes import FakeClock

D, U = Status.DELIVERED, Status.UNDELIVERED
MOBIZON_FINAL = {"DELIVRD": D, "UNDELIV": U, "REJECTD": U, "EXPIRED": U, "EXPIRD": U, "DELETED": U}
SERWERSMS_FINAL = {"delivered": D, "undelivered": U, "unsent": U}


@pytest.mark.parametrize(
    "status", ["NEW", "ENQUEUD", "ACCEPTD", "PDLIVRD", "DELIVRD", "UNDELIV", "REJECTD", "EXPIRED", "DELETED"]
)
def test_every_documented_mobizon_status(status: str) -> None:
    assert MOBIZON.report("1", status).final is MOBIZON_FINAL.get(status)


@pytest.mark.parametrize("status", ["saved", "queued", "in_progress", "sent", "delivered", "undelivered", "unsent"])
def test_every_serwersms_status(status: str) -> None:
    assert SERWERSMS.report("1", status).final is SERWERSMS_FINAL.get(status)


def test_unknown_statuses_are_not_final() -> None:
    assert MOBIZON.report("1", "SOMETHING_NEW").final is None
    assert SERWERSMS.report("1", None).final is None


def test_serwersms_reports_carry_the_reason_and_the_warsaw_time() -> None:
    doc = {
        "items": [
            {
                "id": "a1",
                "status": "undelivered",
                "reason": "message_expired",
                "delivered": None,
                "sent": "2026-01-15 12:00:00",
            },
            {"id": "a2", "status": "delivered", "delivered": "2026-07-01 10:00:00"},
            {"status": "delivered"},  # no id: nothing to correlate
        ]
    }
    first, second = parse_statuses(doc)
    assert (first.final, first.reason) == (U, "message_expired")
    assert first.at is not None
    assert first.at.isoformat() == "2026-01-15T12:00:00+01:00"
    assert second.at is not None
    assert second.at.isoformat() == "2026-07-01T10:00:00+02:00"


def now_ts() -> str:
    return datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%d %H:%M:%S")


def event(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "eventId": 26,
        "eventType": "sms-delivery-report",
        "eventCreateTs": "2026-01-15 11:42:28",
        "webhookId": 1,
        "attempt": 1,
        "data": {
            "campaignId": 245455096,
            "messageId": 169275418,
            "segNum": 3,
            "statusUpdateTs": "2026-01-15 11:42:08",
            "status": "DELIVRD",
            "to": "380737893456",
        },
    }
    doc.update(overrides)
    return doc


# sha1("26|1|2026-01-15 11:42:28|s3cret") and sha1("26|2|...|s3cret"), by `printf '%s' ... | sha1sum`.
SIGN_ATTEMPT_1 = "ce79f569aa854bf6f2b4b2895ae80a5d27a066a6"
SIGN_ATTEMPT_2 = "73de2940b56b7e75b53371c271200a849e9a1d1d"


def test_the_signature_matches_known_answers_and_the_sandbox_signs_the_same() -> None:
    assert webhook.signature("26", "1", "2026-01-15 11:42:28", "s3cret") == SIGN_ATTEMPT_1
    assert webhook.signature("26", "2", "2026-01-15 11:42:28", "s3cret") == SIGN_ATTEMPT_2
    assert sandbox_sign(26, 1, "2026-01-15 11:42:28", "s3cret") == SIGN_ATTEMPT_1


def test_the_documented_webhook_body_and_its_signature() -> None:
    doc = event()
    doc["sign"] = SIGN_ATTEMPT_1.upper()  # compared without regard to case
    parsed = webhook.parse(json.dumps(doc).encode())
    assert webhook.created_at(parsed) == datetime(2026, 1, 15, 11, 42, 28, tzinfo=UTC).timestamp()
    assert parsed.report is not None
    assert (parsed.report.provider_message_id, parsed.report.status, parsed.report.final) == ("169275418", "DELIVRD", D)
    assert webhook.verify(parsed, "s3cret")
    assert not webhook.verify(parsed, "other")
    # The signature covers the attempt: a retry is signed anew.
    retried = webhook.parse(json.dumps({**doc, "attempt": 2}).encode())
    assert not webhook.verify(retried, "s3cret")
    assert webhook.verify(webhook.parse(json.dumps({**doc, "attempt": 2, "sign": SIGN_ATTEMPT_2}).encode()), "s3cret")
    unsigned = webhook.parse(json.dumps(event()).encode())
    assert not webhook.verify(unsigned, "s3cret")


def test_a_form_encoded_body_reads_like_json() -> None:
    form = (
        "eventId=26&eventType=sms-delivery-report&eventCreateTs=2026-01-15+11%3A42%3A28&webhookId=1&attempt=1"
        "&data%5BmessageId%5D=169275418&data%5Bstatus%5D=UNDELIV&data%5Bto%5D=380737893456"
    )
    parsed = webhook.parse(form.encode(), "application/x-www-form-urlencoded")
    assert parsed.report is not None
    assert (parsed.report.provider_message_id, parsed.report.final, parsed.to) == ("169275418", U, "380737893456")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"eventId": 1}',
        json.dumps(event(data=[])).encode(),
        json.dumps(event(eventId=None)).encode(),
        json.dumps(event(attempt=True)).encode(),
        json.dumps(event(sign=5)).encode(),
        b"\xff\xfe",
        b"[" * 100_000,
        json.dumps(event(data={"status": "DELIVRD"})).encode(),
    ],
    ids=[
        "empty",
        "list",
        "no-fields",
        "data-list",
        "null-id",
        "bool",
        "sign-number",
        "not-utf8",
        "deep",
        "no-message-id",
    ],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(webhook.BadWebhook):
        webhook.parse(body)


def test_polls_back_off_to_the_longest_gap() -> None:
    s = DlrOptions(poll_after_s=300, poll_max_gap_s=3600)
    assert [poll_gap(s, n) for n in (1, 2, 3, 4, 5, 40)] == [600, 1200, 2400, 3600, 3600, 3600]


class RecordingSink:
    """Collects the events a Desk publishes (a Publisher stand-in behind the same call)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def outcome(self, *, account: str, status: str, body: bytes, unique_id: str | None, **_: Any) -> None:
        await asyncio.sleep(0.01)  # a broker round trip: time for a second report to arrive meanwhile
        self.events.append({"routing_key": f"{status}.{account}", **json.loads(body)})


@pytest.fixture
async def desk_parts(tmp_path: Path) -> AsyncIterator[tuple[Desk, SqliteStore, RecordingSink]]:
    store = SqliteStore(tmp_path / "state.sqlite3")
    sink = RecordingSink()
    account = Account(name="kz", provider="mobizon", base_url="https://api.mobizon.kz", api_key=SecretStr("k"))
    desk = Desk(store=store, sink=sink, accounts=[account], owner="one-process")
    yield desk, store, sink
    await store.close()


async def test_reports_of_one_message_at_once_publish_one_event(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    desk, store, sink = desk_parts
    await store.track("kz", [Tracked("m1", "u1", "+77010000001", {"order": 7}, "mobizon", time.time())], 60, 600)
    report = MOBIZON.report("m1", "DELIVRD")
    # A webhook, its duplicate and a poll, all in one process at once.
    states = await asyncio.gather(*(desk.report("kz", report, "webhook") for _ in range(5)))
    assert states.count(FinalState.CLAIMED) == 1
    assert set(states) <= {FinalState.CLAIMED, FinalState.BUSY, FinalState.DONE}
    (event,) = sink.events
    assert event["routing_key"] == "delivered.kz"
    assert (event["unique_id"], event["meta"], event["provider_status"]) == ("u1", {"order": 7}, "DELIVRD")
    later = await desk.report("kz", MOBIZON.report("m1", "UNDELIV"), "poll")
    assert later is FinalState.DONE  # later reports publish nothing
    assert len(sink.events) == 1


async def test_a_final_report_is_held_until_the_accepted_outcome_is_announced(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    """The `accepted` publish of a recorded message may be lost (its redelivered copy repeats it):
    until the worker announces it, a final report publishes nothing, and a poll asks again soon."""
    desk, store, sink = desk_parts
    held = BatchRecord(tracked=[Tracked("m1", "u1", None, None, "mobizon", time.time())], hold_s=300, track_ttl_s=600)
    await store.record("kz", held)
    assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "webhook") is FinalState.HELD
    assert sink.events == []
    await store.announce("kz", ["m1", "never-recorded"])
    assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.CLAIMED
    assert [e["routing_key"] for e in sink.events] == ["delivered.kz"]
    await store.announce("kz", ["m1"])  # a late announcement (the redelivered copy's) reopens nothing
    assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.DONE
    assert len(sink.events) == 1


@dataclass(frozen=True)
class AcmeEvent:
    event_id: str
    report: StatusReport | None


class AcmeWebhooks:
    """A third provider's webhook format: `<event id> <message id> <status>`, signed by a prefix."""

    def parse(self, body: bytes, content_type: str) -> AcmeEvent:
        parts = body.decode().split()
        if len(parts) != 4:
            raise BadWebhook("not four words")
        return AcmeEvent(parts[1], StatusReport(parts[2], parts[3], D if parts[3] == "ok" else None))

    def verify(self, event: Any, secret: str) -> bool:
        return True

    def created_at(self, event: Any) -> float | None:
        return None


async def test_a_provider_added_to_the_registry_gets_its_webhooks_read_by_its_own_format(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The desk names no provider: a new package's `Provider` in the registry is all it takes."""
    _desk, store, sink = desk_parts
    monkeypatch.setitem(PROVIDERS, "acme", Provider("acme", lambda *_a, **_k: None, AcmeWebhooks()))  # type: ignore[arg-type]
    acme = Account.model_construct(name="ac", provider="acme", webhook_secret=None)
    desk = Desk(store=store, sink=sink, accounts=[acme], owner="one-process")
    await store.track("ac", [Tracked("m9", "u9", None, None, "acme", time.time())], 60, 600)
    assert await desk.webhook("acme", "ac", b"sig e1 m9 ok", "text/plain") == (200, "ok")
    assert [t.provider_message_id for t in await store.due_polls("ac", 10, 30)] == ["m9"]  # a hint, as always
    assert (await desk.webhook("acme", "ac", b"garbage", "text/plain"))[0] == 400
    assert (await desk.webhook("serwersms", "ac", b"sig e1 m9 ok", "text/plain"))[0] == 404  # not its provider
    assert sink.events == []


async def post(desk: Desk, doc: dict[str, Any]) -> tuple[int, str]:
    return await desk.webhook("mobizon", "kz", json.dumps(doc).encode(), "application/json")


async def due_ids(store: SqliteStore) -> list[str]:
    return [t.provider_message_id for t in await store.due_polls("kz", 100, 30)]


async def test_a_webhook_before_its_correlation_is_parked_then_makes_the_poll_due(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    desk, store, sink = desk_parts
    doc = event(eventCreateTs=now_ts(), data={"messageId": "early-1", "status": "EXPIRED", "to": "77010000002"})
    assert await post(desk, doc) == (200, "ok")  # parked: safely stored
    assert await desk.sweep() == 0  # still no correlation
    await store.track("kz", [Tracked("early-1", "u2", "+77010000002", None, "mobizon", time.time())], 60, 600)
    assert await due_ids(store) == []  # its first poll is a minute away
    assert await desk.sweep() == 1
    assert await due_ids(store) == ["early-1"]  # due now: the provider's answer decides the event
    assert sink.events == []  # a webhook itself publishes nothing
    # The webhook retried later is a duplicate: answered 200, nothing published.
    assert await post(desk, doc) == (200, "duplicate")
    assert sink.events == []


async def test_a_rewritten_or_stale_webhook_is_refused_and_a_forged_status_publishes_nothing(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    """Mobizon signs only eventId|attempt|eventCreateTs (this account has no secret, so nothing):
    the message id, status and webhook id of a captured webhook can be rewritten at will."""
    desk, store, sink = desk_parts
    now = time.time()
    await store.track("kz", [Tracked(f"m{i}", f"u{i}", None, None, "mobizon", now) for i in (1, 2)], 60, 600)
    genuine = event(eventCreateTs=now_ts(), data={"messageId": "m1", "status": "DELIVRD", "to": "77010000001"})
    assert await post(desk, genuine) == (200, "ok")
    # The same event rewritten to name another pending message as undelivered: refused.
    forged = {**genuine, "webhookId": 77, "data": {"messageId": "m2", "status": "UNDELIV", "to": "77010000002"}}
    assert await post(desk, forged) == (409, "event_rewritten")
    # A replay from long ago: refused before the store is asked.
    stale = event(eventId=27, data={"messageId": "m2", "status": "UNDELIV"})
    assert await post(desk, stale) == (403, "stale")
    # A fresh, unknown event id naming m2 only makes m2's poll due: nothing is published from it.
    fresh = event(eventId=28, eventCreateTs=now_ts(), data={"messageId": "m2", "status": "UNDELIV"})
    assert await post(desk, fresh) == (200, "ok")
    assert sorted(await due_ids(store)) == ["m1", "m2"]
    assert sink.events == []


async def test_a_final_mark_that_fails_is_tried_again_and_the_event_is_not_published_twice(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    desk, store, sink = desk_parts
    await store.track("kz", [Tracked("m1", "u1", None, None, "mobizon", time.time())], 60, 600)
    real_end = store.end_final
    failures = {"left": 3}

    async def flaky_end(*args: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("store paused")
        await real_end(*args)

    store.end_final = flaky_end  # type: ignore[method-assign,assignment]
    assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.CLAIMED
    assert len(sink.events) == 1
    assert await desk.finish_marks(30) == 0  # the mark landed on a later try
    assert failures["left"] == 0
    # Every later report finds the message final: still one event.
    assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.DONE
    assert len(sink.events) == 1


class UnconfirmedSink(RecordingSink):
    """The connection closes around one publish: after the broker routed it (`routed`), or before."""

    def __init__(self, routed: bool) -> None:
        super().__init__()
        self.routed = routed
        self.failures = 1

    async def outcome(self, *, account: str, status: str, body: bytes, unique_id: str | None, **_: Any) -> None:
        if self.failures and not self.routed:
            self.failures -= 1
            raise ConnectionError("connection closed before the frame left")
        await super().outcome(account=account, status=status, body=body, unique_id=unique_id)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection closed before the confirm came")


@pytest.mark.parametrize(
    ("routed", "late", "reads"),
    [(True, False, 1), (True, True, 2), (False, False, 2)],
    ids=["routed", "routed-reaching-the-stream-late", "not-routed"],
)
async def test_a_publish_without_a_confirm_is_looked_up_in_the_stream_and_published_once(
    tmp_path: Path, clock: FakeClock, routed: bool, late: bool, reads: int
) -> None:
    store = SqliteStore(tmp_path / "state.sqlite3")
    sink = UnconfirmedSink(routed)
    asked: list[float] = []

    async def published(account: str, ids: list[str], since: float) -> set[str]:
        asked.append(since)  # the broker's word: what reached the tracking stream since then
        if late and len(asked) == 1:
            return set()  # routed, but not in the stream yet at the first read
        return {e["provider_message_id"] for e in sink.events if e["routing_key"].endswith(account)} & set(ids)

    account = Account(name="kz", provider="mobizon", base_url="https://api.mobizon.kz", api_key=SecretStr("k"))
    desk = Desk(store=store, sink=sink, accounts=[account], owner="one-process", clock=clock, published=published)
    try:
        await store.track("kz", [Tracked("m1", "u1", None, None, "mobizon", time.time())], 60, 600)
        # The claim stays with the unsure publish: a report meanwhile publishes nothing.
        assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.BUSY
        assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "webhook") is FinalState.BUSY
        assert await desk.finish_marks(30) == 0
        # Looked up from the publish's moment: once when found, twice (3 s apart) before publishing again.
        attempted = clock.time() - (2.0 if reads == 1 else 5.0)
        assert asked == [attempted] * reads
        assert [e["routing_key"] for e in sink.events] == ["delivered.kz"]  # once, routed or not
        assert await desk.report("kz", MOBIZON.report("m1", "DELIVRD"), "poll") is FinalState.DONE
        assert len(sink.events) == 1
    finally:
        await store.close()


async def test_a_webhook_for_an_unknown_message_while_tracking_is_rebuilt_is_parked_and_answered_503(
    desk_parts: tuple[Desk, SqliteStore, RecordingSink],
) -> None:
    desk, store, _sink = desk_parts
    rebuilding = asyncio.get_running_loop().create_future()
    desk._rebuilding["kz"] = rebuilding  # type: ignore[assignment]  # as watch_epochs starts one
    doc = event(eventCreateTs=now_ts(), data={"messageId": "lost-1", "status": "DELIVRD"})
    assert await post(desk, doc) == (503, "rebuilding")  # Mobizon comes again
    await store.track("kz", [Tracked("lost-1", "u9", None, None, "mobizon", time.time())], 60, 600)
    assert await desk.sweep() == 1  # the hint was parked all the same
    rebuilding.cancel()


def test_the_desk_reaches_every_account_once_a_round_a_share_each_tick() -> None:
    from gateway.dlr import desk as d

    def accounts(n: int) -> list[Account]:
        return [
            Account(name=f"a{i:04d}", provider="serwersms", base_url="https://api2.serwersms.pl", token=SecretStr("t"))
            for i in range(n)
        ]

    ticks = int(d.EPOCH_EVERY_S / d.SWEEP_S)
    for n in (1, 7, 1000):
        desk = Desk(store=None, sink=None, accounts=accounts(n), owner="one")  # type: ignore[arg-type]
        seen = [desk._turn("epoch", d.EPOCH_EVERY_S) for _ in range(ticks)]
        assert sorted(name for share in seen for name in share) == sorted(f"a{i:04d}" for i in range(n))
        assert max(len(share) for share in seen) <= -(-n // ticks)  # no burst: at most its share a tick
