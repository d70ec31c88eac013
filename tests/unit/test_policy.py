"""The pipeline's policy stage on its own (a real SQLite store, a provider that takes everything):
who an opt-out refuses, and what it never refuses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Account, Settings
from gateway.contract import Lane, Status
from gateway.core.decisions import Finish, Job
from gateway.core.pipeline import Pipeline
from gateway.state.base import OPTOUT_ALL, OptOut
from gateway.state.sqlite import SqliteStore
from tests.fakes import AcceptingAdapter

OPTED, FREE = "+48500600701", "+48500600702"


def account(**kw: object) -> Account:
    doc: dict[str, object] = {
        "name": "acme",
        "provider": "serwersms",
        "base_url": "http://sandbox.invalid",
        "token": "t",
    }
    return Account.model_validate({**doc, **kw})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.sqlite3")
    await s.optout_add("acme", [OptOut(OPTED, 1.0, "cli")])
    yield s
    await s.close()


async def run(
    store: SqliteStore, lane: Lane, *jobs: tuple[Job, str, str], **kw: object
) -> tuple[list[object], list[str]]:
    adapter = AcceptingAdapter()
    options = Settings(_env_file=None).send  # type: ignore[call-arg]
    pipe = Pipeline(account=account(**kw), adapter=adapter, store=store, options=options, owner="t", lane=lane)
    for job, uid, to in jobs:
        assert pipe.admit(job, json.dumps({"unique_id": uid, "to": to, "text": "hi"}).encode(), None) is None
    result = await pipe.run([j for j, _, _ in jobs])
    return [d.status if isinstance(d, Finish) else d for d in result.decisions], adapter.sent


async def test_a_fresh_request_to_an_opted_out_number_is_refused_and_never_sent(store: SqliteStore) -> None:
    statuses, sent = await run(store, Lane.NORMAL, (Job(), "a", OPTED), (Job(), "b", FREE))
    assert statuses == [Status.REJECTED, Status.ACCEPTED]
    assert sent == ["b"]


async def test_urgent_goes_through_unless_the_account_blocks_its_lane_too(store: SqliteStore) -> None:
    statuses, sent = await run(store, Lane.URGENT, (Job(), "a", OPTED))
    assert (statuses, sent) == ([Status.ACCEPTED], ["a"])
    statuses, sent = await run(store, Lane.URGENT, (Job(), "a2", OPTED), optout_lanes=["urgent", "normal", "bulk"])
    assert (statuses, sent) == ([Status.REJECTED], [])


async def test_an_opt_out_for_all_accounts_counts_for_this_one(store: SqliteStore) -> None:
    await store.optout_add(OPTOUT_ALL, [OptOut(FREE, 1.0, "bus")])
    statuses, sent = await run(store, Lane.BULK, (Job(), "c", FREE))
    assert (statuses, sent) == ([Status.REJECTED], [])


async def test_a_copy_that_may_have_gone_out_before_is_never_refused(store: SqliteStore) -> None:
    # A redelivery (a crash or a lost channel mid-batch), a wait copy, and the retry of an ambiguous
    # attempt: each may be at the provider already, so each goes to the claim and, when the store
    # says it was never sent, to the provider; an outcome never says `rejected` for a sent message.
    statuses, sent = await run(
        store,
        Lane.NORMAL,
        (Job(redelivered=True), "r", OPTED),
        (Job(waits=1), "w", OPTED),
        (Job(attempts=1, sent_at=1.0), "s", OPTED),
        (Job(attempts=1), "plain-retry", OPTED),  # a retry after an attempt that surely did not send
    )
    assert statuses == [Status.ACCEPTED, Status.ACCEPTED, Status.ACCEPTED, Status.REJECTED]
    assert sorted(sent) == ["r", "s", "w"]
